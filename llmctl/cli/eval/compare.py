"""`llmctl eval compare`: the same evals over several checkpoints, in one table."""

from __future__ import annotations

from pathlib import Path

import typer

from llmctl.cli.common import DEVICE, DTYPE, note, out, print_json, workspace
from llmctl.cli.eval.sandbox_notes import DEFAULT_WORKERS
from llmctl.errors import UsageError


def compare(
    refs: list[str] = typer.Argument(
        None,
        metavar="REF",
        show_default=False,
        help="Checkpoints: RUN, RUN:best, RUN:latest, RUN:step-N or checkpoint directories.",
    ),
    run: str = typer.Option(None, "--run", help="Compare every checkpoint of this run, oldest first."),
    evals: str = typer.Option("perplexity,probes", "--evals", help="Evals to run: perplexity and/or probes."),
    corpus: str = typer.Option(None, "--corpus", "-c", help="Perplexity on this corpus's validation split."),
    file: Path = typer.Option(None, "--file", "-f", help="Perplexity on this UTF-8 text file."),
    stride: int = typer.Option(
        None,
        "--stride",
        min=1,
        show_default=False,
        help="Perplexity's window stride \\[default: half the context].",
    ),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Windows or prompts read at once."),
    workers: int = typer.Option(DEFAULT_WORKERS, "--workers", min=1, help="Probe tests run at once."),
    plot: Path = typer.Option(None, "--plot", help="Also draw the comparison as a PNG."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Run the same evals over several checkpoints and print one table (and a figure with --plot).

    Examples:

      llmctl eval compare code-base:step-1000 code-base:step-2000 --corpus code --plot compare.png

      llmctl eval compare --run code-base --evals probes
    """
    from llmctl.eval.compare import checkpoint_refs, compare_checkpoints, parse_evals, plot_comparison
    from llmctl.eval.perplexity import text_source

    chosen = parse_evals(evals)
    if "perplexity" in chosen and corpus is None and file is None:
        raise UsageError(
            "perplexity needs --corpus NAME or --file PATH (or compare only probes: --evals probes)"
        )
    ws = workspace()
    refs = checkpoint_refs(ws, refs or [], run)
    source, texts = text_source(ws, corpus, file) if "perplexity" in chosen else (None, None)
    rows = compare_checkpoints(
        ws,
        refs,
        chosen,
        texts=texts,
        source=source,
        stride=stride,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        workers=workers,
        on_result=_report_checkpoint,
    )
    document = {"kind": "compare", "evals": chosen, "source": source, "checkpoints": rows}
    if plot is not None:
        document["plot"] = str(plot_comparison(rows, plot.resolve()))
    if as_json:
        print_json(document)
    else:
        _render_comparison(document)


def _report_checkpoint(row: dict) -> None:
    figures = []
    if "perplexity" in row:
        figures.append(f"bits per byte {row['perplexity']['bits_per_byte']:.4f}")
    if "probes" in row:
        figures.append(f"probes {row['probes']['score']:.2f}")
    note(f"{row['model']}: {' · '.join(figures)}")


SHORT_CATEGORY_NAMES = {
    "bracket": "brackets",
    "keyword": "words",
    "indentation": "indent",
    "function_body": "body",
}


def _render_comparison(document: dict) -> None:
    from rich import box
    from rich.table import Table

    from llmctl.eval.perplexity import name_source
    from llmctl.eval.probes import CATEGORIES

    rows = document["checkpoints"]
    title = "compare" + (f" · perplexity on {name_source(document['source'])}" if document["source"] else "")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)  # light rules: many columns
    figures = ["step"]
    if "perplexity" in document["evals"]:
        figures += ["loss", "ppl", "bpb"]
    # each probe category gets a column where the console has room; --json and --plot always have them
    categories = CATEGORIES if "perplexity" not in document["evals"] or out.width >= 110 else ()
    if "probes" in document["evals"]:
        figures += ["probes", *(SHORT_CATEGORY_NAMES.get(category, category) for category in categories)]
    table.add_column("checkpoint", overflow="fold")  # a long directory wraps; the figures never shrink
    for name in figures:
        table.add_column(name, justify="right", no_wrap=True, min_width=len(name))
    for row in rows:
        cells = [row["model"], "" if row["step"] is None else f"{row['step']:,}"]
        if "perplexity" in row:
            measured = row["perplexity"]
            cells += [
                f"{measured['loss']:.4f}",
                f"{measured['perplexity']:.2f}",
                f"{measured['bits_per_byte']:.4f}",
            ]
        if "probes" in row:
            cells += [f"{row['probes']['score']:.2f}"]
            cells += [f"{row['probes']['categories'][category]['score']:.2f}" for category in categories]
        table.add_row(*cells)
    out.print(table)
    if "plot" in document:
        out.print(f"plot: {document['plot']}", soft_wrap=True)
