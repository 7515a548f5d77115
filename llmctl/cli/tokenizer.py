"""`llmctl tokenizer`: train, import, show and try tokenizers."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import typer

from llmctl.cli.common import err, note, out, print_json, success, warn, workspace

app = typer.Typer(
    help="Train byte-level BPE tokenizers, import existing ones, inspect them.", no_args_is_help=True
)

_JSON = typer.Option(False, "--json", help="Print one JSON document.")


class TokenizerKind(str, Enum):
    bpe = "bpe"
    byte = "byte"


@app.command("train")
def train(
    name: str = typer.Argument(..., help="Name to register the tokenizer under."),
    corpus: str = typer.Option(..., "--corpus", "-c", help="Corpus to train on (its train split)."),
    vocab_size: int = typer.Option(
        None,
        "--vocab-size",
        "-v",
        show_default=False,
        help="Vocabulary size including the 6 special tokens (bpe; at least 262).",
    ),
    min_frequency: int = typer.Option(
        2, "--min-frequency", help="Merge only pairs seen at least this often."
    ),
    kind: TokenizerKind = typer.Option(
        TokenizerKind.bpe,
        "--kind",
        help="bpe: byte-level BPE; byte: 256 bytes + specials, no training.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a tokenizer of the same name."),
) -> None:
    """Train a byte-level BPE tokenizer on a corpus, check it on the validation split, register it.

    Example: llmctl tokenizer train code-8k --corpus code --vocab-size 8192
    """
    from llmctl.tokenizer_build import train_tokenizer

    ws = workspace()
    # tokenizers draws its own progress bars; they would garble logs, so only on a terminal.
    meta = train_tokenizer(
        ws,
        name,
        corpus,
        vocab_size,
        min_frequency,
        kind.value,
        overwrite,
        show_progress=err.is_terminal,
        report=note,
    )
    _print_summary(meta, ws.tokenizer_dir(name) / "tokenizer.json")
    if meta["kind"] == "bpe" and meta["vocab_size"] < meta["requested_vocab_size"]:
        warn(
            f"the corpus allowed only {meta['vocab_size']:,} tokens of the {meta['requested_vocab_size']:,} "
            "requested; use a larger corpus or a lower --min-frequency for more"
        )
    success(
        f"tokenizer '{name}' registered; round trip exact on "
        f"{meta['figures']['documents']:,} validation documents"
    )


@app.command("import")
def import_(
    name: str = typer.Argument(..., help="Name to register the tokenizer under."),
    file: Path = typer.Argument(
        ..., help="A tokenizer.json (Hugging Face tokenizers format) or its directory."
    ),
    eot_token: str = typer.Option(
        None,
        "--eot-token",
        show_default=False,
        help="The end-of-text token, when it is not one llmctl detects.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a tokenizer of the same name."),
) -> None:
    """Register an existing tokenizer.json (a GPT-2 one, say), keeping its own special tokens.

    Example: llmctl tokenizer import gpt2 ./gpt2/tokenizer.json
    """
    from llmctl.tokenizer_build import import_tokenizer

    ws = workspace()
    meta = import_tokenizer(ws, name, file, eot_token, overwrite)
    _print_summary(meta, ws.tokenizer_dir(name) / "tokenizer.json")
    if meta["missing_chat_tokens"]:
        warn(
            f"no chat template: the vocabulary lacks {', '.join(meta['missing_chat_tokens'])}, "
            "so chat fine-tuning needs a tokenizer trained by llmctl"
        )
    success(f"tokenizer '{name}' imported (end of text: {meta['eot_token']} = {meta['eot_id']})")


@app.command("show")
def show(name: str = typer.Argument(..., help="A registered tokenizer."), as_json: bool = _JSON) -> None:
    """Vocabulary size, special tokens, chat template, validation figures and the path of tokenizer.json.

    Example: llmctl tokenizer show code-8k --json
    """
    from llmctl.tokenizer import tokenizer_meta

    meta = tokenizer_meta(workspace(), name)
    if as_json:
        print_json(meta)
        return
    _print_summary(meta, Path(meta["path"]))
    if meta.get("chat_template"):
        out.print("[bold]chat template[/bold] (Jinja, Hugging Face chat_template):")
        out.print(meta["chat_template"], markup=False)


@app.command("encode")
def encode(
    name: str = typer.Argument(..., help="A registered tokenizer."),
    text: str = typer.Argument(..., help="Text to encode; quote it in the shell."),
    as_json: bool = _JSON,
) -> None:
    """Show how a text splits into tokens: the pieces, coloured, and their ids.

    Example: llmctl tokenizer encode code-8k "def f(x):"
    """
    from rich.text import Text

    from llmctl.tokenizer import load_tokenizer

    loaded = load_tokenizer(workspace(), name)
    ids = loaded.encode(text)
    token_bytes = [loaded.token_bytes(token_id) for token_id in ids]
    # A token may hold part of a UTF-8 character: show its bytes escaped rather than as '�'.
    pieces = [raw.decode("utf-8", errors="backslashreplace") for raw in token_bytes]
    if as_json:
        print_json(
            {
                "tokenizer": name,
                "text": text,
                "ids": ids,
                "tokens": [
                    {
                        "id": token_id,
                        "token": loaded.tokenizer.id_to_token(token_id),
                        "text": piece,
                        "bytes": raw.hex(),
                    }
                    for token_id, piece, raw in zip(ids, pieces, token_bytes, strict=True)
                ],
                "count": len(ids),
            }
        )
        return
    styles = ("black on cyan", "black on yellow", "black on green", "black on magenta")
    rendered = Text()
    for index, piece in enumerate(pieces):
        visible = piece.replace("\n", "↵\n").replace("\t", "→")
        rendered.append(visible, style=styles[index % len(styles)])
    out.print(rendered)
    id_line = Text()
    for index, token_id in enumerate(ids):
        id_line.append(str(token_id), style=styles[index % len(styles)].replace("black on ", "bold "))
        id_line.append(" ")
    out.print(id_line)
    ratio = f" · {len(text) / len(ids):.2f} chars/token" if ids else ""
    out.print(f"[dim]{len(ids)} tokens · {len(text)} chars{ratio}[/dim]")


@app.command("list")
def list_(as_json: bool = _JSON) -> None:
    """The registered tokenizers: kind, vocabulary, corpus and characters per token.

    Example: llmctl tokenizer list --json
    """
    from rich.table import Table

    from llmctl.tokenizer import list_tokenizers

    rows = list_tokenizers(workspace())
    if as_json:
        print_json(rows)
        return
    if not rows:
        note(
            "no tokenizers yet; train one with: "
            "llmctl tokenizer train code-8k --corpus code --vocab-size 8192"
        )
        return
    table = Table(title="tokenizers", title_justify="left")
    numeric = ("vocab", "chars/token", "bytes/token")
    for column in ("name", "kind", "vocab", "corpus", "chars/token", "bytes/token"):
        table.add_column(column, justify="right" if column in numeric else "left")
    for row in rows:
        table.add_row(
            row["name"],
            row["kind"] or "",
            f"{row['vocab_size']:,}",
            row["corpus"] or "—",
            _figure(row["chars_per_token"]),
            _figure(row["bytes_per_token"]),
        )
    out.print(table)


def _figure(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _print_summary(meta: dict[str, Any], tokenizer_json: Path) -> None:
    from rich.table import Table

    figures = meta.get("figures") or {}
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("tokenizer", f"{meta['name']} ({meta['kind']})")
    table.add_row("path", str(tokenizer_json))
    table.add_row("vocab size", f"{meta['vocab_size']:,}")
    table.add_row(
        "special tokens",
        ", ".join(f"{token}={token_id}" for token, token_id in meta["special_tokens"].items()),
    )
    table.add_row(
        "end of text / pad", f"{meta['eot_token']}={meta['eot_id']} / {meta['pad_token']}={meta['pad_id']}"
    )
    table.add_row(
        "chat template",
        "yes" if meta.get("chat_template") else f"no (missing {', '.join(meta['missing_chat_tokens'])})",
    )
    if meta.get("corpus"):
        table.add_row("corpus", meta["corpus"])
    if figures:
        table.add_row(
            "validation",
            f"{figures['documents']:,} documents, {figures['bytes']:,} bytes, {figures['tokens']:,} tokens",
        )
        table.add_row("chars / token", _figure(figures["chars_per_token"]))
        table.add_row("bytes / token", _figure(figures["bytes_per_token"]))
        table.add_row("round trip", "exact on every validation document")
        table.add_row("train time", f"{figures['train_seconds']:.1f} s")
    if meta.get("source"):
        table.add_row("imported from", meta["source"])
    table.add_row("sha256", meta["sha256"])
    out.print(table)
