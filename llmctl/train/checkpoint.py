"""Checkpoints on disk: one directory per step, written whole or not at all.

    runs/<run>/checkpoints/step-00001000/
        model.safetensors       weights (adapters: adapter_model.safetensors, written by peft)
        config.yaml             the resolved RunConfig
        tokenizer.json          a copy, so the checkpoint stands alone
        trainer_state.pt        optimizer, schedule, grad scaler, every RNG, data position, counters
        meta.json               step, metrics, and the size of every file above (written last)

The directory is built under a temporary name and renamed into place, so a crash leaves either
the whole checkpoint or none. meta.json's sizes catch a file truncated afterwards.

A Hugging Face model directory (config.json, model.safetensors or shards listed by
model.safetensors.index.json, tokenizer.json) reads as a full checkpoint too: `read_meta`,
`read_config` and `FullModelIO.load` translate it, so every command that takes a checkpoint
takes one. `load_full_model` builds the model on the meta device and hands it the stored tensors
shard by shard, so a bf16 or sharded checkpoint never exists as a whole fp32 copy in memory.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from llmctl.config import GenerationConfig, ModelConfig, RunConfig, validate_config
from llmctl.errors import LlmctlError
from llmctl.model import hf
from llmctl.model.transformer import Transformer
from llmctl.workspace import atomic_dir, write_json_atomic

CHECKPOINTS_DIRNAME = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
META = "meta.json"
FORMAT_VERSION = 1


class CheckpointError(LlmctlError):
    """A checkpoint file that cannot be read; the message names it."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_step(path: Path) -> int | None:
    name = path.name
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    return None


def _corrupt(path: Path, reason: str) -> CheckpointError:
    reason = (reason.strip().splitlines() or ["unreadable"])[0][:200]
    return CheckpointError(f"checkpoint file '{path}' is corrupt or truncated ({reason})")


# ---------------------------------------------------------------- model weights


class ModelIO(Protocol):
    """How a model's trainable state goes into a checkpoint and back. Full models write every
    weight; an adapter run writes only its adapters (finetune supplies that implementation)."""

    kind: str  # 'full' or 'adapter'
    weights_file: str

    def save(self, model: nn.Module, directory: Path) -> None: ...

    def load(self, model: nn.Module, directory: Path) -> None: ...


def _shared_aliases(model: nn.Module) -> dict[str, str]:
    """Names that hold the same tensor as an earlier name (a tied lm_head) -> that earlier name."""
    first_name: dict[int, str] = {}
    aliases = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in first_name:
            aliases[name] = first_name[key]
        else:
            first_name[key] = name
    return aliases


class FullModelIO:
    kind = "full"
    weights_file = "model.safetensors"

    def save(self, model: nn.Module, directory: Path) -> None:
        # safetensors stores each tensor once; a tied lm_head is implied by the config, as in HF
        aliases = _shared_aliases(model)
        tensors = {
            name: tensor.detach().contiguous()
            for name, tensor in model.state_dict().items()
            if name not in aliases
        }
        save_file(tensors, str(directory / self.weights_file), metadata={"format": "pt"})

    def load(self, model: nn.Module, directory: Path) -> None:
        if is_hf_model_dir(directory):
            load_hf_weights(model, directory)
            return
        path = directory / self.weights_file
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise _corrupt(path, str(exc)) from exc
        expected = set(model.state_dict()) - set(_shared_aliases(model))
        missing, unexpected = expected - set(tensors), set(tensors) - expected
        if missing or unexpected:
            detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
            raise CheckpointError(f"checkpoint file '{path}' does not fit this model ({detail})")
        model.load_state_dict(tensors, strict=False, assign=_on_meta(model))


def _on_meta(model: nn.Module) -> bool:
    """A model built on the meta device takes the loaded tensors themselves (load_state_dict's
    assign=True) rather than copies into storage it does not have."""
    return any(param.is_meta for param in model.parameters())


def load_full_model(directory: Path, config: RunConfig, dtype: torch.dtype | None = None) -> Transformer:
    """The Transformer of a full checkpoint or a Hugging Face model directory, on the CPU in the
    stored dtype (or `dtype`, converted tensor by tensor as they are read)."""
    with torch.device("meta"):
        model = Transformer(config.model)
    if is_hf_model_dir(directory):
        load_hf_weights(model, directory, dtype)
    else:
        FullModelIO().load(model, directory)
        if dtype is not None:
            model.to(dtype)
    return model


# ---------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Every generator a step may draw from: Python, NumPy's global one, torch CPU and CUDA."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- write and read


