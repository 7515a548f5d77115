"""What every tracker's sink shares: hearing the trainer's events, replaying a run's history, failing
quietly, and the small state file that lets a resumed run continue the same tracker run.

A sink is a Trainer listener on rank 0. It never raises into the trainer: a tracker that fails
(missing library, unreachable server, full disk) warns once, leaves one `alert` in the event stream
and goes quiet, and the training goes on. Rebuilding a mirror (`llmctl report`) replays the run's
effective history through the same code, where errors do propagate.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rich.console import Console
from rich.markup import escape

from llmctl.events import EventWriter
from llmctl.storage import write_json_atomic
from llmctl.train.trackers.history import SCALAR_EVENTS, figures, run_history
from llmctl.workspace import EVENTS_FILE

STATE_FILE = "trackers.json"  # runs/<run>/trackers.json: each tracker's run id and progress


def stderr_warning(console: Console | None = None) -> Callable[[str], None]:
    console = console or Console(stderr=True, highlight=False)
    return lambda message: console.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)


@dataclass
class Target:
    """The run a sink mirrors and where its tracker files go."""

    run: str
    run_dir: Path
    workspace_root: Path
    group: str | None = None  # a tune study's trials share their study's name
    warn: Callable[[str], None] = field(default_factory=stderr_warning)


def load_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def save_state(run_dir: Path, tracker: str, entry: dict[str, Any]) -> None:
    state = load_state(run_dir)
    state[tracker] = entry
    write_json_atomic(run_dir / STATE_FILE, state)


class Sink:
    """One tracker's mirror of one run. Subclasses open the tracker run and write to it; this class
    routes events, replays history and turns failures into one warning."""

    name: ClassVar[str]  # as train.report_to spells it
    title: ClassVar[str]  # as people write it

    def __init__(self, target: Target):
        self.target = target
        self.failed = False
        self.opened = False
        self.replaying = False  # hearing recorded history: ends do not close the tracker run
        self.last_end: dict[str, Any] | None = None
        self.last_checkpoint: int | None = None
        self.load()

    # ------------------------------------------------------------ what a tracker implements

    def load(self) -> None:
        """Import the tracker's library (ImportError when it is not installed)."""
        raise NotImplementedError

    def open(self, start: dict[str, Any]) -> None:
        """Start or continue the tracker run for this run's `start` event."""
        raise NotImplementedError

    def wants_history(self) -> bool:
        """Whether a resumed run's earlier events should be replayed into the tracker on opening."""
        return True

    def scalars(self, step: int, ts: float, values: dict[str, float]) -> None:
        raise NotImplementedError

    def checkpoint(self, record: dict[str, Any]) -> None:
        pass

    def text(self, record: dict[str, Any]) -> None:
        """A sample or an alert."""

    def ended(self, record: dict[str, Any]) -> None:
        """An end event (the run's last, or an earlier session's when replaying)."""

    def finish(self, end: dict[str, Any] | None) -> None:
        """Close the tracker run; `end` is the run's end event, None when it has none (yet)."""

    def abandon(self) -> None:
        """Let go of the tracker after a failure, without raising."""

    def where(self) -> str:
        """Where the mirror is, for the user."""
        return ""

    # ------------------------------------------------------------ the listener

    def __call__(self, record: dict[str, Any]) -> None:
        if self.failed:
            return
        try:
            # as the log holds it (enums as their values), so live and replayed events read alike
            self.hear(json.loads(json.dumps(record)))
        except Exception as exc:  # a mirror must never stop the training
            self.fail(exc, int(record.get("step", 0)))

    def hear(self, record: dict[str, Any]) -> None:
        kind, step = record.get("event"), int(record.get("step", 0))
        if kind == "start":
            if not self.opened:
                self.open(record)
                self.opened = True
                if record.get("resumed") and not self.replaying and self.wants_history():
                    self.replay(self._earlier())
        elif not self.opened:
            return  # events before any start (a log cut at its head) have no run to go to
        elif kind in SCALAR_EVENTS:
            self.scalars(step, float(record.get("ts", 0.0)), figures(record))
        elif kind == "checkpoint":
            self.last_checkpoint = step
            self.checkpoint(record)
        elif kind in ("sample", "alert"):
            self.text(record)
        elif kind == "end":
            self.ended(record)
            self.last_end = record
            if not self.replaying:
                self.finish(record)
                self.opened = False

    def _earlier(self) -> list[dict[str, Any]]:
        """What the run's earlier sessions recorded up to the step this one resumes from: the
        effective history before this session's start (its last one)."""
        history = run_history(self.target.run_dir)
        starts = [i for i, record in enumerate(history) if record["event"] == "start"]
        return history[: starts[-1]] if starts else []

    def replay(self, records: list[dict[str, Any]]) -> None:
        """Hear recorded events without closing the tracker run at their ends."""
        self.replaying = True
        try:
            for record in records:
                self.hear(record)
        finally:
            self.replaying = False

    def rebuild(self, history: list[dict[str, Any]]) -> str:
        """Mirror a whole recorded run (`llmctl report`); returns where the mirror is."""
        self.replay(history)
        self.finish(self.last_end if history and history[-1] is self.last_end else None)
        return self.where()

    def fail(self, exc: Exception, step: int) -> None:
        self.failed = True
        message = f"{self.title} stopped mirroring run '{self.target.run}' at step {step}: "
        message += f"{type(exc).__name__}: {exc}"[:400]
        self.target.warn(
            f"{message}; the training goes on (`llmctl report {self.target.run} --to {self.name}` "
            "rebuilds the mirror from events.jsonl)"
        )
        try:
            with EventWriter(self.target.run_dir / EVENTS_FILE) as log:
                log.write("alert", step, level="warning", kind="tracker_failed", message=message)
        except OSError:
            pass  # the disk that failed the tracker may fail this too; the warning was printed
        with contextlib.suppress(Exception):
            self.abandon()


