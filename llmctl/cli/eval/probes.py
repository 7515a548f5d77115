"""`llmctl eval probes`: deterministic code probes with greedy decoding."""

from __future__ import annotations

import typer

from llmctl.cli.common import DEVICE, DTYPE, MODEL, out, print_json, workspace
from llmctl.cli.eval.sandbox_notes import DEFAULT_WORKERS, say_how_confined


def probes(
    model: str = MODEL,
    batch_size: int = typer.Option(16, "--batch-size", "-b", min=1, help="Prompts generated at once."),
    workers: int = typer.Option(
        DEFAULT_WORKERS, "--workers", min=1, help="Function-body tests run at once (in the sandbox)."
    ),
    device: str = DEVICE,
    dtype: str = DTYPE,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document, with every continuation."),
) -> None:
    """Deterministic code probes with greedy decoding, each category scored 0 to 1.

    Bracket closing, keyword completion, indentation after a colon, function bodies that pass
    their tests, and the share of generated functions that parse.

    Example: llmctl eval probes --model code-base:step-2000
    """
    from llmctl.eval.probes import run_probes
    from llmctl.eval.results import describe_checkpoint, record
    from llmctl.eval.sandbox import sandbox_profile
    from llmctl.generate import load_engine

    ws = workspace()
    loaded = load_engine(ws, model, device, dtype)
    say_how_confined(sandbox_profile())
    scores = run_probes(loaded.engine, batch_size=batch_size, workers=workers)
    summary = {
        "kind": "probes",
        **describe_checkpoint(ws, model, loaded.path),
        **scores,
        "dtype": loaded.engine.dtype,
    }
    summary["eval_id"] = record(ws, "probes", summary)
    if as_json:
        print_json(summary)
    else:
        _render_probes(summary)


def _render_probes(summary: dict) -> None:
    from rich.table import Table

    table = Table(title=f"probes {summary['probe_set']} · {summary['model']}", title_justify="left")
    table.add_column("probe")
    table.add_column("score", justify="right")
    table.add_column("passed", justify="right")
    for category, figures in summary["categories"].items():
        table.add_row(
            category.replace("_", " "), f"{figures['score']:.2f}", f"{figures['passed']}/{figures['total']}"
        )
    table.add_row("mean", f"{summary['score']:.2f}", "", style="bold")
    out.print(table)
