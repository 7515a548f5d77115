"""A run's history as every tracker mirrors it, read from its event stream alone.

A resumed run appends a new `start` at its checkpoint's step and redoes the steps after it, so
events.jsonl may hold a step twice; the later events are the ones that count (docs/events.md), as
`monitor` and `plot` read them. `effective` applies that rule once for every sink, live or
rebuilding a mirror after the fact. No torch here, nor any tracker's library.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from llmctl.events import as_float, read_events
from llmctl.workspace import EVENTS_FILE, RUN_CONFIG

MIRRORED = ("start", "train", "eval", "checkpoint", "sample", "alert", "end")  # heartbeats are not
SCALAR_EVENTS = ("train", "eval")  # whose figures become a tracker's time series
_NOT_FIGURES = {"ts", "event", "step"}
_NONFINITE = ("nan", "inf", "-inf")  # how the log writes non-finite floats


def effective(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events that count, in order: each `start` drops what earlier sessions wrote past its step."""
    kept: list[dict[str, Any]] = []
    for record in records:
        kind = record.get("event")
        if kind not in MIRRORED:
            continue
        if kind == "start":
            step = int(record.get("step", 0))
            kept = [earlier for earlier in kept if int(earlier.get("step", 0)) <= step]
        kept.append(record)
    return kept


def run_history(run_dir: Path) -> list[dict[str, Any]]:
    """The effective events of the run in `run_dir`."""
    return effective(read_events(run_dir / EVENTS_FILE))


def figures(record: Mapping[str, Any]) -> dict[str, float]:
    """A train or eval event's numeric figures under their tracker names (`train/loss`,
    `eval/val_loss`): every number the event holds, so a stage's own figures come along."""
    prefix = record["event"]
    found: dict[str, float] = {}
    for key, value in record.items():
        if key in _NOT_FIGURES or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) or value in _NONFINITE:
            found[f"{prefix}/{key}"] = float(as_float(value))  # type: ignore[arg-type]
    return found


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config (runs/<run>/config.yaml) as a nested dict; {} when absent."""
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        return {}
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    return loaded if isinstance(loaded, dict) else {}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4}; lists stay whole."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def start_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """What a start event says about the run (stage, device, params, ...), without the bookkeeping."""
    return {k: v for k, v in record.items() if k not in ("ts", "event", "step", "pid", "resumed")}
