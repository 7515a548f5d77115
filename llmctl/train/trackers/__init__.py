"""Experiment trackers: a run mirrored to TensorBoard, Weights & Biases or MLflow from its event stream.

events.jsonl stays the record; a tracker is a mirror of it. While a run trains, one sink per name in
`train.report_to` listens to the trainer's events on rank 0 (`open_sinks`); afterwards,
`mirror_run` (`llmctl report`) builds the same mirror from events.jsonl alone. Each tracker's
library is an optional extra, imported only when that tracker is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from llmctl.config import TRACKERS
from llmctl.errors import LlmctlError, UsageError
from llmctl.train.trackers.base import Sink, Target, stderr_warning
from llmctl.train.trackers.history import run_history
from llmctl.workspace import EVENTS_FILE, Workspace

# tracker -> (its sink's module, the import that tells whether its library is installed)
_SINKS = {
    "tensorboard": ("llmctl.train.trackers.tensorboard_sink", "tensorboard"),
    "wandb": ("llmctl.train.trackers.wandb_sink", "wandb"),
    "mlflow": ("llmctl.train.trackers.mlflow_sink", "mlflow"),
}
assert set(_SINKS) == set(TRACKERS)


def sink_class(name: str) -> type[Sink]:
    module = importlib.import_module(_SINKS[name][0])
    return module.SINK


def install_hint(name: str) -> str:
    return f"pip install 'llmctl[{name}]'"


def installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(_SINKS[name][1]) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken install
        return False


def describe(names: Sequence[str]) -> str:
    """The trackers a plan reports to, for the dry run: 'tensorboard, wandb (not installed: ...)'."""
    return ", ".join(
        name if installed(name) else f"{name} [yellow](not installed: {escape(install_hint(name))})[/yellow]"
        for name in names
    )


def open_sinks(
    names: Sequence[str],
    workspace: Workspace,
    run: str,
    *,
    group: str | None = None,
    console: Console | None = None,
) -> list[Sink]:
    """The Trainer's listeners for `names`. A tracker whose library is missing gets a warning and no
    sink: the run trains all the same, and `llmctl report` can mirror it later."""
    target = Target(run, workspace.run_dir(run), workspace.root, group, stderr_warning(console))
    sinks = []
    for name in names:
        try:
            sinks.append(sink_class(name)(target))
        except ImportError as exc:
            target.warn(
                f"{name} is not installed ({exc}), so run '{run}' is not mirrored to it; "
                f"{install_hint(name)}, then `llmctl report {run} --to {name}` mirrors it from events.jsonl"
            )
    return sinks


@dataclass(frozen=True)
class Mirrored:
    tracker: str
    where: str
    last_step: int  # of the run's history (MLflow and W&B stop at its last checkpoint)
    ended: bool  # whether the run has an end event (else it is training, or was killed)


def mirror_run(
    workspace: Workspace, run: str, run_dir: Path, names: Sequence[str], group: str | None = None
) -> list[Mirrored]:
    """Build each tracker's mirror of a recorded run from its events.jsonl (and config.yaml)."""
    history = run_history(run_dir)
    if not any(record["event"] == "start" for record in history):
        raise UsageError(f"run '{run}' has no start event in {run_dir / EVENTS_FILE}; nothing to mirror")
    missing = [name for name in names if not installed(name)]
    if missing:
        raise UsageError(
            f"{', '.join(missing)} not installed; {' and '.join(install_hint(name) for name in missing)}"
        )
    ended = history[-1]["event"] == "end"
    last_step = int(history[-1].get("step", 0))
    done = []
    for name in names:
        sink = sink_class(name)(Target(run, run_dir, workspace.root, group))
        try:
            where = sink.rebuild(history)
        except LlmctlError:
            raise
        except Exception as exc:
            raise LlmctlError(
                f"mirroring run '{run}' to {sink.title} failed: {type(exc).__name__}: {exc}"
            ) from exc
        done.append(Mirrored(name, where, last_step, ended))
    return done
