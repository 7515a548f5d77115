"""Hugging Face model directories read as llmctl checkpoints.

    DIR/config.json                         model_type llama, mistral (without a sliding window) or gpt2
    DIR/model.safetensors                   or shards listed in model.safetensors.index.json
    DIR/tokenizer.json                      the fast tokenizer
    DIR/generation_config.json              optional sampling defaults

`hf_run_config` and `hf_model_meta` translate the directory into what an llmctl checkpoint's
config.yaml and meta.json say; `load_hf_weights` hands the stored tensors to a model built on the
meta device shard by shard, so a bf16 or sharded checkpoint never exists as a whole fp32 copy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open

from llmctl.checkpoint.files import HF_CONFIG, CheckpointError, check_finite, corrupt, on_meta, shared_aliases
from llmctl.config import GenerationConfig, ModelConfig, RunConfig
from llmctl.model import hf
from llmctl.model.transformer import Transformer

HF_GENERATION_CONFIG = "generation_config.json"
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
HF_SUPPORTED = "llama (Llama, TinyLlama, SmolLM, DeepSeek-Coder, ...), mistral without a sliding window, gpt2"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise corrupt(path, str(exc)) from exc
    if not isinstance(tree, dict):
        raise corrupt(path, "not a JSON object")
    return tree


def read_hf_config(directory: Path) -> dict[str, Any]:
    """config.json, refused with one line when its model_type is not one llmctl's model matches."""
    config = _read_json(directory / HF_CONFIG)
    model_type = config.get("model_type")
    if model_type not in ("llama", "mistral", "gpt2"):
        raise CheckpointError(
            f"'{directory}' holds a Hugging Face model of model_type '{model_type}', which llmctl "
            f"cannot load; supported: {HF_SUPPORTED}"
        )
    window = config.get("sliding_window")
    if model_type == "mistral" and window is not None and window < config.get("max_position_embeddings", 0):
        raise CheckpointError(
            f"'{directory}' is a mistral model with a {window}-token sliding window, which llmctl's "
            f"attention does not implement; supported: {HF_SUPPORTED}"
        )
    return config


def hf_model_config(directory: Path) -> ModelConfig:
    config = read_hf_config(directory)
    try:
        if config["model_type"] == "gpt2":
            return hf.from_hf_gpt2_config(config)
        # mistral without a sliding window is Llama under another name
        return hf.from_hf_llama_config({**config, "model_type": "llama"})
    except (KeyError, ValueError, ValidationError) as exc:
        reason = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
        raise CheckpointError(f"'{directory / HF_CONFIG}' cannot be loaded: {reason}") from exc


def hf_run_config(directory: Path) -> RunConfig:
    """The RunConfig a Hugging Face model directory stands for: its shape, and its sampling defaults
    from generation_config.json (greedy unless that file asks for sampling)."""
    generation: dict[str, Any] = {}
    path = directory / HF_GENERATION_CONFIG
    if path.is_file():
        saved = _read_json(path)
        if saved.get("do_sample"):
            keys = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")
            generation = {key: saved[key] for key in keys if saved.get(key) is not None}
        else:
            generation = {"temperature": 0.0}
    try:
        sampling = GenerationConfig.model_validate(generation)
    except ValidationError:  # odd sampling values are no reason to refuse the weights
        sampling = GenerationConfig()
    return RunConfig(model=hf_model_config(directory), generation=sampling)


def hf_weight_files(directory: Path) -> list[Path]:
    """The safetensors files holding a Hugging Face model's weights, shard by shard."""
    index = directory / HF_WEIGHTS_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map") or {}
        files = [directory / name for name in sorted(set(weight_map.values()))]
    elif (directory / HF_WEIGHTS).is_file():
        files = [directory / HF_WEIGHTS]
    else:
        raise CheckpointError(
            f"'{directory}' has neither {HF_WEIGHTS} nor {HF_WEIGHTS_INDEX}; llmctl reads safetensors "
            "weights only (save with safe_serialization=True)"
        )
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"checkpoint file '{file}' is missing (listed in {HF_WEIGHTS_INDEX})")
    return files


def hf_model_meta(directory: Path) -> dict[str, Any]:
    config = read_hf_config(directory)
    files = hf_weight_files(directory)
    return {
        "kind": "full",
        "format": "hf",
        "model_type": config["model_type"],
        "files": {file.name: file.stat().st_size for file in files},
    }


def _read_shard(path: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as tensors:
            shard = {
                name: tensors.get_tensor(name) if dtype is None else tensors.get_tensor(name).to(dtype)
                for name in tensors.keys()  # noqa: SIM118 (safe_open is not iterable)
            }
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise corrupt(path, str(exc)) from exc
    check_finite(shard, path)
    return shard


def load_hf_weights(model: Transformer, directory: Path, dtype: torch.dtype | None = None) -> None:
    """Hugging Face weights into `model`, one shard at a time (assigned as they are onto a meta-device
    model, copied into a built one)."""
    cfg, model_type = model.cfg, read_hf_config(directory)["model_type"]
    assign = on_meta(model)
    expected = set(model.state_dict()) - set(shared_aliases(model))
    loaded: set[str] = set()
    shards = (_read_shard(file, dtype) for file in hf_weight_files(directory))
    if model_type == "gpt2":  # GPT-2's fused q/k/v maps only with every tensor at hand
        shards = iter([{name: t for shard in shards for name, t in shard.items()}])
    to_ours = hf.from_hf_gpt2_state_dict if model_type == "gpt2" else hf.from_hf_llama_state_dict
    misfit = f"'{directory}' does not fit its config.json"
    for shard in shards:
        try:
            ours = to_ours(shard, cfg)
        except KeyError as exc:
            raise CheckpointError(f"{misfit} (missing {exc})") from exc
        unexpected = set(ours) - expected - {"lm_head.weight"}  # a tied head arrives as an alias
        if unexpected:
            raise CheckpointError(f"{misfit} (unexpected {sorted(unexpected)[:3]})")
        model.load_state_dict(ours, strict=False, assign=assign)
        loaded |= set(ours)
    missing = expected - loaded
    if missing:
        raise CheckpointError(f"{misfit} (missing {sorted(missing)[:3]})")
