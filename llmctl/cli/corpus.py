"""`llmctl corpus`: build, list and show corpora.

Only typer and rich load at import time: `corpus list` must not pay for datasets, pyarrow or
tokenizers, which load inside the commands (and library paths) that read such sources.
"""

from __future__ import annotations

import datetime
from typing import Any

import typer

from llmctl.cli.common import err, note, out, print_json, success, workspace

app = typer.Typer(
    help="Collect, clean, split and register text, code and instruction corpora.", no_args_is_help=True
)

_SOURCE_HELP = (
    "Where documents come from, repeatable: 'stdlib' (this Python's standard library), a file, a directory, "
    "a glob ('extra/**/*.md'), or hf:NAME\\[:CONFIG]\\[@SPLIT]. Append *W to weight a source in the train "
    "split: 'extra/**/*.md*2' repeats it twice, *0.5 keeps half."
)


@app.command("build")
def build(
    name: str = typer.Argument(..., help="Name of the corpus in the workspace."),
    sources: list[str] = typer.Option(..., "--source", "-s", help=_SOURCE_HELP, show_default=False),
    fmt: str = typer.Option(
        None,
        "--format",
        "-f",
        show_default=False,
        help="Instruction data: alpaca, dolly, chat, code-contests, sms-spam; preference pairs for dpo: "
        "preference; or auto (detect from the fields). Without it the corpus is plain text.",
    ),
    text_field: str = typer.Option(
        "text",
        "--text-field",
        help="Field holding the text in JSON/JSONL/Parquet/CSV rows and datasets (plain text corpora).",
    ),
    limit: int = typer.Option(
        None, "--limit", help="Take at most this many files or records from each source.", show_default=False
    ),
    val_fraction: float = typer.Option(
        0.01, "--val-fraction", help="Share of documents in the validation split, chosen by content hash."
    ),
    max_doc_chars: int = typer.Option(
        None, "--max-doc-chars", help="Drop documents longer than this many characters.", show_default=False
    ),
    max_solutions: int = typer.Option(
        3, "--max-solutions", help="code-contests: Python solutions kept per problem."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing corpus of this name."),
) -> None:
    """Collect documents, clean them (newlines, empties, exact duplicates), split, and register the corpus.

    Examples:

      llmctl corpus build code --source stdlib

      llmctl corpus build books --source ./texts/ --source 'extra/**/*.md*2'

      llmctl corpus build sft --source data/instruction-data.json --format alpaca

      llmctl corpus build wiki --source hf:wikitext:wikitext-2-raw-v1@train --limit 5000
    """
    from llmctl.data.build import BuildOptions, build_corpus
    from llmctl.data.progress import RichProgress
    from llmctl.model.sizing import human_bytes

    options = BuildOptions(
        format=fmt,
        text_field=text_field,
        limit=limit,
        val_fraction=val_fraction,
        max_doc_chars=max_doc_chars,
        max_solutions=max_solutions,
        overwrite=overwrite,
    )
    meta = build_corpus(workspace(), name, sources, options, RichProgress(err))
    if fmt == "auto":
        for source in meta["sources"]:
            note(f"{source['target']}: detected format '{source['format']}'")
    out.print(_sources_table(meta, human_bytes))
    splits = meta["splits"]
    success(
        f"corpus '{name}' ({meta['kind']}): {meta['documents']:,} documents, {human_bytes(meta['bytes'])} "
        f"({splits['train']['documents']:,} train, {splits['val']['documents']:,} val) "
        f"in {meta['build_seconds']:.1f}s"
    )


@app.command("list")
def list_corpora(as_json: bool = typer.Option(False, "--json", help="Print one JSON document.")) -> None:
    """The registered corpora: kind, documents, size and sources.

    Example: llmctl corpus list
    """
    rows = [_summary(row) for row in workspace().registry(create=False).corpora()]
    if as_json:
        print_json(rows)
        return
    if not rows:
        note("no corpora yet; build one with: llmctl corpus build code --source stdlib")
        return
    from rich.table import Table

    from llmctl.model.sizing import human_bytes

    table = Table(title="corpora", title_justify="left")
    for column in ("name", "kind", "documents", "train", "val", "size", "sources", "created"):
        table.add_column(
            column, justify="right" if column in ("documents", "train", "val", "size") else "left"
        )
    for row in rows:
        table.add_row(
            row["name"],
            row["kind"],
            f"{row['documents']:,}",
            f"{row['splits']['train']['documents']:,}",
            f"{row['splits']['val']['documents']:,}",
            human_bytes(row["bytes"]),
            " ".join(row["sources"]),
            _when(row["created"]),
        )
    out.print(table)


@app.command("show")
def show(
    name: str = typer.Argument(..., help="Corpus name."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """A corpus's sources and their statistics, its splits, and the token caches built for it.

    Example: llmctl corpus show code --json
    """
    from llmctl.data.store import CorpusStore
    from llmctl.data.tokencache import list_token_caches
    from llmctl.model.sizing import human_bytes, human_count

    ws = workspace()
    store = CorpusStore.open(ws, name)
    meta = store.meta
    tokenizer_names = {row["sha256"]: row["name"] for row in ws.registry(create=False).tokenizers()}
    caches = list_token_caches(store)
    for cache in caches:
        cache["tokenizer"] = tokenizer_names.get(cache["tokenizer_sha256"])
    if as_json:
        print_json({**meta, "path": str(store.path), "caches": caches})
        return
    from rich.table import Table

    splits = meta["splits"]
    out.print(
        f"[bold]{name}[/bold] · {meta['kind']} · {meta['documents']:,} documents · "
        f"{human_bytes(meta['bytes'])} · {store.path}"
    )
    out.print(
        f"train {splits['train']['documents']:,} documents ({human_bytes(splits['train']['bytes'])}) · "
        f"val {splits['val']['documents']:,} documents ({human_bytes(splits['val']['bytes'])}) · "
        f"content sha256 {meta['content_sha256'][:16]} · built {_when(meta['created'])}"
    )
    out.print(_sources_table(meta, human_bytes))
    if meta["kind"] != "text":
        note("instruction corpora have no token cache: finetuning builds its examples from the records")
        return
    if not caches:
        note("no token caches yet; pretraining builds one per tokenizer")
        return
    table = Table(title="token caches", title_justify="left")
    for column in ("tokenizer", "sha256", "dtype", "train tokens", "val tokens", "bytes/token", "current"):
        table.add_column(column, justify="right" if "tokens" in column or column == "bytes/token" else "left")
    for cache in caches:
        tokens, n_bytes = cache["n_tokens"], cache["n_bytes"]
        per_token = sum(n_bytes.values()) / max(1, sum(tokens.values()))
        table.add_row(
            cache["tokenizer"] or "-",
            cache["tokenizer_sha256"][:16],
            cache["dtype"],
            human_count(tokens["train"]),
            human_count(tokens["val"]),
            f"{per_token:.2f}",
            "yes" if cache["current"] else "stale",
        )
    out.print(table)


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    meta = row["meta"]
    return {
        "name": row["name"],
        "kind": row["kind"],
        "path": row["path"],
        "created": row["created"],
        "documents": meta.get("documents", 0),
        "bytes": meta.get("bytes", 0),
        "splits": meta.get(
            "splits", {"train": {"documents": 0, "bytes": 0}, "val": {"documents": 0, "bytes": 0}}
        ),
        "sources": [source["source"] for source in meta.get("sources", [])],
    }


def _sources_table(meta: dict[str, Any], human_bytes: Any):
    from rich.table import Table

    table = Table(title=f"sources of '{meta['name']}'", title_justify="left")
    for column in ("source", "weight", "format", "read", "kept", "size", "train", "val", "dropped"):
        table.add_column(column, justify="left" if column in ("source", "format", "dropped") else "right")
    for source in meta["sources"]:
        dropped = ", ".join(
            f"{reason.replace('_', ' ')} {count:,}" for reason, count in source["dropped"].items()
        )
        table.add_row(
            source["target"],
            f"{source['weight']:g}",
            source["format"] or "text",
            f"{source['read']:,}",
            f"{source['documents']:,}",
            human_bytes(source["bytes"]),
            f"{source['train_documents']:,}",
            f"{source['val_documents']:,}",
            dropped or "-",
        )
    return table


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")
