"""Following a run's log from another process: each refresh reads only what was added."""

from __future__ import annotations

import os
from pathlib import Path

from llmctl.events import EventTail
from llmctl.monitor import units
from llmctl.monitor.state import RunState


class RunWatch:
    """A run's log followed incrementally: each refresh reads only the bytes added since the last.

    A log far behind (a monitor started late on a long run) is sampled up to its newest
    FULL_READ_BYTES: one train line per slice, sized to give the curves a couple of points per
    kept point, while evaluations, checkpoints, samples, alerts and starts are all read. The
    newest part, and everything after, is read line by line. Train-derived alerts (spikes, NaN)
    older than that part are therefore not rederived (the trainer's own alerts are read).

    With `skim=True` train lines are sampled one per 4 MB everywhere: enough for a status row
    (step, last figures, liveness), without the curves.
    """

    SLICE_BYTES = 4 << 20  # events are folded slice by slice, so catching up holds one slice in memory
    FULL_READ_BYTES = 8 << 20
    MIN_SAMPLE_BYTES = 64 << 10
    SAMPLED_KINDS = ("train", "heartbeat")

    def __init__(self, log: Path, history_points: int = 1024, skim: bool = False):
        self.log = Path(log)
        self.skim = skim
        self.tail = EventTail(self.log)
        self.state = RunState(history_points)
        self._sample_bytes: int | None = None

    def refresh(self, max_bytes: int | None = None) -> int:
        """Read what is new (at most about max_bytes of it); returns the number of events folded."""
        folded = read = 0
        while True:
            start = self.tail.offset
            slice_bytes = self._next_slice()
            if max_bytes is not None:
                slice_bytes = min(slice_bytes, max_bytes - read)
            events = self.tail.poll(slice_bytes)
            if self.tail.restarted:
                self.state, start = RunState(self.state.history_points), 0
            self.state.fold([_printable(event) for event in events])
            folded += len(events)
            read += self.tail.offset - start
            if not self.catching_up or (max_bytes is not None and read >= max_bytes):
                return folded

    def _next_slice(self) -> int:
        """How much to read next, setting how (sampled or line by line)."""
        try:
            behind = os.stat(self.log).st_size - self.tail.offset
        except OSError:
            behind = 0
        to_sample = behind - self.FULL_READ_BYTES
        if self.skim or to_sample <= 0:
            self.tail.skim = self.SAMPLED_KINDS if self.skim else ()
            self._sample_bytes = None
            return self.SLICE_BYTES
        self.tail.skim = self.SAMPLED_KINDS
        if self._sample_bytes is None:
            self._sample_bytes = max(self.MIN_SAMPLE_BYTES, to_sample // (2 * self.state.history_points))
        return min(self._sample_bytes, to_sample)

    @property
    def catching_up(self) -> bool:
        return self.tail.offset < self.tail.size


def _printable(event: dict) -> dict:
    """Strings from the log reach a terminal (status, monitor), so they are escaped before anything
    reads them; train lines, the bulk of a log, are read for their figures alone."""
    return event if event.get("event") in RunWatch.SAMPLED_KINDS else units.printable_values(event)
