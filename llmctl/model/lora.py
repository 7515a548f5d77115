"""LoRA on llmctl's Transformer, through peft: which layers it may target, wrapping, counting.

peft's LoraConfig takes `target_modules` naming our Llama-style projections (q_proj, ...). Target
groups (attention, mlp, all-linear) are expanded here into those names, so a saved
adapter_config.json lists the layers themselves, as peft and transformers read them. peft is
imported only when a model is wrapped.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from llmctl.config import LORA_TARGET_GROUPS, AdapterConfig
from llmctl.errors import UsageError
from llmctl.model.classifier import HEAD, TransformerClassifier
from llmctl.model.quantize import quiet_bitsandbytes_import
from llmctl.model.transformer import Attention, DecoderLayer

if TYPE_CHECKING:
    from peft import PeftModel


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers: what --lora-targets may name."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if _is_linear(module)}
    return sorted(names)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)  # bitsandbytes' Linear4bit is one too


def group_names(model: nn.Module) -> dict[str, list[str]]:
    """The linear layers of the blocks by group: attention's projections and the MLP's (SwiGLU's
    gate/up/down or the GPT-2 style's up/down), each in the model's order."""
    attention: dict[str, None] = {}
    mlp: dict[str, None] = {}
    for module in model.modules():
        if isinstance(module, DecoderLayer):
            for part, names in ((module.self_attn, attention), (module.mlp, mlp)):
                names.update((name, None) for name, child in part.named_children() if _is_linear(child))
    return {"attention": list(attention), "mlp": list(mlp), "all-linear": [*attention, *mlp]}


def resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """`targets` with each group replaced by the layer names it stands for, checked against the
    model: every name matches a linear layer, and a tied lm_head is refused."""
    groups = group_names(model)
    names: dict[str, None] = {}
    for target in targets:
        names.update(dict.fromkeys(groups.get(target, [target])))
    resolved = list(names)
    if "lm_head" in resolved and getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        raise UsageError(
            "--lora-targets lm_head: this model ties lm_head to the token embedding, so merging an adapter "
            "there would change both; leave lm_head out"
        )
    available = linear_names(model)
    unknown = [target for target in resolved if target not in available]
    if not resolved or unknown:
        what = f"LoRA targets {', '.join(unknown)} match" if unknown else "no LoRA targets given: they match"
        raise UsageError(
            f"{what} no module of the model; the linear layers are named {', '.join(available)}, the "
            f"groups {', '.join(LORA_TARGET_GROUPS)} (--lora-targets all-linear or q_proj,v_proj)"
        )
    return resolved


def check_targets(model: nn.Module, targets: list[str]) -> None:
    resolve_targets(model, targets)


def lora_config(adapter: AdapterConfig, targets: list[str], modules_to_save: list[str] | None = None):
    quiet_bitsandbytes_import()
    from peft import LoraConfig

    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        use_rslora=adapter.rslora,
        target_modules=targets,
        modules_to_save=modules_to_save,
        bias="none",
    )


def apply_lora(model: nn.Module, adapter: AdapterConfig, base: Path | None = None) -> PeftModel:
    """Freeze `model` and wrap it with LoRA adapters (and a trainable copy of a classifier's head)."""
    quiet_bitsandbytes_import()
    from peft import get_peft_model

    targets = resolve_targets(model, list(adapter.targets))
    modules_to_save = [HEAD] if isinstance(model, TransformerClassifier) else None
    # B starts at zero, so the wrapped model computes exactly what the base does until trained
    wrapped = get_peft_model(model, lora_config(adapter, targets, modules_to_save))
    # set after wrapping: peft resets it from the model's (Hugging Face) name_or_path, which ours lacks
    wrapped.peft_config["default"].base_model_name_or_path = str(base) if base else None
    return wrapped


def lora_parameter_counts(model: nn.Module, adapter: AdapterConfig) -> dict[str, int]:
    """Parameters LoRA adds on `model` (r × (in + out) per targeted linear layer), by group:
    attention, mlp, and any other layer (lm_head) under its own name."""
    targets = set(resolve_targets(model, list(adapter.targets)))
    mlps = {id(layer.mlp) for layer in model.modules() if isinstance(layer, DecoderLayer)}
    counts: dict[str, int] = {}
    for parent in model.modules():
        group = "attention" if isinstance(parent, Attention) else "mlp" if id(parent) in mlps else None
        for name, module in parent.named_children():
            if _is_linear(module) and name in targets:
                key = group or name
                counts[key] = counts.get(key, 0) + adapter.r * (module.in_features + module.out_features)
    order = {"attention": 0, "mlp": 1}
    return dict(sorted(counts.items(), key=lambda item: order.get(item[0], 2)))


def lora_parameter_count(model: nn.Module, adapter: AdapterConfig) -> int:
    """Parameters LoRA adds on `model` (r × (in + out) per targeted linear layer)."""
    return sum(lora_parameter_counts(model, adapter).values())


def lora_saved_values_per_token(model: nn.Module, adapter: AdapterConfig) -> int:
    """Activations LoRA adds to one block's backward, in values per token: each targeted linear
    keeps A's output (r) for B, and with dropout the dropped copy of its input (its bool mask, a
    byte a value, is left out)."""
    targets = set(resolve_targets(model, list(adapter.targets)))
    block = next(module for module in model.modules() if isinstance(module, DecoderLayer))
    total = 0
    for name, module in block.named_modules():
        if _is_linear(module) and name.rsplit(".", 1)[-1] in targets:
            total += adapter.r + (module.in_features if adapter.dropout > 0 else 0)
    return total
