"""LoRA and QLoRA on llmctl's Transformer, through peft and bitsandbytes; saving, loading, merging.

LoRA: peft's LoraConfig with `target_modules` naming our Llama-style projections (q_proj, ...).
QLoRA: the frozen base's linear layers become bitsandbytes `Linear4bit` (NF4, double quantization:
the per-block scales are themselves quantized), read from the base checkpoint one matrix at a time
so the full-precision model never sits in memory whole; LoRA goes on top. The output head stays
in full precision (it is tied to the embedding in most llmctl models, and small next to the rest).

An adapter checkpoint holds peft's files (adapter_model.safetensors, adapter_config.json) and
names its base checkpoint in meta.json (`base_checkpoint`); `load_checkpoint_model` rebuilds base
+ adapter from that, and `merge_adapter` folds the adapter into plain weights. A QLoRA adapter was
trained against the dequantized NF4 base, so merging uses that base, not the original weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from llmctl.config import AdapterConfig, RunConfig, TrainConfig
from llmctl.errors import LlmctlError, UsageError
from llmctl.model.transformer import Transformer
from llmctl.train.checkpoint import (
    CheckpointError,
    FullModelIO,
    is_hf_model_dir,
    load_full_model,
    read_config,
    read_meta,
)
from llmctl.train.classify import HEAD, TASK, TransformerClassifier, classifier_from

if TYPE_CHECKING:
    from peft import PeftModel

# On CPUs with AVX512-BF16, bitsandbytes logs at import (peft imports it) that an optional faster
# kernel package is missing; the 4-bit layers work without it, so the warning would only alarm.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
UNQUANTIZED = ("lm_head", HEAD)  # linear layers QLoRA keeps in full precision
NF4_BLOCK = 64
# NF4 stores 4 bits per weight plus one absmax per 64-weight block; double quantization stores
# those absmaxes in 8 bits with an fp32 scale per 256 blocks (Dettmers et al., 2023, section 3)
NF4_BITS_PER_WEIGHT = 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * 256)


# ---------------------------------------------------------------- LoRA


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


class AdapterModelIO:
    """Checkpoint weights of an adapter run, in peft's format: only the adapters (and a
    classifier's head) are written; the base is named by the checkpoint's meta.json."""

    kind = "adapter"
    weights_file = ADAPTER_WEIGHTS

    def save(self, model: nn.Module, directory: Path) -> None:
        from peft import get_peft_model_state_dict

        tensors = {
            name: tensor.detach().contiguous()
            for name, tensor in get_peft_model_state_dict(model, save_embedding_layers=False).items()
        }
        save_file(tensors, str(directory / self.weights_file), metadata={"format": "pt"})
        model.peft_config["default"].save_pretrained(str(directory))

    def load(self, model: nn.Module, directory: Path) -> None:
        from peft import set_peft_model_state_dict

        path = directory / self.weights_file
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint file '{path}' is corrupt or truncated ({exc})") from exc
        expected = set(_adapter_state(model))
        missing, unexpected = expected - set(tensors), set(tensors) - expected
        if missing or unexpected:
            detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
            raise CheckpointError(f"checkpoint file '{path}' does not fit this model and adapter ({detail})")
        set_peft_model_state_dict(model, tensors)


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, save_embedding_layers=False)


# ---------------------------------------------------------------- QLoRA


def require_bitsandbytes(device: torch.device) -> None:
    """Check that 4-bit NF4 layers work on `device`, or fail naming what is missing."""
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # a broken install raises more than ImportError (missing libraries, CUDA setup)
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        raise LlmctlError(
            f"qlora needs bitsandbytes, which cannot be loaded ({reason}); "
            "install it with: pip install 'bitsandbytes>=0.43', or use llmctl finetune --lora"
        ) from exc
    try:
        probe = bnb.nn.Linear4bit(
            NF4_BLOCK,
            NF4_BLOCK,
            bias=False,
            compute_dtype=torch.float32,
            compress_statistics=True,
            quant_type="nf4",
        )
        probe.to(device)(torch.zeros(1, NF4_BLOCK, device=device))
    except Exception as exc:  # the backend for this device is what fails here
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        raise LlmctlError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run 4-bit layers on {device} "
            f"({reason}); "
            "install a bitsandbytes build for this device (bitsandbytes >= 0.45 for CPUs), "
            "or use llmctl finetune --lora"
        ) from exc


def paged_adamw_8bit(model: nn.Module, train: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """bitsandbytes' paged 8-bit AdamW (CUDA only): 8-bit moments, paged to host memory under pressure."""
    import bitsandbytes as bnb

    from llmctl.train.optim import param_groups

    groups = [group for group in param_groups(model, train.weight_decay) if group["params"]]
    return bnb.optim.PagedAdamW8bit(groups, lr=train.lr, betas=(train.beta1, train.beta2))


