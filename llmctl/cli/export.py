"""`llmctl export`: a checkpoint as a Hugging Face model directory, checked against transformers."""

from __future__ import annotations

from pathlib import Path

import typer

from llmctl.cli.common import MODEL_REF_HELP, note, out, print_json, success, warn, workspace


def export(
    model: str = typer.Option(..., "--model", "-m", help=f"Model: {MODEL_REF_HELP}."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Directory to write."),
    export_format: str = typer.Option(
        "hf", "--format", "-f", help="hf: a transformers model directory (the one format so far)."
    ),
    verify: bool = typer.Option(
        True,
        "--verify/--no-verify",
        help="Check logits and greedy tokens against transformers before writing.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON document."),
) -> None:
    """Export a model for transformers (an adapter is merged into its base first).

    Examples:

      llmctl export --model code-base --out exports/code-base

      llmctl export -m code-sft:latest -o exports/code-sft --overwrite --json

    Then, in Python: AutoModelForCausalLM.from_pretrained("exports/code-base")
    """
    from llmctl.errors import UsageError
    from llmctl.export.hf import FORMATS, export_hf

    if export_format not in FORMATS:
        raise UsageError(f"unknown --format '{export_format}'; use {', '.join(FORMATS)}")
    result = export_hf(workspace(), model, out_dir, verify=verify, overwrite=overwrite)
    if as_json:
        print_json(_document(result))
        return
    _show(result)


def _document(result) -> dict:
    check = result.verification
    return {
        "directory": str(result.directory),
        "source": str(result.source),
        "architecture": result.architecture,
        "params": result.params,
        "dtype": result.dtype,
        "files": result.files,
        "verification": None
        if check is None
        else {
            "prompts": check.prompts,
            "max_abs_diff": check.max_abs_diff,
            "greedy_tokens": check.greedy_tokens,
            "ok": check.ok,
        },
        "skipped_verification": result.skipped,
    }


def _show(result) -> None:
    from rich.table import Table

    from llmctl.model.sizing import human_bytes, human_count

    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("from", str(result.source))
    table.add_row("model", f"{result.architecture} · {human_count(result.params)} params · {result.dtype}")
    for name, size in result.files.items():
        table.add_row("", f"{name}  {human_bytes(size)}")
    out.print(table)
    check = result.verification
    if check is not None:
        note(
            f"round trip: {check.prompts} prompts, max |Δ logit| {check.max_abs_diff:.1e}, "
            f"{check.greedy_tokens} greedy tokens identical in transformers"
        )
    else:
        warn(f"round-trip check skipped: {result.skipped}")
    success(f"exported to {result.directory}")
