"""The search space: `--param KEY=KIND:RANGE` and a config file's `search:` block, checked against
the config model before anything runs, and turned into Optuna's suggestions and `--set` overrides.

    train.lr=log:1e-4..3e-3          a float, sampled evenly in its logarithm
    train.dropout=float:0..0.3:0.05  a float, in steps of 0.05 (the step is optional)
    train.warmup_steps=int:0..200    an integer (int:LOW..HIGH:STEP also)
    model.n_layer=choice:2,4,6       one of these values (YAML scalars: 2, 1e-3, gelu, true)

In a YAML file, `search:` maps keys (dotted, or nested) to the same text, or a list for a choice.
"""

from __future__ import annotations

import json
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmctl.config import CONFIG_KEYS, RunConfig, load_yaml_file, suggest_key
from llmctl.errors import UsageError

KINDS = ("log", "float", "int", "choice")
SEARCH_BLOCK = "search"
GRID_LIMIT = 10_000  # points a grid may hold
_RANGE = re.compile(r"^\s*(?P<low>[^.][^:]*?)\s*\.\.\s*(?P<high>[^:]+?)\s*(?::\s*(?P<step>.+?))?\s*$")


@dataclass(frozen=True)
class Param:
    key: str
    kind: str
    spec: str  # as the user wrote it, for messages
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: tuple[Any, ...] = ()
    whole: bool = False  # the key takes integers: sampled as int

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return any(value == choice for choice in self.choices)
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def suggest(self, trial) -> Any:
        """This key's value in an Optuna trial: sampled, or the value the trial was queued with."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, self.choices)
        if self.whole:
            step = int(self.step or 1)
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=step, log=self.kind == "log"
            )
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.kind == "log")

    def check_values(self) -> list[Any]:
        """The values the config must accept before a trial may sample between them."""
        return (
            list(self.choices) if self.kind == "choice" else [self.native(self.low), self.native(self.high)]
        )

    def native(self, value: Any) -> Any:
        return int(value) if self.whole and self.kind != "choice" else value

    def grid_points(self) -> list[Any]:
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "log" or (not self.whole and self.step is None):
            raise UsageError(
                f"--sampler grid needs values it can list: '{self.spec}' is continuous; "
                "give it a step (float:LOW..HIGH:STEP), an int range or a choice"
            )
        step = self.step or 1
        count = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        return [self.native(round(self.low + i * step, 12)) for i in range(count)]


def _field_annotation(key: str) -> Any:
    section, _, name = key.partition(".")
    return RunConfig.model_fields[section].annotation.model_fields[name].annotation


def _value_types(annotation: Any) -> set[Any]:
    """The plain types a field takes, None dropped: {float}, {int}, {str}, {bool}, {list}..."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(
            *(_value_types(arg) for arg in typing.get_args(annotation) if arg is not type(None))
        )
    if origin is typing.Literal:
        return {"literal"}
    return {origin or annotation}


def _check_key(key: str, spec: str) -> set[Any]:
    if key not in CONFIG_KEYS or "." not in key:
        hint = suggest_key(key)
        fix = f"did you mean '{hint}'?" if hint and "." in hint else "`llmctl config keys` lists every key"
        raise UsageError(f"unknown config key '{key}' in '{spec}' — {fix}")
    return _value_types(_field_annotation(key))


def _number(text: str, whole: bool, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"'{text}' in '{spec}' is not a number") from None
    if whole and not value.is_integer():
        raise UsageError(f"'{spec}': the key takes whole numbers, and {text} is not one")
    return value


def parse_param(spec: str) -> Param:
    """One `KEY=KIND:RANGE`, checked against the config model's types (not yet its values)."""
    key, sep, rest = spec.partition("=")
    kind, colon, body = rest.partition(":")
    key, kind = key.strip(), kind.strip()
    if not sep or not colon or not key:
        raise UsageError(
            f"--param expects KEY=KIND:RANGE, got '{spec}' (for example train.lr=log:1e-4..3e-3 or "
            "model.n_layer=choice:2,4,6)"
        )
    if kind not in KINDS:
        raise UsageError(f"unknown kind '{kind}' in '{spec}'; use one of: {', '.join(KINDS)}")
    takes = _check_key(key, spec)
    if kind == "choice":
        return _choice(key, body, spec, takes)
    if takes <= {int}:
        whole = True
    elif takes <= {float, int}:
        whole = False
    else:
        raise UsageError(f"'{key}' is not a number: search it with {key}=choice:A,B,...")
    if kind == "float" and whole:
        raise UsageError(f"'{key}' takes whole numbers: search it with {key}=int:LOW..HIGH")
    whole = whole or kind == "int"
    match = _RANGE.match(body)
    if not match:
        raise UsageError(f"'{spec}': a range is LOW..HIGH (for example {kind}:1..8)")
    low, high = (_number(match[part], whole, spec) for part in ("low", "high"))
    step = _number(match["step"], whole, spec) if match["step"] else None
    if low > high:
        raise UsageError(f"'{spec}' is an empty range: LOW ({match['low']}) is above HIGH ({match['high']})")
    if low == high:
        raise UsageError(f"'{spec}' holds one value: set it with --set {key}={match['low']} instead")
    if kind == "log" and low <= 0:
        raise UsageError(f"'{spec}': a log range needs LOW above 0")
    if step is not None and (kind == "log" or step <= 0):
        raise UsageError(f"'{spec}': a step must be above 0, and a log range takes none")
    return Param(key, kind, spec, low, high, step, whole=whole)