def compute_dtype(device: torch.device) -> torch.dtype:
    """What the 4-bit layers dequantize to for their matmuls: bf16 (fp16 on older GPUs), fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _quantizable(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in UNQUANTIZED


def _nf4_layer(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device):
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias is not None,
        compute_dtype=dtype,
        compress_statistics=True,
        quant_type="nf4",
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        weight.contiguous(),
        requires_grad=False,
        compress_statistics=True,
        quant_type="nf4",
        blocksize=NF4_BLOCK,
    )
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    # On CPUs with AVX512-BF16, an eval-mode forward without gradients would repack the weight in
    # place for a bf16 kernel: evaluation would then differ from training, and training after an
    # evaluation would run through that kernel, which passes no gradient to the layer's input.
    layer.support_avx512bf16_for_cpu = False
    return layer.to(device)  # moving the weight to a device is what quantizes it


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantize_model(model: nn.Module, device: torch.device) -> int:
    """Replace the model's quantizable linear layers with NF4 Linear4bit ones; returns how many."""
    dtype = compute_dtype(device)
    targets = [(name, module) for name, module in model.named_modules() if _quantizable(name, module)]
    for name, module in targets:
        _set_submodule(model, name, _nf4_layer(module.weight.data, module.bias, dtype, device))
    model.is_loaded_in_4bit = True  # peft's signal to wrap these layers with its 4-bit LoRA layer
    return len(targets)


def load_quantized_base(path: Path, config: RunConfig, device: torch.device) -> Transformer:
    """A full checkpoint's Transformer with its linear layers in NF4, read tensor by tensor: each
    matrix is quantized as it is read, so peak memory stays near the quantized model's size.
    A Hugging Face model directory (other names, maybe sharded) is read whole, then quantized."""
    if is_hf_model_dir(path):
        model = load_full_model(path, config)
        quantize_model(model, device)
        return model.to(device)
    weights = path / FullModelIO.weights_file
    with torch.device("meta"):
        model = Transformer(config.model)
    quantized = {name for name, module in model.named_modules() if _quantizable(name, module)}
    dtype = compute_dtype(device)
    try:
        with safe_open(str(weights), framework="pt") as tensors:
            names = set(tensors.keys())
            for name in quantized:
                bias = tensors.get_tensor(f"{name}.bias") if f"{name}.bias" in names else None
                _set_submodule(
                    model, name, _nf4_layer(tensors.get_tensor(f"{name}.weight"), bias, dtype, device)
                )
            rest = {n: tensors.get_tensor(n) for n in names if n.rsplit(".", 1)[0] not in quantized}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint file '{weights}' is corrupt or truncated ({exc})") from exc
    model.load_state_dict(rest, strict=False, assign=True)
    missing = [name for name, param in model.named_parameters() if param.is_meta]
    if missing:
        raise CheckpointError(f"checkpoint file '{weights}' does not fit this model (missing {missing[:3]})")
    model.is_loaded_in_4bit = True
    return model.to(device)


def fake_quantize(model: nn.Module) -> None:
    """Replace each quantizable weight by its NF4 round trip: the base a QLoRA adapter was trained on."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    with torch.no_grad():
        for name, module in model.named_modules():
            if _quantizable(name, module):
                weight = module.weight.data
                packed, state = quantize_4bit(
                    weight.float().contiguous(),
                    blocksize=NF4_BLOCK,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                module.weight.data = dequantize_4bit(packed, state).to(weight.dtype).view_as(weight)


def count_quantized(model: nn.Module) -> tuple[int, int]:
    """(parameters QLoRA quantizes, parameters it keeps in full precision) of a plain (or meta) model."""
    quantized = kept = 0
    seen: set[int] = set()
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if _quantizable(name, module) and param is module.weight:
                quantized += param.numel()
            else:
                kept += param.numel()
    return quantized, kept


# ---------------------------------------------------------------- loading and merging


def base_of(meta: dict[str, Any], adapter_dir: Path) -> Path:
    base = meta.get("base_checkpoint")
    if not base:
        raise CheckpointError(f"adapter checkpoint '{adapter_dir}' does not name its base checkpoint")
    path = Path(base)
    if not ((path / "meta.json").is_file() or is_hf_model_dir(path)):
        raise LlmctlError(
            f"the base checkpoint of adapter '{adapter_dir}' is gone ({path}); "
            "an adapter loads only with the base it was trained on"
        )
    return path


def load_checkpoint_model(path: Path, meta: dict[str, Any] | None = None) -> nn.Module:
    """The plain model (a Transformer, or a TransformerClassifier for `task: classify`) of any
    checkpoint on the CPU: full weights as they are, an adapter merged into its base."""
    meta = meta if meta is not None else read_meta(path)
    config = read_config(path)
    if meta.get("kind", "full") == "adapter":
        base = load_checkpoint_model(base_of(meta, path))
        if meta.get("task") == TASK and not isinstance(base, TransformerClassifier):
            base = classifier_from(base, len(meta["labels"]))
        return merge_adapter(base, path, quantized=config.adapter.quantize == "nf4")
    if meta.get("task") == TASK:
        classifier = TransformerClassifier(config.model, len(meta["labels"]))
        FullModelIO().load(classifier, path)
        return classifier
    return load_full_model(path, config)  # an llmctl checkpoint or a Hugging Face model directory


def load_adapter(base: nn.Module, adapter_dir: Path) -> PeftModel:
    """`base` (a plain model) wrapped with the adapter saved in `adapter_dir`, unmerged."""
    config = read_config(adapter_dir)
    model = apply_lora(base, config.adapter)
    AdapterModelIO().load(model, adapter_dir)
    return model


def merge_adapter(base: nn.Module, adapter_dir: Path, quantized: bool) -> nn.Module:
    """`base` with the adapter folded into its weights; for a QLoRA adapter, into the NF4 round trip
    of the base's weights, which is what the adapter was trained against."""
    if quantized:
        fake_quantize(base)
    return load_adapter(base, adapter_dir).merge_and_unload()
