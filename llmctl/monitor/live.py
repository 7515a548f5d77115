"""The full-screen dashboard: redrawn about twice a second; `q` quits, `r` redraws at once."""

from __future__ import annotations

import os
import select
import sys
import threading
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.live import Live

from llmctl.monitor.render import Dashboard
from llmctl.monitor.watch import RunWatch

REFRESH_S = 0.5
CATCH_UP_BYTES = 16 << 20  # read a huge log in slices this big, drawing between them


class KeyReader:
    """Single keys from the terminal (cbreak mode: no Enter needed), read in a thread.

    The terminal's settings are restored on exit whatever happened. Without a terminal on stdin
    (or without termios, on Windows) no keys are read and Ctrl-C still quits.
    """

    def __init__(self, on_key: Callable[[str], None]):
        self.on_key = on_key
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd = -1
        self._saved: Any = None

    def __enter__(self) -> KeyReader:
        try:
            import termios
            import tty
        except ImportError:
            return self
        if not sys.stdin.isatty():
            return self
        self._fd = sys.stdin.fileno()
        self._saved = termios.tcgetattr(self._fd)
        tty.setcbreak(self._fd)
        self._thread = threading.Thread(target=self._read, name="llmctl-monitor-keys", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.1)
            if ready:
                key = os.read(self._fd, 1).decode("utf-8", errors="ignore")
                if key:
                    self.on_key(key)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        if self._saved is not None:
            import termios

            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)


def run_live(watch: RunWatch, console: Console) -> None:
    """Show the dashboard until `q` or Ctrl-C, then leave the last frame on the normal screen."""
    wake, done = threading.Event(), threading.Event()

    def on_key(key: str) -> None:
        if key in ("q", "Q"):
            done.set()
        wake.set()  # `r`, or any other key, redraws now

    try:
        with (
            KeyReader(on_key),
            Live(
                Dashboard(watch, live=True),
                console=console,
                screen=True,
                auto_refresh=False,
                redirect_stdout=False,
                redirect_stderr=False,
            ) as live,
        ):
            while not done.is_set():
                watch.refresh(max_bytes=CATCH_UP_BYTES)
                live.refresh()
                if not watch.catching_up:
                    wake.wait(REFRESH_S)
                    wake.clear()
    except KeyboardInterrupt:
        pass
    watch.refresh()
    console.print(Dashboard(watch))
