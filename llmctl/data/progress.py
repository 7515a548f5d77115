"""Progress reporting the library can use without knowing about terminals.

Library functions take a `Progress` and call `task(...)`; the CLI passes `RichProgress`, tests and
scripts the silent default. Bars appear only on a terminal and only once a task has run for a
second, so quick steps do not flicker.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

Advance = Callable[..., None]
_SHOW_AFTER_S = 1.0


class Progress:
    """The silent default: every task's advance does nothing."""

    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None, in_bytes: bool = False) -> Iterator[Advance]:
        """A context whose value advances the task by an amount (1 by default; bytes with in_bytes)."""
        yield lambda amount=1: None


class RichProgress(Progress):
    def __init__(self, console: Console):
        self.console = console

    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None, in_bytes: bool = False) -> Iterator[Advance]:
        if not self.console.is_terminal:
            yield lambda amount=1: None
            return
        from rich import progress as rich_progress

        bars = rich_progress.Progress(
            rich_progress.TextColumn("{task.description}"),
            rich_progress.BarColumn(),
            rich_progress.DownloadColumn() if in_bytes else rich_progress.MofNCompleteColumn(),
            rich_progress.TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        task_id = bars.add_task(description, total=total)
        started = time.monotonic()
        shown = False

        def advance(amount: float = 1) -> None:
            nonlocal shown
            bars.advance(task_id, amount)
            if not shown and time.monotonic() - started > _SHOW_AFTER_S:
                bars.start()
                shown = True

        try:
            yield advance
        finally:
            if shown:
                bars.stop()
