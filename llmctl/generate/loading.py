"""From what a command was given to an engine: a model reference and sampling flags.

The checkpoint's own `generation:` config supplies the defaults; flags given on the command line
(or typed in chat) override them one by one, validated by the same `GenerationConfig` model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from llmctl.checkpoint.load import load_model
from llmctl.config import GenerationConfig, RunConfig
from llmctl.errors import UsageError
from llmctl.generate.engine import Engine, resolve_dtype
from llmctl.model.device import resolve_device
from llmctl.workspace import Workspace


@dataclass
class LoadedEngine:
    engine: Engine
    ref: str
    path: Path  # the checkpoint directory
    config: RunConfig  # the checkpoint's; `config.generation` holds its sampling defaults


def load_engine(
    workspace: Workspace, ref: str, device: str = "auto", precision: str = "auto"
) -> LoadedEngine:
    """The model `ref` names (see llmctl.checkpoints), on `device` in `precision`, ready to generate."""
    torch_device = resolve_device(device)
    dtype = resolve_dtype(precision, torch_device)
    loaded = load_model(workspace, ref, device=torch_device)
    engine = Engine(loaded.model, loaded.tokenizer, device=torch_device, dtype=dtype)
    return LoadedEngine(engine, ref, loaded.path, loaded.config)


def override_generation(
    base: GenerationConfig, overrides: Mapping[str, Any], names: Mapping[str, str] | None = None
) -> GenerationConfig:
    """`base` with the overrides that are not None, checked. An error names the setting as the user
    typed it: `names` maps fields to that (chat's `/temp`), else the flag (`--top-p`)."""
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return GenerationConfig.model_validate({**base.model_dump(), **given})
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "value"
        name = (names or {}).get(field, f"--{field.replace('_', '-')}")
        message = error["msg"].removeprefix("Value error, ")
        message = message[:1].lower() + message[1:]
        raise UsageError(f"invalid {name} {given.get(field)!r}: {message}") from exc
