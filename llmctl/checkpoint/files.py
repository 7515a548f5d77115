"""Checkpoints on disk: one directory per step, written whole or not at all.

    runs/<run>/checkpoints/step-00001000/
        model.safetensors       weights (adapters: adapter_model.safetensors, written by peft)
        config.yaml             the resolved RunConfig
        tokenizer.json          a copy, so the checkpoint stands alone
        trainer_state.pt        optimizer, schedule, grad scaler, every RNG, data position, counters
        meta.json               step, metrics, and the size of every file above (written last)

The directory is built under a temporary name and renamed into place, so a crash leaves either
the whole checkpoint or none. meta.json's sizes catch a file truncated afterwards.

A Hugging Face model directory (hf_dir) reads as a full checkpoint too: `read_meta` and
`read_config` translate it, so every command that takes a checkpoint takes one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from llmctl.config import RunConfig, validate_config
from llmctl.errors import LlmctlError
from llmctl.storage import atomic_dir, write_json_atomic
from llmctl.workspace import CHECKPOINTS_DIRNAME, list_checkpoints

TRAINER_STATE = "trainer_state.pt"
META = "meta.json"
HF_CONFIG = "config.json"
FORMAT_VERSION = 1


class CheckpointError(LlmctlError):
    """A checkpoint file that cannot be read; the message names it."""


def corrupt(path: Path, reason: str) -> CheckpointError:
    reason = (reason.strip().splitlines() or ["unreadable"])[0][:200]
    return CheckpointError(f"checkpoint file '{path}' is corrupt or truncated ({reason})")


def is_hf_model_dir(directory: Path) -> bool:
    """A Hugging Face model directory: a config.json, and no llmctl meta.json."""
    return (directory / HF_CONFIG).is_file() and not (directory / META).is_file()


def checkpoint_kind(meta: dict[str, Any]) -> str:
    return meta.get("kind", "full")


# ---------------------------------------------------------------- model weights


class ModelIO(Protocol):
    """How a model's trainable state goes into a checkpoint and back. Full models write every
    weight; an adapter run writes only its adapters."""

    kind: str  # 'full' or 'adapter'
    weights_file: str

    def save(self, model: nn.Module, directory: Path) -> None: ...

    def load(self, model: nn.Module, directory: Path) -> None: ...


def shared_aliases(model: nn.Module) -> dict[str, str]:
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


def on_meta(model: nn.Module) -> bool:
    """A model built on the meta device takes the loaded tensors themselves (load_state_dict's
    assign=True) rather than copies into storage it does not have."""
    return any(param.is_meta for param in model.parameters())


def _misfit(path: Path, missing: set[str], unexpected: set[str], what: str) -> CheckpointError | None:
    if not (missing or unexpected):
        return None
    detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
    return CheckpointError(f"checkpoint file '{path}' does not fit {what} ({detail})")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise corrupt(path, str(exc)) from exc
    check_finite(tensors, path)
    return tensors


def check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Weights that load but hold NaN or infinity (a run that diverged before it was saved) are
    refused here, naming the tensor, rather than turning every output into NaN later."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(
                f"checkpoint file '{path}' holds non-finite weights (NaN or infinity) in '{name}'; "
                "load an earlier checkpoint of the run"
            )


class FullModelIO:
    kind = "full"
    weights_file = "model.safetensors"

    def save(self, model: nn.Module, directory: Path) -> None:
        # safetensors stores each tensor once; a tied lm_head is implied by the config, as in HF
        aliases = shared_aliases(model)
        tensors = {
            name: tensor.detach().contiguous()
            for name, tensor in model.state_dict().items()
            if name not in aliases
        }
        save_file(tensors, str(directory / self.weights_file), metadata={"format": "pt"})

    def load(self, model: nn.Module, directory: Path) -> None:
        path = directory / self.weights_file
        tensors = _load_safetensors(path)
        expected = set(model.state_dict()) - set(shared_aliases(model))
        error = _misfit(path, expected - set(tensors), set(tensors) - expected, "this model")
        if error:
            raise error
        model.load_state_dict(tensors, strict=False, assign=on_meta(model))


class AdapterModelIO:
    """Checkpoint weights of an adapter run, in peft's format: only the adapters (and a
    classifier's head) are written; the base is named by the checkpoint's meta.json."""

    kind = "adapter"
    weights_file = "adapter_model.safetensors"

    def save(self, model: nn.Module, directory: Path) -> None:
        from peft import get_peft_model_state_dict

        tensors = {
            name: tensor.detach().contiguous()
            for name, tensor in get_peft_model_state_dict(model, save_embedding_layers=False).items()
        }
        save_file(tensors, str(directory / self.weights_file), metadata={"format": "pt"})
        model.peft_config["default"].save_pretrained(str(directory))

    def load(self, model: nn.Module, directory: Path) -> None:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        path = directory / self.weights_file
        tensors = _load_safetensors(path)
        expected = set(get_peft_model_state_dict(model, save_embedding_layers=False))
        error = _misfit(path, expected - set(tensors), set(tensors) - expected, "this model and adapter")
        if error:
            raise error
        set_peft_model_state_dict(model, tensors)


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
    intact = "the run's earlier checkpoints are intact (--resume continues from the latest)"
    with atomic_dir(final, overwrite=True, intact=intact) as staging:
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
        from llmctl.checkpoint.hf_dir import hf_model_meta  # hf_dir builds on this module

        return hf_model_meta(directory)
    path = directory / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"'{directory}' is not a checkpoint: it has no {META}") from exc
    except (OSError, ValueError) as exc:
        raise corrupt(path, str(exc)) from exc
    for name, size in meta.get("files", {}).items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file '{file}' is missing")
        if file.stat().st_size != size:
            raise corrupt(file, f"{file.stat().st_size} bytes, expected {size}")
    return meta


def read_config(directory: Path) -> RunConfig:
    if is_hf_model_dir(directory):
        from llmctl.checkpoint.hf_dir import hf_run_config

        return hf_run_config(directory)
    path = directory / "config.yaml"
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise corrupt(path, str(exc)) from exc
    return validate_config(tree or {})


def load_trainer_state(directory: Path) -> dict[str, Any]:
    path = directory / TRAINER_STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a damaged zip or pickle
        raise corrupt(path, f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise corrupt(path, "not an llmctl trainer state")
    return state


# ---------------------------------------------------------------- a run's checkpoints


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