def _choice(key: str, body: str, spec: str, takes: set[Any]) -> Param:
    values = [_scalar(part.strip(), spec) for part in body.split(",")] if body.strip() else []
    return _choice_of(key, values, spec, takes)


def _scalar(text: str, spec: str) -> Any:
    if not text:
        raise UsageError(f"'{spec}' has an empty choice; separate the values with commas")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _choice_of(key: str, values: list[Any], spec: str, takes: set[Any]) -> Param:
    if not values:
        raise UsageError(f"'{spec}' is an empty choice: give the values, as in {key}=choice:A,B")
    if takes & {list, dict}:
        raise UsageError(f"'{key}' holds a list or mapping, which cannot be searched")
    for value in values:
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise UsageError(f"'{spec}': a choice is of plain values (numbers, words, true/false)")
    if len(set(map(repr, values))) < len(values):
        raise UsageError(f"'{spec}' names a value twice")
    return Param(key, "choice", spec, choices=tuple(values))


def _search_block(block: Any, origin: str) -> list[Param]:
    if not isinstance(block, Mapping):
        raise UsageError(
            f"'{SEARCH_BLOCK}:' in {origin} must map config keys to ranges (train.lr: log:1e-4..1e-3)"
        )
    params = []
    for key, value in _flatten(block).items():
        if isinstance(value, list):
            spec = f"{key}=choice:{','.join(map(str, value))}"
            params.append(_choice_of(key, value, spec, _check_key(key, spec)))
        elif isinstance(value, str):
            params.append(parse_param(f"{key}={value}"))
        else:
            raise UsageError(
                f"'{SEARCH_BLOCK}.{key}' in {origin}: give a range as text (log:1e-4..1e-3) or a list"
            )
    return params


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]

    @property
    def specs(self) -> list[str]:
        return [param.spec for param in self.params]

    def suggest(self, trial) -> dict[str, Any]:
        """The trial's value of every key, through Optuna's sampler (or the values it was queued with)."""
        return {param.key: param.suggest(trial) for param in self.params}

    def grid(self) -> dict[str, list[Any]]:
        points = {param.key: param.grid_points() for param in self.params}
        if math.prod(len(values) for values in points.values()) > GRID_LIMIT:
            raise UsageError(f"the grid holds more than {GRID_LIMIT:,} points; use --sampler tpe or random")
        return points

    def size(self) -> int | None:
        """The number of distinct points, where the space is finite."""
        try:
            return math.prod(len(param.grid_points()) for param in self.params)
        except UsageError:
            return None


def overrides(values: Mapping[str, Any]) -> list[str]:
    """`--set` assignments for sampled values (JSON scalars read back as the same YAML scalars)."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def build_space(specs: list[str], config_file: Path | None) -> tuple[Space, dict[str, Any] | None]:
    """The space of `--param` and the config file's `search:` block (a --param wins over the block
    for the same key), and the rest of the file when it had a block (None: use the file as it is)."""
    from_file: list[Param] = []
    rest = None
    if config_file is not None:
        tree = load_yaml_file(Path(config_file), "config file")
        if SEARCH_BLOCK in tree:
            rest = {key: value for key, value in tree.items() if key != SEARCH_BLOCK}
            from_file = _search_block(tree[SEARCH_BLOCK], f"config file '{config_file}'")
    given = [parse_param(spec) for spec in specs]
    keys = [param.key for param in given]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise UsageError(f"--param {twice[0]} is given twice; give each key once")
    params = [param for param in from_file if param.key not in keys] + given
    if not params:
        raise UsageError("nothing to search: give --param KEY=KIND:RANGE (or a search: block in --config)")
    return Space(tuple(params)), rest
