"""`llmctl status`: the workspace at a glance, or one run in detail."""

from __future__ import annotations

import typer

from llmctl.cli.common import out, print_json, workspace


def status(
    run: str = typer.Argument(
        None, help="A run name (or a run directory, or an events.jsonl) to show in detail."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Devices, corpora, tokenizers and runs (state, progress, best val loss, checkpoints).

    With RUN: its config, lineage (corpus, tokenizer, base checkpoint, adapter), checkpoints
    with their metrics, evaluations and last alerts.

    Examples: llmctl status · llmctl status code-base · llmctl status --json
    """
    from llmctl.monitor.runs import resolve_log
    from llmctl.monitor.status import run_status, workspace_status

    ws = workspace()
    if run is None:
        document = workspace_status(ws)
    else:
        name, log = resolve_log(ws, run)
        document = run_status(ws, name, log)
    if as_json:
        print_json(document)
        return
    from llmctl.monitor.status_view import render_run, render_workspace

    out.print(render_workspace(document, out.width) if run is None else render_run(document))
