"""`llmctl registry`: the workspace's registry of corpora, tokenizers, runs, checkpoints and evals."""

from __future__ import annotations

import typer

from llmctl.cli.common import print_json, success, warn, workspace

app = typer.Typer(
    help="The workspace's registry: make it again from the files on disk.", no_args_is_help=True
)


@app.command("rebuild")
def rebuild(
    as_json: bool = typer.Option(False, "--json", help="Print what was found as one JSON document."),
) -> None:
    """Make registry.db again from the workspace's files (a damaged one is moved aside, not removed).

    Corpora, tokenizers, runs with their checkpoints and lineage, and HumanEval results come back;
    perplexity, probes and classification results live only in the registry and do not.

    Example: llmctl registry rebuild
    """
    from llmctl.registry_rebuild import rebuild_registry

    result = rebuild_registry(workspace())
    if as_json:
        print_json(result.as_dict())
        return
    for skipped in result.skipped:
        warn(f"skipped {skipped}")
    if result.moved_aside:
        warn(f"the old registry is kept as {result.moved_aside}")
    found = [
        _counted(result.corpora, "corpus", "corpora"),
        _counted(result.tokenizers, "tokenizer", "tokenizers"),
        _counted(result.runs, "run", "runs"),
        _counted(result.checkpoints, "checkpoint", "checkpoints"),
        _counted(result.evals, "eval", "evals"),
    ]
    success(f"registry rebuilt: {', '.join(found)}")


def _counted(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"
