"""`llmctl plot`: training curves of one or more runs as a PNG."""

from __future__ import annotations

from pathlib import Path

import typer

from llmctl.cli.common import success, workspace


def plot(
    runs: list[str] = typer.Argument(
        ..., help="Run names (or run directories, or events.jsonl files) to compare."
    ),
    out_path: Path = typer.Option(Path("curves.png"), "--out", "-o", help="The PNG to write."),
) -> None:
    """Train and val loss, val perplexity and learning rate over steps, several runs on one figure.

    Examples: llmctl plot code-base --out curves.png · llmctl plot base-a base-b -o compare.png
    """
    from llmctl.monitor.plot import plot_runs
    from llmctl.monitor.runs import resolve_log

    ws = workspace()
    logs = dict(resolve_log(ws, ref) for ref in runs)
    plot_runs(logs, out_path)
    success(f"wrote {out_path}")
