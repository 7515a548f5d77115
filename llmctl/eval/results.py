"""Where model evaluations go: a registry row against the checkpoint measured, and what names it.

Every model eval's summary starts with `describe_checkpoint`: the reference as given, the
checkpoint directory, its run and step. `record` adds the row; a checkpoint the registry does
not know (a directory copied from elsewhere) gets a row with no checkpoint id, its path in the
summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmctl.workspace import Workspace


def describe_checkpoint(workspace: Workspace, ref: str, path: Path) -> dict[str, Any]:
    from llmctl.checkpoint.files import read_meta

    row = checkpoint_row(workspace, path)
    meta = read_meta(path)
    return {
        "model": ref,
        "checkpoint": str(path),
        "checkpoint_id": row["id"] if row else None,
        "run": row["run"] if row else None,
        "step": meta.get("step"),
    }


def checkpoint_row(workspace: Workspace, path: Path) -> dict[str, Any] | None:
    if not workspace.exists:
        return None
    registry = workspace.registry(create=False)
    return registry.checkpoint_by_path(path) or registry.checkpoint_by_path(path.resolve())


def record(workspace: Workspace, kind: str, summary: dict[str, Any], create: bool = False) -> int | None:
    """The new eval row's id; None (and nothing written) where there is no workspace to hold it,
    unless `create` makes one (an eval that writes its files into the workspace)."""
    if not (workspace.exists or create):
        return None
    return workspace.registry().add_eval(summary.get("checkpoint_id"), kind, summary)
