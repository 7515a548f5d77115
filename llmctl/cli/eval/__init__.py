"""`llmctl eval`: measure models and completions, one module per eval command."""

from __future__ import annotations

import typer

from llmctl.cli.eval import classify, compare, humaneval, perplexity, preference, probes

app = typer.Typer(
    help="Measure models and completions: perplexity and bits per byte, HumanEval pass@k "
    "in a sandbox, code probes, classification, preference accuracy, checkpoint comparison.",
    no_args_is_help=True,
)
app.command("perplexity")(perplexity.perplexity)
app.command("humaneval")(humaneval.humaneval)
app.command("probes")(probes.probes)
app.command("classify")(classify.classify)
app.command("preference")(preference.preference)
app.command("compare")(compare.compare)
