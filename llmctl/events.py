"""The event stream: one JSON object per line in runs/<run>/events.jsonl.

Every line has `ts` (Unix seconds), `event` and `step`, then the event's figures. JSON has no
NaN or infinity, so non-finite floats are written as the strings "nan", "inf" and "-inf";
`as_float` reads them back. The writer appends whole lines with one write each (O_APPEND keeps
concurrent appends from interleaving); the reader tolerates a partial last line, a truncated or
replaced file, and reads only the bytes added since its last call.

This module must stay free of torch: status and monitor import it.
"""

from __future__ import annotations

import enum
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVENT_KINDS = ("start", "train", "eval", "checkpoint", "sample", "alert", "heartbeat", "end")

# The figures of a `train` event, as the trainer writes them and every reader (status, monitor,
# plot, the page) reads them; docs/events.md describes each.
TRAIN_FIGURES = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_bytes", "tokens", "elapsed_s")
# The figures every `eval` event has; a stage's loss may add its own `val_<name>` (val_accuracy)
EVAL_FIGURES = ("val_loss", "val_ppl", "val_bpb")
# What a preference stage (dpo) adds to its `train` events, and as `val_<name>` to its `eval` events
PREFERENCE_FIGURES = ("rewards_chosen", "rewards_rejected", "reward_margin", "preference_accuracy")


class EndReason(str, enum.Enum):
    """Why a run ended: the `reason` of its `end` event and the registry's `end_reason`."""

    FINISHED = "finished"  # train.max_steps reached
    MAX_TIME = "max_time"
    MAX_TOKENS = "max_tokens"
    EARLY_STOPPING = "early_stopping"
    INTERRUPTED = "interrupted"  # SIGINT or SIGTERM: a checkpoint was written, --resume continues it
    PRUNED = "pruned"  # a hyperparameter search stopped the trial after an evaluation
    NONFINITE_LOSS = "nonfinite_loss"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value

    @property
    def completed(self) -> bool:
        """The run reached one of its limits: its last checkpoint is whole and final."""
        return self in COMPLETED

    @property
    def exit_code(self) -> int:
        """The trainer process's exit status (an interruption's is 128 + the signal, set apart)."""
        return 0 if self.completed or self is EndReason.PRUNED else 1


COMPLETED = frozenset(
    {EndReason.FINISHED, EndReason.MAX_TIME, EndReason.MAX_TOKENS, EndReason.EARLY_STOPPING}
)


def jsonable(value: Any) -> Any:
    """`value` with non-finite floats as the strings the log uses (for readers printing JSON too)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def as_float(value: Any) -> float | None:
    """A figure from an event as a float ('nan'/'inf' strings included); None when absent."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class EventWriter:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, event: str, step: int, **figures: Any) -> dict[str, Any]:
        record = {"ts": round(time.time(), 3), "event": event, "step": int(step), **jsonable(figures)}
        os.write(self._fd, (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8"))
        return record

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class EventTail:
    """Incremental reader. `poll()` returns the complete new events since the last call.

    `restarted` is set when the file was truncated or replaced since the last poll (the caller
    should drop what it derived from the old contents, since poll now reads from the start).
    A file truncated and rewritten past the old offset between two polls is caught by its first
    bytes changing. `poll(max_bytes=...)` reads at most that much, so a reader catching up on a
    huge log can draw between slices; `size - offset` is what is left to read.

    `skim` names event kinds a reader needs only the latest of (status wants the last `train`
    line, not a million of them): their lines are recognised by bytes, not parsed, except the last
    one of each chunk read, which keeps its place in the order. It may change between polls.
    """

    path: Path
    skim: tuple[str, ...] = ()
    offset: int = 0
    size: int = 0
    restarted: bool = False
    malformed_lines: int = 0
    _identity: tuple[int, int] | None = None
    _head: bytes = b""
    _partial: bytes = b""
    _chunk: int = field(default=8 << 20, repr=False)

    _HEAD_BYTES = 64

    def poll(self, max_bytes: int | None = None) -> list[dict[str, Any]]:
        self.restarted = False
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return []
        identity = (stat.st_dev, stat.st_ino)
        self.size = stat.st_size
        if self._identity is not None and (identity != self._identity or stat.st_size < self.offset):
            self._restart()
        self._identity = identity
        if stat.st_size == self.offset:
            return []
        events: list[dict[str, Any]] = []
        remaining = max_bytes
        with open(self.path, "rb") as handle:
            if self._head and handle.read(len(self._head)) != self._head:
                self._restart()
            handle.seek(self.offset)
            while remaining is None or remaining > 0:
                data = handle.read(self._chunk if remaining is None else min(self._chunk, remaining))
                if not data:
                    break
                if self.offset < self._HEAD_BYTES:
                    self._head = (self._head + data)[: self._HEAD_BYTES]
                self.offset += len(data)
                if remaining is not None:
                    remaining -= len(data)
                lines = (self._partial + data).split(b"\n")
                self._partial = lines.pop()
                events.extend(self._parse(lines))
        return events

    def _restart(self) -> None:
        self.offset, self._head, self._partial, self.restarted = 0, b"", b"", True

    def _parse(self, lines: list[bytes]) -> list[dict[str, Any]]:
        parsed: list[dict[str, Any]] = []
        # the writer's compact separators; a line written otherwise is simply parsed
        markers = tuple(f'"event":"{kind}"'.encode() for kind in self.skim)
        skimmed: dict[bytes, tuple[int, int, bytes]] = {}  # per kind: where its latest line belongs
        for number, line in enumerate(lines):
            for marker in markers:
                if marker in line:
                    skimmed[marker] = (len(parsed), number, line)
                    break
            else:
                self._parse_line(line, parsed)
        # insert from the back so earlier positions stay valid
        for position, _, line in sorted(skimmed.values(), reverse=True):
            kept: list[dict[str, Any]] = []
            self._parse_line(line, kept)
            parsed[position:position] = kept
        return parsed

    def _parse_line(self, line: bytes, into: list[dict[str, Any]]) -> None:
        if not line.strip():
            return
        try:
            record = json.loads(line)
        except ValueError:
            self.malformed_lines += 1
            return
        if isinstance(record, dict) and "event" in record:
            into.append(record)
        else:
            self.malformed_lines += 1


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every complete event in a log (a convenience for small logs and tests)."""
    return EventTail(Path(path)).poll()
