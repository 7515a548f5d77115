"""The one loader: any checkpoint's model, on a device, in a dtype.

    a full llmctl checkpoint or a Hugging Face model directory   -> Transformer
    a classifier's checkpoint (`task: classify` in meta.json)    -> TransformerClassifier
    an adapter checkpoint                                        -> its base (named in meta.json,
                                                                    loaded by this same loader)
                                                                    with the adapter merged in
    quantize=True                                                -> the base's linear layers in
                                                                    4-bit NF4 (QLoRA's frozen base)

A full model is built on the meta device and handed the stored tensors, so a bf16 or sharded
checkpoint never exists as a whole fp32 copy in memory; a 4-bit base is quantized matrix by
matrix as it is read. peft and bitsandbytes are imported only for adapters and 4-bit bases.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from llmctl.checkpoint.files import (
    AdapterModelIO,
    CheckpointError,
    FullModelIO,
    checkpoint_kind,
    corrupt,
    is_hf_model_dir,
    read_config,
    read_meta,
)
from llmctl.checkpoint.hf_dir import load_hf_weights
from llmctl.checkpoint.refs import other_checkpoints, resolve_model_ref
from llmctl.config import RunConfig
from llmctl.errors import LlmctlError
from llmctl.model import quantize
from llmctl.model.classifier import TASK, TransformerClassifier, classifier_from
from llmctl.model.lora import apply_lora
from llmctl.model.transformer import Transformer
from llmctl.tokenizer import LoadedTokenizer, load_tokenizer_file
from llmctl.workspace import Workspace

if TYPE_CHECKING:
    from peft import PeftModel


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: LoadedTokenizer
    config: RunConfig
    path: Path  # the checkpoint directory
    meta: dict[str, Any]


def load_model(
    workspace: Workspace, ref: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> LoadedModel:
    """The model, tokenizer and config of the checkpoint `ref` names, in eval mode on `device`, in
    the stored dtype unless `dtype` is given."""
    path = resolve_model_ref(workspace, ref)
    try:
        meta = read_meta(path)  # checks every file is there at its full size
        config = read_config(path)
        model = load_weights(path, meta, config=config, dtype=dtype, device=device)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc.message}; {other_checkpoints(path)}") from exc
    tokenizer = load_tokenizer_file(path / "tokenizer.json")
    recorded = meta.get("tokenizer_sha256")
    if recorded and recorded != tokenizer.sha256:
        raise CheckpointError(
            f"'{tokenizer.path}' is not the tokenizer checkpoint '{path}' was trained with (its sha256 is "
            f"{tokenizer.sha256[:12]}, meta.json records {recorded[:12]}); copy the run's tokenizer back "
            f"beside the weights, or {other_checkpoints(path)}"
        )
    return LoadedModel(model.eval(), tokenizer, config, path, meta)


def load_weights(
    path: Path,
    meta: dict[str, Any] | None = None,
    *,
    config: RunConfig | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    quantize_base: bool = False,
    quantized_dtype: torch.dtype | None = None,
) -> nn.Module:
    """The plain model of any checkpoint (see the module's table), on `device`; a 4-bit base's
    layers compute in `quantized_dtype` (quantize.compute_dtype's default for the device)."""
    meta = meta if meta is not None else read_meta(path)
    config = config if config is not None else read_config(path)
    device = torch.device(device)
    if quantize_base and checkpoint_kind(meta) == "full" and meta.get("task") != TASK:
        return load_quantized_base(path, config, device, quantized_dtype)
    if checkpoint_kind(meta) == "adapter":
        base = load_weights(base_of(meta, path))
        if meta.get("task") == TASK and not isinstance(base, TransformerClassifier):
            base = classifier_from(base, len(meta["labels"]))
        model = merge_adapter(base, path, quantized=config.adapter.quantize == "nf4")
    elif meta.get("task") == TASK:
        model = TransformerClassifier(config.model, len(meta["labels"]))
        FullModelIO().load(model, path)
    else:
        model = _load_transformer(path, config, dtype)
    if dtype is not None:
        model = model.to(dtype)
    if quantize_base:
        quantize.quantize_model(model, device, quantized_dtype)
    return model.to(device)


def _load_transformer(directory: Path, config: RunConfig, dtype: torch.dtype | None) -> Transformer:
    """The Transformer of a full checkpoint or a Hugging Face model directory, in the stored dtype
    (or `dtype`, converted tensor by tensor as Hugging Face shards are read)."""
    with torch.device("meta"):
        model = Transformer(config.model)
    if is_hf_model_dir(directory):
        load_hf_weights(model, directory, dtype)
    else:
        FullModelIO().load(model, directory)
    return model


def load_quantized_base(
    path: Path, config: RunConfig, device: torch.device, dtype: torch.dtype | None = None
) -> Transformer:
    """A full checkpoint's Transformer with its linear layers in NF4, read tensor by tensor: each
    matrix is quantized as it is read, so peak memory stays near the quantized model's size.
    A Hugging Face model directory (other names, maybe sharded) is read whole, then quantized."""
    if is_hf_model_dir(path):
        model = _load_transformer(path, config, None)
        quantize.quantize_model(model, device, dtype)
        return model.to(device)
    weights = path / FullModelIO.weights_file
    with torch.device("meta"):
        model = Transformer(config.model)
    quantized = {name for name, module in model.named_modules() if quantize.quantizable(name, module)}
    dtype = dtype or quantize.compute_dtype(device)
    try:
        with safe_open(str(weights), framework="pt") as tensors:
            names = set(tensors.keys())
            for name in quantized:
                bias = tensors.get_tensor(f"{name}.bias") if f"{name}.bias" in names else None
                layer = quantize.nf4_layer(tensors.get_tensor(f"{name}.weight"), bias, dtype, device)
                quantize.set_submodule(model, name, layer)
            # copies: a tensor read from the file keeps its whole mapping resident (every page read)
            rest = {n: tensors.get_tensor(n).clone() for n in names if n.rsplit(".", 1)[0] not in quantized}
    except (SafetensorError, OSError) as exc:
        raise corrupt(weights, str(exc)) from exc
    model.load_state_dict(rest, strict=False, assign=True)
    missing = [name for name, param in model.named_parameters() if param.is_meta]
    if missing:
        raise CheckpointError(f"checkpoint file '{weights}' does not fit this model (missing {missing[:3]})")
    model.is_loaded_in_4bit = True
    return model.to(device)


# ---------------------------------------------------------------- adapters


def base_of(meta: dict[str, Any], adapter_dir: Path) -> Path:
    """The base checkpoint an adapter names in its meta.json."""
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


def load_adapter(base: nn.Module, adapter_dir: Path) -> PeftModel:
    """`base` (a plain model) wrapped with the adapter saved in `adapter_dir`, unmerged."""
    model = apply_lora(base, read_config(adapter_dir).adapter)
    AdapterModelIO().load(model, adapter_dir)
    return model


def merge_adapter(base: nn.Module, adapter_dir: Path, quantized: bool) -> nn.Module:
    """`base` with the adapter folded into its weights; for a QLoRA adapter, into the NF4 round trip
    of the base's weights, which is what the adapter was trained against."""
    if quantized:
        quantize.fake_quantize(base)
    return load_adapter(base, adapter_dir).merge_and_unload()