class BufferedSink(Sink):
    """A tracker that cannot take a point back (MLflow, W&B). A step reaches it once no resume can
    redo it: once a checkpoint covers the step (a resume starts after its checkpoint), or at once in
    a run with no checkpoint to resume from. A SIGKILL loses only what a resume redoes (or what its
    replay of events.jsonl fills in), so no step is written twice."""

    def __init__(self, target: Target):
        super().__init__(target)
        self.rows: dict[int, tuple[float, dict[str, float]]] = {}

    def scalars(self, step: int, ts: float, values: dict[str, float]) -> None:
        _, row = self.rows.setdefault(step, (ts, {}))
        row.update(values)

    def commit(self, rows: list[tuple[int, float, dict[str, float]]]) -> None:
        """Write finished rows (step order) to the tracker, skipping steps it already holds."""
        raise NotImplementedError

    def flush(self, below: int | None = None) -> None:
        """Commit the rows of steps before `below` (all of them when None)."""
        ready = sorted(step for step in self.rows if below is None or step < below)
        if ready:
            self.commit([(step, *self.rows.pop(step)) for step in ready])

    def final_below(self) -> int | None:
        """The rows before this step are final: those up to the last checkpoint, or all of them
        while there is no checkpoint to resume from."""
        return None if self.last_checkpoint is None else self.last_checkpoint + 1

    def hear(self, record: dict[str, Any]) -> None:
        kind, step = record.get("event"), int(record.get("step", 0))
        if kind == "end" and self.opened:
            # before the tracker run closes; a run that ended past its last checkpoint (an error)
            # redoes the rest if it is resumed
            self.flush(below=self.final_below())
        super().hear(record)
        if kind == "checkpoint" and self.opened:
            # a sample or the final evaluation may still come at the checkpoint's own step
            self.flush(below=step)
        elif kind == "start" and record.get("resumed") and not self.replaying:
            self.flush(below=step + 1)  # what the replay refilled is final

    def rebuild(self, history: list[dict[str, Any]]) -> str:
        self.replay(history)
        self.flush(below=self.final_below())  # a run that did not end redoes what follows its checkpoint
        self.finish(self.last_end if history and history[-1] is self.last_end else None)
        return self.where()
