"""Finding runs and their logs: by registry name, by directory, or by a copied events.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmctl.errors import UsageError
from llmctl.workspace import Workspace

LOG_NAME = "events.jsonl"
CONFIG_NAME = "config.yaml"


def known_runs(workspace: Workspace) -> list[str]:
    """Registered runs, then run directories the registry does not know (a log copied in)."""
    names = [row["name"] for row in workspace.registry(create=False).runs()]
    runs_dir = workspace.root / "runs"
    if runs_dir.is_dir():
        on_disk = sorted(
            (
                path
                for path in runs_dir.iterdir()
                if path.is_dir() and not path.name.startswith(".") and (path / LOG_NAME).is_file()
            ),
            key=lambda path: path.stat().st_mtime,
        )
        names += [path.name for path in on_disk if path.name not in names]
    return names


def resolve_log(workspace: Workspace, ref: str, must_exist: bool = True) -> tuple[str, Path]:
    """(run name, its events.jsonl) for a run name, a run directory or a log file.

    With must_exist=False an unknown name resolves to where its log will appear, so the monitor
    can be started before the trainer.
    """
    if ref in known_runs(workspace):
        return ref, workspace.run_dir(ref) / LOG_NAME
    path = Path(ref).expanduser()
    if path.is_file():
        return path.resolve().parent.name, path.resolve()
    if (path / LOG_NAME).is_file():
        return path.resolve().name, path.resolve() / LOG_NAME
    if must_exist:
        known = known_runs(workspace)
        listing = f" (known: {', '.join(known)})" if known else " (it has no runs yet)"
        raise UsageError(f"no run '{ref}' in {workspace.root}{listing}; `llmctl status` lists runs")
    return ref, workspace.run_dir(ref) / LOG_NAME


def most_recent_run(workspace: Workspace) -> str | None:
    """The run whose log changed last (the one training now, most likely)."""

    def last_active(name: str) -> float:
        log = workspace.run_dir(name) / LOG_NAME
        return log.stat().st_mtime if log.is_file() else 0.0

    names = known_runs(workspace)
    return max(reversed(names), key=last_active) if names else None


def read_run_config(run_dir: Path) -> dict[str, Any] | None:
    """The resolved config the run saved (plain YAML: no need for the config model here)."""
    import yaml

    path = run_dir / CONFIG_NAME
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return loaded if isinstance(loaded, dict) else None
