"""`llmctl eval preference`: how often a model prefers the chosen reply of held-out pairs."""

from __future__ import annotations

import typer

from llmctl.cli.common import DEVICE, MODEL, out, print_json, workspace
from llmctl.errors import UsageError


def preference(
    model: str = MODEL,
    data: str = typer.Option(
        None,
        "--data",
        "-d",
        show_default=False,
        help="Preference pairs, as dpo reads them: a preference corpus or a .jsonl/.json file (required).",
    ),
    split: str = typer.Option("val", "--split", help="val (the pairs dpo held out), train or all."),
    reference: str = typer.Option(
        None,
        "--reference",
        show_default=False,
        help="The reference for the rewards \\[default: the base a dpo checkpoint was trained from].",
    ),
    beta: float = typer.Option(
        None, "--beta", show_default=False, help="Scales the rewards \\[default: the checkpoint's dpo.beta]."
    ),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Pairs scored at once."),
    device: str = DEVICE,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Preference accuracy, reward margin and rewards of a model on held-out pairs.

    Example: llmctl eval preference --model code-dpo --data prefs
    """
    from llmctl.eval.preference import evaluate_preference
    from llmctl.eval.results import record
    from llmctl.generate import resolve_device

    if data is None:
        raise UsageError("say what to score: --data CORPUS or --data FILE.jsonl (preference pairs)")
    ws = workspace()
    summary = evaluate_preference(
        ws,
        model,
        data,
        split,
        reference=reference,
        beta=beta,
        batch_size=batch_size,
        device=resolve_device(device),
    )
    summary["eval_id"] = record(ws, "preference", summary)
    if as_json:
        print_json(summary)
    else:
        _render(summary)


def _render(summary: dict) -> None:
    from rich.table import Table

    table = Table(
        title=f"preference · {summary['model']} · {summary['data']} ({summary['split']})",
        title_justify="left",
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    if "accuracy" in summary:
        table.add_row("preference accuracy", f"{summary['accuracy']:.2%}")
        table.add_row("reward margin", f"{summary['reward_margin']:.4f}")
        table.add_row(
            "rewards chosen / rejected",
            f"{summary['rewards_chosen']:.4f} / {summary['rewards_rejected']:.4f}",
        )
    table.add_row("log-prob accuracy (no reference)", f"{summary['logp_accuracy']:.2%}")
    table.add_row(
        "pairs",
        f"{summary['pairs']:,}"
        + (f" ({summary['dropped']} too long, dropped)" if summary["dropped"] else ""),
    )
    table.add_row("reference", summary["reference"] or "none (no dpo base; --reference names one)")
    table.add_row("beta", f"{summary['beta']:g}")
    out.print(table)
