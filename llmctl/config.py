"""The one config model every command shares, and how it is resolved.

Resolution order, later wins: built-in defaults < preset (YAML in presets/) < --config FILE
< --set dotted.key=value < the command's dedicated flags. Everything is merged as plain
dictionaries first and validated once at the end, so an error always names the full key.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from llmctl.errors import UsageError


class _Section(BaseModel):
    # infinity and NaN are never a setting: `train.lr=inf` is refused like `nan`
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    """The transformer's shape. Names follow the Llama family."""

    n_layer: int = Field(2, ge=1)
    n_head: int = Field(4, ge=1)
    n_kv_head: int | None = Field(None, ge=1, description="grouped-query attention; None = n_head")
    d_model: int = Field(256, ge=8)
    d_ff: int | None = Field(None, ge=1, description="None = 8/3 d_model (SwiGLU) or 4 d_model (GELU)")
    context_length: int = Field(128, ge=8)
    vocab_size: int = Field(8192, ge=2)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = False
    tie_embeddings: bool = True
    position: Literal["rope", "learned"] = "rope"
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: dict[str, Any] | None = None
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = Field(1e-5, gt=0)
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})"
            )
        if self.n_head % self.kv_heads:
            raise ValueError(
                f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.kv_heads})"
            )
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp == "gelu":
            return 4 * self.d_model
        # SwiGLU's three matrices at 8/3 d match the two-matrix 4d MLP's parameters; round to 64.
        return 64 * ((int(8 * self.d_model / 3) + 63) // 64)

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: the vocabulary rounded up to a multiple of 64 for fast matmuls."""
        return 64 * ((self.vocab_size + 63) // 64)


class DataConfig(_Section):
    corpus: str | None = None
    tokenizer: str | None = None
    prompt_style: Literal["chat", "alpaca", "problem-solution"] = "chat"
    packing: bool = True
    # finetune, qlora, dpo: tokens per row (examples cut, rows packed at it); None = the stage's default
    max_length: int | None = Field(None, ge=8)


# The experiment trackers a run can be mirrored to (`train.report_to`, `--report-to`; llmctl.train.trackers)
TRACKERS = ("tensorboard", "wandb", "mlflow")


def tracker_names(value: Any) -> Any:
    """'tensorboard,wandb' (or a list of names) -> ['tensorboard', 'wandb']; 'none' or '' -> []."""
    if value is None:
        return []
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)):
        return value  # pydantic names the type it wanted
    chosen: list[str] = []
    for name in (str(n).strip().lower() for n in names):
        if name in ("", "none"):
            continue
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, TRACKERS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(f"unknown tracker '{name}'; {hint}choose from {', '.join(TRACKERS)} or none")
        if name not in chosen:
            chosen.append(name)
    return chosen


class TrainConfig(_Section):
    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(3e-5, ge=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.95, gt=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    micro_batch_size: int = Field(8, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    max_steps: int | None = Field(1000, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_time: float | None = Field(None, gt=0, description="seconds; YAML and --set accept 90s, 5m, 1h30m")
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(20, ge=1)
    save_every: int = Field(500, ge=1)
    keep_last: int = Field(3, ge=1)
    log_every: int = Field(10, ge=1)
    sample_every: int | None = Field(None, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"
    activation_checkpointing: bool = False
    seed: int = 1337
    early_stopping_patience: int | None = Field(None, ge=1)
    early_stopping_min_delta: float = Field(0.0, ge=0)
    device: str = "auto"
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> Any:
        return tracker_names(value)

    @field_validator("max_time", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("compile", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return "on" if value else "off"
        return value

    @model_validator(mode="after")
    def _floor_below_peak(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")
        return self


# What adapter.targets may name besides layer names: the blocks' attention projections, their MLP's
# projections, or both (the output head is never in a group)
LORA_TARGET_GROUPS = ("attention", "mlp", "all-linear")


class AdapterConfig(_Section):
    """LoRA / QLoRA. `quantize: nf4` is QLoRA."""

    enabled: bool = False
    # r, alpha and targets as measured (docs/benchmarks.md#what-each-method-learns): attention-only
    # adapters learned a fraction of a task full finetuning learned; every linear layer at r 16 learned it
    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: ["all-linear"])
    rslora: bool = Field(False, description="rank-stabilised scaling: alpha / sqrt(r) instead of alpha / r")
    quantize: Literal["none", "nf4"] = "none"


class DpoConfig(_Section):
    """Preference tuning (`llmctl dpo`): the loss, its strength, and where the reference comes from."""

    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    beta: float = Field(0.1, gt=0, le=10, description="how far the policy may move from the reference")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="sigmoid only: the share of flipped labels")
    precompute_reference: bool = False

    @model_validator(mode="after")
    def _smoothing_is_sigmoid(self) -> DpoConfig:
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"label smoothing applies to the sigmoid loss only, not to {self.loss}")
        return self


# Below this, sampling is greedy in all but name and the logits divided by it overflow: 0 says greedy.
MIN_TEMPERATURE = 1e-3


class GenerationConfig(_Section):
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.8, ge=0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1)
    top_p: float = Field(1.0, gt=0, le=1)
    min_p: float = Field(0.0, ge=0, lt=1)
    # beyond these the penalised logits overflow to infinities, and sampling to NaN
    repetition_penalty: float = Field(1.0, ge=0.01, le=100)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    stop: list[str] = Field(default_factory=list)
    # the weights' dtype while generating (llmctl.model.decode_dtype): auto is the fastest accurate one
    dtype: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto"

    @field_validator("temperature")
    @classmethod
    def _not_vanishing(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"use 0 for greedy decoding, or at least {MIN_TEMPERATURE}")
        return value


# Where a resolved key's value came from, lowest layer first; a key no layer set is a default.
LAYERS = ("base", "preset", "config", "set", "flag")
USER_LAYERS = ("config", "set", "flag")  # what the user typed or wrote, as against presets and bases


class RunConfig(_Section):
    preset: str | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    # dotted key -> the layer that set it (one of LAYERS), as `resolve_config` found it
    _sources: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def sources(self) -> dict[str, str]:
        """Which keys were set explicitly and by which layer (`resolve_config` records them), so
        stage code asks the config instead of re-reading the YAML and --set it was given."""
        return self._sources

    def __eq__(self, other: object) -> bool:
        # where values came from is not part of what the config is: two configs with the same
        # values are equal however they were resolved
        if not isinstance(other, RunConfig):
            return NotImplemented
        return self.__dict__ == other.__dict__

    def set_by_user(self, key: str) -> bool:
        """Whether --config, --set or a flag, rather than a default, a preset or a base, set `key`."""
        return self._sources.get(key) in USER_LAYERS

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @property
    def global_batch_size(self) -> int:
        return self.train.micro_batch_size * self.train.grad_accum_steps

    @property
    def sequence_length(self) -> int:
        """Tokens per training row: data.max_length where a stage set it, else the model's context."""
        return self.data.max_length or self.model.context_length

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.sequence_length


# ---------------------------------------------------------------- keys and values


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_leaf_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


CONFIG_KEYS: list[str] = _leaf_keys(RunConfig)


def suggest_key(key: str, candidates: Iterable[str] = CONFIG_KEYS) -> str | None:
    candidates = list(candidates)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if close:
        return close[0]
    # `train.lrr` against leaf names alone catches typos in long dotted keys
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {c.rsplit(".", 1)[-1]: c for c in candidates}
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
    return by_leaf[close[0]] if close else None


_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*$")


def parse_duration(text: str) -> float:
    """'90', '90s', '5m', '1h30m' -> seconds."""
    match = _DURATION.match(text)
    if not text.strip() or not match or not any(match.groups()):
        raise ValueError(f"'{text}' is not a duration; use forms like 90s, 5m or 1h30m")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def parse_assignment(assignment: str) -> tuple[str, Any]:
    """'train.lr=1e-4' -> ('train.lr', 1e-4). Values are read as YAML scalars."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(
            f"--set expects dotted.key=value, got '{assignment}' (for example --set train.lr=1e-4)"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and dotted not in ("model.rope_scaling",):
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _check_keys(tree: Mapping[str, Any], origin: str) -> None:
    for key in _flatten(tree):
        if key in CONFIG_KEYS:
            continue
        hint = suggest_key(key)
        fix = f"did you mean '{hint}'?" if hint else "`llmctl config keys` lists every key"
        raise UsageError(f"unknown config key '{key}' in {origin} — {fix}")


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict) and key != "rope_scaling":
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


# ---------------------------------------------------------------- presets


def presets_dir() -> Path:
    """presets/ ships inside the wheel as llmctl/presets; a source checkout keeps it at the top."""
    packaged = Path(str(resources.files("llmctl"))) / "presets"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def load_yaml_file(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"{what} '{path}' does not exist; check the path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{what} '{path}' is not UTF-8 text (byte {exc.start} cannot be read as UTF-8); save it as UTF-8"
        ) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise UsageError(f"{what} '{path}' is not valid YAML{where}: {problem}; fix the file") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{what} '{path}' must hold a mapping of sections (model:, train:, ...)")
    return data


def load_preset(name: str) -> dict[str, Any]:
    path = presets_dir() / f"{name}.yaml"
    if not path.is_file():
        names = preset_names()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of: {', '.join(names)}"
        raise UsageError(f"unknown preset '{name}' — {hint} (llmctl presets list)")
    data = load_yaml_file(path, "preset")
    _check_keys(data, f"preset '{name}'")
    return data


# ---------------------------------------------------------------- resolution


def resolve_config(
    preset: str | None = None,
    config_file: Path | None = None,
    overrides: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Merge the layers in order and validate once; the config's `sources` say which layer set
    each key.

    `base` (a saved run's config, say) sits between the defaults and the preset.
    `flags` are dotted keys from dedicated command-line options; None values are skipped.
    """
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def merge(layer: str, update: Mapping[str, Any]) -> None:
        _deep_merge(tree, update)
        sources.update(dict.fromkeys(_flatten(update), layer))

    if base:
        merge("base", base)
    if preset:
        merge("preset", {**load_preset(preset), "preset": preset})
    if config_file:
        file_tree = load_yaml_file(Path(config_file), "config file")
        _check_keys(file_tree, f"config file '{config_file}'")
        merge("config", file_tree)
    for assignment in overrides:
        key, value = parse_assignment(assignment)
        _check_keys(_nest(key, value), "--set")
        _set_dotted(tree, key, value)
        sources[key] = "set"
    for key, value in (flags or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
            sources[key] = "flag"
    config = validate_config(tree)
    config._sources = sources
    return config


def _nest(key: str, value: Any) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    _set_dotted(tree, key, value)
    return tree


def validate_config(tree: Mapping[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise UsageError(_describe(exc.errors()[0])) from exc


def _describe(error: Mapping[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        hint = suggest_key(key)
        return f"unknown config key '{key}'" + (f" — did you mean '{hint}'?" if hint else "")
    message = error["msg"].removeprefix("Value error, ")
    if not key:
        return f"invalid config: {message}"
    given = error.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"invalid value for '{key}'{shown}: {message}"
