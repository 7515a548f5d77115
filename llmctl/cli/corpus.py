"""`llmctl corpus`: build, list and show corpora."""

from __future__ import annotations

import typer

app = typer.Typer(help="Collect, clean, split and register text, code and instruction corpora.",
                  no_args_is_help=True)
