"""`llmctl eval classify`: accuracy and per-class figures of a classifier."""

from __future__ import annotations

import typer

from llmctl.cli.common import DEVICE, MODEL, out, print_json, workspace
from llmctl.errors import UsageError


def classify(
    model: str = MODEL,
    data: str = typer.Option(
        None,
        "--data",
        "-d",
        show_default=False,
        help="Labelled data, as finetune --task classify reads it: a .jsonl or .json "
        "file or an instruction corpus (required).",
    ),
    split: str = typer.Option("val", "--split", help="val (the examples finetuning held out), train or all."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Examples classified at once."),
    device: str = DEVICE,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Accuracy, per-class precision, recall and F1, and the confusion matrix of a classifier.

    Example: llmctl eval classify --model spam-clf --data spam.jsonl --split all
    """
    from llmctl.eval.classify import evaluate_classifier
    from llmctl.eval.results import record
    from llmctl.generate import resolve_device

    if data is None:
        raise UsageError("say what to classify: --data FILE.jsonl or --data CORPUS (labelled examples)")
    ws = workspace()
    summary = evaluate_classifier(
        ws, model, data, split, batch_size=batch_size, device=resolve_device(device)
    )
    summary["eval_id"] = record(ws, "classify", summary)
    if as_json:
        print_json(summary)
    else:
        _render_classification(summary)


def _render_classification(summary: dict) -> None:
    from rich.table import Table

    table = Table(
        title=f"classify · {summary['model']} · {summary['data']} ({summary['split']})", title_justify="left"
    )
    for name in ("class", "precision", "recall", "f1", "support"):
        table.add_column(name, justify="left" if name == "class" else "right")
    for label, figures in summary["per_class"].items():
        table.add_row(
            label,
            *(f"{figures[name]:.3f}" for name in ("precision", "recall", "f1")),
            str(figures["support"]),
        )
    macro = summary["macro"]
    table.add_row(
        "macro mean",
        *(f"{macro[name]:.3f}" for name in ("precision", "recall", "f1")),
        str(summary["examples"]),
        style="bold",
    )  # over the classes that occur (see classify.py)
    out.print(table)
    out.print(
        f"accuracy {summary['accuracy']:.2%} on {summary['examples']} examples"
        + (
            f" ({summary['skipped']} skipped: no text or a label the classifier lacks)"
            if summary["skipped"]
            else ""
        )
    )

    out.print("confusion matrix (rows: true class, columns: predicted class)")
    confusion = Table()
    confusion.add_column("")
    for label in summary["labels"]:
        confusion.add_column(label, justify="right")
    for label, row in zip(summary["labels"], summary["confusion"], strict=True):
        confusion.add_row(label, *map(str, row))
    out.print(confusion)
