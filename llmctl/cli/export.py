"""`llmctl export`: a checkpoint as a Hugging Face model directory (checked against transformers) or
as a GGUF file for llama.cpp and Ollama (checked in llama.cpp)."""

from __future__ import annotations

from pathlib import Path

import typer

from llmctl.cli.common import MODEL_REF_HELP, note, out, print_json, success, warn, workspace

FORMATS = ("hf", "gguf")


def export(
    model: str = typer.Option(..., "--model", "-m", help=f"Model: {MODEL_REF_HELP}."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Directory (hf) or file (gguf) to write."),
    export_format: str = typer.Option(
        "hf",
        "--format",
        "-f",
        help="hf: a transformers model directory; gguf: one file for llama.cpp / Ollama.",
    ),
    quant: str = typer.Option(None, "--quant", "-q", help="gguf: f32, f16 (default), bf16, q8_0 or q4_0."),
    modelfile: bool = typer.Option(
        False, "--modelfile", help="gguf: also write an Ollama Modelfile beside the file."
    ),
    verify: bool = typer.Option(
        True,
        "--verify/--no-verify",
        help="Check the export in transformers (hf) or llama.cpp (gguf) before writing it.",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing --out (gguf: only a file llmctl wrote)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON document."),
) -> None:
    """Export a model for transformers or llama.cpp (an adapter is merged into its base first).

    Examples:

      llmctl export --model code-base --out exports/code-base

      llmctl export -m code-sft:latest -o exports/code-sft --overwrite --json

      llmctl export -m code-lora --format gguf --quant q8_0 --out code-lora-q8.gguf --modelfile

    Then: AutoModelForCausalLM.from_pretrained("exports/code-base"), or
    llama-server -m code-lora-q8.gguf, or ollama create code-lora -f Modelfile
    """
    from llmctl.errors import UsageError

    if export_format not in FORMATS:
        raise UsageError(f"unknown --format '{export_format}'; use {', '.join(FORMATS)}")
    if export_format == "gguf":
        from llmctl.export.gguf import DEFAULT_QUANT, export_gguf

        result = export_gguf(
            workspace(),
            model,
            out_path,
            quant=quant or DEFAULT_QUANT,
            verify=verify,
            overwrite=overwrite,
            modelfile=modelfile,
        )
        if as_json:
            print_json(_gguf_document(result))
        else:
            _show_gguf(result)
        return
    if quant is not None or modelfile:
        raise UsageError("--quant and --modelfile apply to --format gguf only")
    from llmctl.export.hf import export_hf

    result = export_hf(workspace(), model, out_path, verify=verify, overwrite=overwrite)
    if as_json:
        print_json(_document(result))
    else:
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


def _gguf_document(result) -> dict:
    from dataclasses import asdict

    return {
        "file": str(result.path),
        "source": str(result.source),
        "architecture": result.architecture,
        "params": result.params,
        "quant": result.quant,
        "bytes": result.size,
        "tokens": result.tokens,
        "pre_tokenizer": result.pre_tokenizer,
        "modelfile": None if result.modelfile is None else str(result.modelfile),
        "verification": None
        if result.verification is None
        else {**asdict(result.verification), "ok": result.verification.ok},
        "skipped_verification": result.skipped,
    }


def _show_gguf(result) -> None:
    from rich.table import Table

    from llmctl.model.sizing import human_bytes, human_count

    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("from", str(result.source))
    table.add_row("model", f"{result.architecture} · {human_count(result.params)} params · {result.quant}")
    table.add_row("tokenizer", f"{result.tokens} tokens · pre-tokenizer {result.pre_tokenizer}")
    table.add_row("file", f"{result.path.name}  {human_bytes(result.size)}")
    if result.modelfile is not None:
        table.add_row("", f"{result.modelfile.name}  (ollama create NAME -f {result.modelfile})")
    out.print(table)
    check = result.verification
    if check is None:
        warn(f"check in llama.cpp skipped: {result.skipped}")
    else:
        note(f"llama.cpp: {check.token_strings} strings tokenized alike" + _gguf_figures(check))
        for line in check.notes:
            note(line)
    success(f"exported to {result.path}")


def _gguf_figures(check) -> str:
    if check.perplexity is not None:
        rise = check.perplexity / check.reference_perplexity - 1
        return (
            f", perplexity {check.perplexity:.3f} against llmctl's {check.reference_perplexity:.3f} "
            f"({rise:+.2%}, tolerance {check.tolerance:.0%})"
            + (", chat rendered alike" if check.chat_checked else "")
        )
    figures = (
        f", {check.greedy_tokens} greedy tokens identical over {check.prompts} prompts, "
        f"max |Δ log-prob| {check.max_logprob_diff:.1e} (tolerance {check.tolerance:g})"
    )
    return figures + (", chat reply identical" if check.chat_checked else "")
