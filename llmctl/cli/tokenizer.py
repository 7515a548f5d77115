"""`llmctl tokenizer`: train, import, show and try tokenizers."""

from __future__ import annotations

import typer

app = typer.Typer(help="Train byte-level BPE tokenizers, import existing ones, inspect them.",
                  no_args_is_help=True)
