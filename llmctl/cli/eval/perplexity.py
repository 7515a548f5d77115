"""`llmctl eval perplexity`: loss, perplexity and bits per byte of a model on text."""

from __future__ import annotations

from pathlib import Path

import typer

from llmctl.cli.common import DEVICE, MODEL, note, out, print_json, workspace


def perplexity(
    model: str = MODEL,
    corpus: str = typer.Option(None, "--corpus", "-c", help="Score this corpus's validation split."),
    file: Path = typer.Option(None, "--file", "-f", help="Score this UTF-8 text file (one document)."),
    stride: int = typer.Option(
        None,
        "--stride",
        min=1,
        show_default=False,
        help="Tokens each window moves on in long documents \\[default: half the context].",
    ),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Windows read at once."),
    device: str = DEVICE,
    dtype: str = typer.Option(
        "fp32",
        "--dtype",
        help="The weights to score with: fp32, bf16, int8 or auto (as sample would generate), "
        "to measure what a dtype costs in bits per byte.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Loss, perplexity and bits per byte on a corpus's validation split or a text file.

    Examples: llmctl eval perplexity --model code-base --corpus code --stride 256

      llmctl eval perplexity --model code-base --corpus code --dtype int8
    """
    import torch

    from llmctl.checkpoint.load import load_model
    from llmctl.eval.perplexity import measure_perplexity, text_source
    from llmctl.eval.results import describe_checkpoint, record
    from llmctl.generate import resolve_device
    from llmctl.model.decode_dtype import convert_for_decoding, resolve_decode_dtype

    ws = workspace()
    torch_device = resolve_device(device)
    dtype = resolve_decode_dtype(dtype, torch_device)
    source, texts = text_source(ws, corpus, file)
    loaded = load_model(ws, model, torch_device, dtype=torch.float32)
    scored = convert_for_decoding(loaded.model, dtype, torch_device)
    result = measure_perplexity(
        scored,
        loaded.tokenizer,
        texts,
        stride=stride,
        batch_size=batch_size,
        on_progress=_report_documents,
    )
    summary = {
        "kind": "perplexity",
        **describe_checkpoint(ws, model, loaded.path),
        "source": source,
        **result.as_dict(),
        "batch_size": batch_size,
        "dtype": dtype,
    }
    summary["eval_id"] = record(ws, "perplexity", summary)
    if as_json:
        print_json(summary)
    else:
        _render_perplexity(summary)


def _report_documents(documents: int, tokens: int) -> None:
    note(f"scored {documents} documents, {tokens} tokens")


def _render_perplexity(summary: dict) -> None:
    from rich.table import Table

    from llmctl.eval.perplexity import name_source

    table = Table(
        title=f"perplexity · {summary['model']} · {name_source(summary['source'])}", title_justify="left"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("loss (nats/token)", f"{summary['loss']:.4f}")
    table.add_row("perplexity", f"{summary['perplexity']:.2f}")
    table.add_row("bits per byte", f"{summary['bits_per_byte']:.4f}")
    table.add_row(
        "scored",
        f"{summary['documents']} documents · {summary['tokens']:,} tokens · {summary['bytes']:,} bytes",
    )
    table.add_row("window", f"{summary['window']} tokens, stride {summary['stride']}")
    table.add_row("weights", summary["dtype"])
    table.add_row("time", f"{summary['seconds']:.1f} s ({summary['tokens_per_second'] or 0:,.0f} tokens/s)")
    out.print(table)
