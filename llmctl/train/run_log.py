"""A run's event log as the trainer writes it: rank 0 appends to runs/<run>/events.jsonl, the other
ranks write nothing, and a heartbeat line goes out whenever the trainer has been silent for
HEARTBEAT_S, so status and monitor can tell a slow step from a dead process.

Listeners hear every event rank 0 writes, as written (an experiment tracker mirroring the run, a
hyperparameter search reading its evaluations). The log stays the record: a listener that fails
is dropped with one `alert` event, and training goes on."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llmctl.events import EventWriter

HEARTBEAT_S = 30.0
HEARTBEAT_CHECK_S = 5.0

Listener = Callable[[dict[str, Any]], None]  # an event record, as written to the log


class RunLog:
    def __init__(self, path: Path | None = None, listeners: Sequence[Listener] = ()):
        self._writer = EventWriter(path) if path is not None else None
        self._listeners = list(listeners) if path is not None else []
        self._lock = threading.Lock()  # the heartbeat thread writes too
        self._last_write = time.monotonic()
        self._stop = threading.Event()

    def write(self, event: str, step: int, **figures: Any) -> None:
        if self._writer is None:
            return
        with self._lock:
            record = self._writer.write(event, step, **figures)
            self._last_write = time.monotonic()
            failed = []
            for listener in self._listeners:
                try:
                    listener(record)
                except Exception as exc:  # a mirror of the log must never stop the training
                    failed.append((listener, exc))
            for listener, exc in failed:
                self._listeners.remove(listener)
                name = getattr(listener, "name", type(listener).__name__)
                self._writer.write(
                    "alert",
                    step,
                    level="warning",
                    kind="listener_failed",
                    message=f"{name} stopped following the run: {type(exc).__name__}: {exc}"[:500],
                )

    def start_heartbeat(self, current_step: Callable[[], int]) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_CHECK_S):
                if time.monotonic() - self._last_write >= HEARTBEAT_S:
                    self.write("heartbeat", current_step())

        threading.Thread(target=beat, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        if self._writer is not None:
            self._writer.close()
