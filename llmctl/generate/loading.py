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
from llmctl.generate.engine import Engine
from llmctl.model.decode_dtype import resolve_decode_dtype
from llmctl.model.device import resolve_device
from llmctl.workspace import Workspace


@dataclass
class LoadedEngine:
    engine: Engine
    ref: str
    path: Path  # the checkpoint directory
    config: RunConfig  # the checkpoint's; `config.generation` holds its sampling defaults


def load_engine(
    workspace: Workspace, ref: str, device: str = "auto", dtype: str | None = None
) -> LoadedEngine:
    """The model `ref` names (see llmctl.checkpoint.refs), on `device`, its weights converted once
    to `dtype` (fp32, bf16, fp16, int8 or auto; None: the checkpoint's `generation.dtype`)."""
    torch_device = resolve_device(device)
    if dtype is not None:
        resolve_decode_dtype(dtype, torch_device)  # a bad --dtype fails before the model loads
    loaded = load_model(workspace, ref, device=torch_device)
    name = resolve_decode_dtype(dtype or loaded.config.generation.dtype, torch_device)
    engine = Engine(loaded.model, loaded.tokenizer, device=torch_device, dtype=name)
    loaded.config.generation.dtype = engine.dtype  # what it resolved to, in every config shown
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
