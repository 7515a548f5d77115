"""Checkpoints on disk: one directory per step, written whole or not at all.

    runs/<run>/checkpoints/step-00001000/
        model.safetensors       weights (adapters: adapter_model.safetensors, written by peft)
        config.yaml             the resolved RunConfig
        tokenizer.json          a copy, so the checkpoint stands alone
        trainer_state.pt        optimizer, schedule, grad scaler, every RNG, data position, counters
        meta.json               step, metrics, and the size of every file above (written last)

The directory is built under a temporary name and renamed into place, so a crash leaves either
the whole checkpoint or none. meta.json's sizes catch a file truncated afterwards.
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from llmctl.config import RunConfig, validate_config
from llmctl.errors import LlmctlError
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
        model.load_state_dict(tensors, strict=False)


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
    """The checkpoint's meta.json, after checking every file it lists is there at its full size."""
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
    if (directory / FullModelIO.weights_file).is_file():
        return FullModelIO()
    if adapter_io is not None:
        return adapter_io()
    raise CheckpointError(f"checkpoint '{directory}' has no {FullModelIO.weights_file}")


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
