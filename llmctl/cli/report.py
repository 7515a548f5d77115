"""`llmctl report`: mirror a recorded run to experiment trackers from its events.jsonl alone."""

from __future__ import annotations

import typer

from llmctl.cli.common import note, success, workspace


def report(
    run: str = typer.Argument(..., help="A run name, or a run directory (with events.jsonl) from elsewhere."),
    to: str = typer.Option(
        ..., "--to", help="Trackers, comma-separated: tensorboard, wandb, mlflow.", show_default=False
    ),
    group: str = typer.Option(None, "--group", help="Group the mirror with others (W&B group, MLflow tag)."),
) -> None:
    """Mirror a finished or old run to TensorBoard, W&B or MLflow, from its event stream.

    Works for runs trained without --report-to, or on a machine where the tracker was not
    installed. Each step appears once, with the values of its latest session.

    Examples: llmctl report code-base --to tensorboard · llmctl report code-base --to wandb,mlflow
    """
    from llmctl.config import tracker_names
    from llmctl.errors import UsageError
    from llmctl.monitor.runs import resolve_log
    from llmctl.train.trackers import mirror_run

    try:
        names = tracker_names(to)
    except ValueError as exc:
        raise UsageError(f"--to: {exc}") from None
    if not names:
        raise UsageError("--to names no tracker; give tensorboard, wandb or mlflow")
    ws = workspace()
    name, log = resolve_log(ws, run)
    mirrored = mirror_run(ws, name, log.parent, names, group=group)
    for done in mirrored:
        success(f"{done.tracker}: {done.where}")
    if mirrored and not mirrored[0].ended:
        note(
            f"run '{name}' has no end event (still training, or killed) at step {mirrored[0].last_step:,}: "
            "TensorBoard has every step, MLflow and W&B the steps up to its last checkpoint"
        )
