"""`--jobs N`: N processes on this machine, each running trials of one study (Optuna's storage hands
each its own trial numbers). A terminal's Ctrl-C reaches them all (one process group); a SIGTERM to
this one is passed on to each."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def run_jobs(argv: list[str], jobs: int) -> int:
    """Run `jobs` copies of `llmctl ARGV` at once and wait for them; the first failure's exit code."""
    env = dict(os.environ)
    # N processes on the CPU share its cores instead of each taking them all
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    processes = [subprocess.Popen([sys.executable, "-m", "llmctl", *argv], env=env) for _ in range(jobs)]

    def pass_on(signum: int, frame: object) -> None:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, pass_on),
        signal.SIGINT: signal.signal(signal.SIGINT, lambda signum, frame: None),  # they heard it too
    }
    try:
        codes = [process.wait() for process in processes]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return next((code for code in codes if code), 0)
