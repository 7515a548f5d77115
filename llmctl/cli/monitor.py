"""`llmctl monitor`: a live dashboard of a training run, from a second terminal."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from llmctl.cli.common import out, workspace


def monitor(
    run: str = typer.Argument(
        None, help="Run name, run directory or events.jsonl \\[default: the most recently active run]."
    ),
    once: bool = typer.Option(
        None,
        "--once/--live",
        show_default=False,
        help="Print one frame and exit \\[default: --once when stdout is not a terminal].",
    ),
    width: int = typer.Option(
        None, "--width", min=60, help="Columns for --once \\[default: the terminal's]."
    ),
) -> None:
    """Loss chart, throughput, evaluations, checkpoints, samples and alerts, redrawn twice a second.

    Keys: q quits, r redraws now. Start it before the trainer (it waits for the log) or after the
    run ended (it shows the final summary). Reads only the registry and runs/<run>/events.jsonl.

    Examples: llmctl monitor · llmctl monitor code-base · llmctl monitor code-base --once --width 120
    """
    from llmctl.errors import UsageError
    from llmctl.monitor.live import run_live
    from llmctl.monitor.render import Dashboard
    from llmctl.monitor.runs import most_recent_run, resolve_log
    from llmctl.monitor.watch import RunWatch

    ws = workspace()
    once = not sys.stdout.isatty() if once is None else once
    ref = run or most_recent_run(ws)
    if ref is None:
        raise UsageError(f"no runs in {ws.root} yet; name the run to wait for it: llmctl monitor RUN")
    _, log = resolve_log(ws, ref, must_exist=once)
    watch = RunWatch(log)
    if once:
        watch.refresh()
        # a console of its own: the shared one never draws wider than the terminal (80 columns in a pipe)
        console = out if width is None else Console(width=width, highlight=False)
        console.print(Dashboard(watch))
        return
    run_live(watch, out)