def write_checkpoint(
    final: Path,
    *,
    model: nn.Module,
    model_io: ModelIO,
    config: RunConfig,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    tokenizer_file: Path | None = None,
) -> Path:
    with atomic_dir(final, overwrite=True) as staging:
        model_io.save(model, staging)
        (staging / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, staging / "tokenizer.json")
        torch.save({"format_version": FORMAT_VERSION, **trainer_state}, staging / TRAINER_STATE)
        files = {path.name: path.stat().st_size for path in sorted(staging.iterdir()) if path.is_file()}
        write_json_atomic(staging / META, {**meta, "kind": model_io.kind, "files": files})
    return final


def read_meta(directory: Path) -> dict[str, Any]:
    """The checkpoint's meta.json, after checking every file it lists is there at its full size
    (for a Hugging Face model directory, what its config.json and weight files say)."""
    if is_hf_model_dir(directory):
        return hf_model_meta(directory)
    path = directory / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"'{directory}' is not a checkpoint: it has no {META}") from exc
    except (OSError, ValueError) as exc:
        raise _corrupt(path, str(exc)) from exc
    for name, size in meta.get("files", {}).items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file '{file}' is missing")
        if file.stat().st_size != size:
            raise _corrupt(file, f"{file.stat().st_size} bytes, expected {size}")
    return meta


def read_config(directory: Path) -> RunConfig:
    if is_hf_model_dir(directory):
        return hf_run_config(directory)
    path = directory / "config.yaml"
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise _corrupt(path, str(exc)) from exc
    return validate_config(tree or {})


def load_trainer_state(directory: Path) -> dict[str, Any]:
    path = directory / TRAINER_STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a damaged zip or pickle
        raise _corrupt(path, f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise _corrupt(path, "not an llmctl trainer state")
    return state


def model_io_for(directory: Path, adapter_io: Callable[[], ModelIO] | None = None) -> ModelIO:
    """The ModelIO that reads this checkpoint's weights."""
    if (directory / FullModelIO.weights_file).is_file() or is_hf_model_dir(directory):
        return FullModelIO()
    if adapter_io is not None:
        return adapter_io()
    raise CheckpointError(f"checkpoint '{directory}' has no {FullModelIO.weights_file}")


# ---------------------------------------------------------------- Hugging Face model directories

HF_CONFIG = "config.json"
HF_GENERATION_CONFIG = "generation_config.json"
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
HF_SUPPORTED = "llama (Llama, TinyLlama, SmolLM, DeepSeek-Coder, ...), mistral without a sliding window, gpt2"


def is_hf_model_dir(directory: Path) -> bool:
    """A Hugging Face model directory: a config.json, and no llmctl meta.json."""
    return (directory / HF_CONFIG).is_file() and not (directory / META).is_file()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _corrupt(path, str(exc)) from exc
    if not isinstance(tree, dict):
        raise _corrupt(path, "not a JSON object")
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
            return {
                name: tensors.get_tensor(name) if dtype is None else tensors.get_tensor(name).to(dtype)
                for name in tensors.keys()  # noqa: SIM118 (safe_open is not iterable)
            }
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _corrupt(path, str(exc)) from exc


def load_hf_weights(model: Transformer, directory: Path, dtype: torch.dtype | None = None) -> None:
    """Hugging Face weights into `model`, one shard at a time (assigned as they are onto a meta-device
    model, copied into a built one)."""
    cfg, model_type = model.cfg, read_hf_config(directory)["model_type"]
    assign = _on_meta(model)
    expected = set(model.state_dict()) - set(_shared_aliases(model))
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


# ---------------------------------------------------------------- a run's checkpoints


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Whole checkpoint directories of a run, oldest first (staging directories are skipped)."""
    root = run_dir / CHECKPOINTS_DIRNAME
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if path.is_dir() and checkpoint_step(path) is not None]
    return sorted(found, key=checkpoint_step)


def select_resume_checkpoint(run_dir: Path, fallback: bool, on_skip: Callable[[str], None]) -> Path:
    """The latest checkpoint whose files are whole. A damaged latest one is an error naming the file,
    unless `fallback` allows stepping back to the newest good one (reported through on_skip)."""
    candidates = list_checkpoints(run_dir)
    if not candidates:
        raise LlmctlError(
            f"run '{run_dir.name}' has no checkpoint to resume from in {run_dir / CHECKPOINTS_DIRNAME}; "
            "start it again with --overwrite"
        )
    for directory in reversed(candidates):
        try:
            read_meta(directory)
            load_trainer_state(directory)
            return directory
        except CheckpointError as exc:
            if not fallback:
                raise CheckpointError(
                    f"{exc.message}; pass --fallback to resume from the newest good checkpoint"
                ) from exc
            on_skip(exc.message)
    raise LlmctlError(f"run '{run_dir.name}' has no readable checkpoint; start it again with --overwrite")
