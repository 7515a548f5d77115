"""LoRA on llmctl's Transformer, through peft: which layers it may target, wrapping, counting.

peft's LoraConfig takes `target_modules` naming our Llama-style projections (q_proj, ...). peft is
imported only when a model is wrapped.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from llmctl.config import AdapterConfig
from llmctl.errors import UsageError
from llmctl.model.classifier import HEAD, TransformerClassifier
from llmctl.model.quantize import quiet_bitsandbytes_import

if TYPE_CHECKING:
    from peft import PeftModel


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers: what --lora-targets may name."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if _is_linear(module)}
    return sorted(names)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)  # bitsandbytes' Linear4bit is one too


def check_targets(model: nn.Module, targets: list[str]) -> None:
    if "lm_head" in targets and getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        raise UsageError(
            "--lora-targets lm_head: this model ties lm_head to the token embedding, so merging an adapter "
            "there would change both; leave lm_head out"
        )
    available = linear_names(model)
    unknown = [target for target in targets if target not in available]
    if not targets or unknown:
        what = f"LoRA targets {', '.join(unknown)} match" if unknown else "no LoRA targets given: they match"
        raise UsageError(
            f"{what} no module of the model; "
            f"the linear layers are named {', '.join(available)} (--lora-targets q_proj,v_proj)"
        )


def lora_config(adapter: AdapterConfig, modules_to_save: list[str] | None = None):
    quiet_bitsandbytes_import()
    from peft import LoraConfig

    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=list(adapter.targets),
        modules_to_save=modules_to_save,
        bias="none",
    )


def apply_lora(model: nn.Module, adapter: AdapterConfig, base: Path | None = None) -> PeftModel:
    """Freeze `model` and wrap it with LoRA adapters (and a trainable copy of a classifier's head)."""
    quiet_bitsandbytes_import()
    from peft import get_peft_model

    check_targets(model, list(adapter.targets))
    modules_to_save = [HEAD] if isinstance(model, TransformerClassifier) else None
    # B starts at zero, so the wrapped model computes exactly what the base does until trained
    wrapped = get_peft_model(model, lora_config(adapter, modules_to_save))
    # set after wrapping: peft resets it from the model's (Hugging Face) name_or_path, which ours lacks
    wrapped.peft_config["default"].base_model_name_or_path = str(base) if base else None
    return wrapped


def lora_parameter_count(model: nn.Module, adapter: AdapterConfig) -> int:
    """Parameters LoRA adds on `model` (r × (in + out) per targeted linear layer)."""
    total = 0
    for name, module in model.named_modules():
        if _is_linear(module) and name.rsplit(".", 1)[-1] in adapter.targets:
            total += adapter.r * (module.in_features + module.out_features)
    return total


def lora_saved_values_per_token(layer: nn.Module, adapter: AdapterConfig) -> int:
    """Activations LoRA adds to one layer's backward, in values per token: each targeted linear keeps
    A's output (r) for B, and with dropout the dropped copy of its input (its bool mask, a byte a
    value, is left out)."""
    total = 0
    for name, module in layer.named_modules():
        if _is_linear(module) and name.rsplit(".", 1)[-1] in adapter.targets:
            total += adapter.r + (module.in_features if adapter.dropout > 0 else 0)
    return total
