"""What the page's Runs view reads: the documents `llmctl status` prints, and live curves.

Curves come from the monitor's own folding (`RunWatch`): one watch per run stays open, so each
poll of a training run reads only the lines added since the last one.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from llmctl.events import jsonable
from llmctl.monitor.runs import LOG_NAME, known_runs
from llmctl.monitor.status import run_status, workspace_status
from llmctl.monitor.watch import RunWatch
from llmctl.workspace import Workspace

CURVE_POINTS = 512  # per curve; the monitor's Series merges neighbours beyond this


class RunsView:
    def __init__(self, workspace_root: Path):
        self.workspace_root = workspace_root
        self._watches: dict[str, RunWatch] = {}
        self._lock = threading.Lock()  # the JSON endpoints run in worker threads

    def _workspace(self) -> Workspace:
        # a Workspace (and SQLite connection) per call: connections are not shared across threads
        return Workspace(self.workspace_root)

    def exists(self, name: str) -> bool:
        return name in known_runs(self._workspace())

    def overview(self) -> dict[str, Any]:
        """The workspace: corpora, tokenizers, runs with their state and best evaluation."""
        return workspace_status(self._workspace())

    def detail(self, name: str) -> dict[str, Any]:
        """One run: summary, config, lineage, checkpoints, evaluations, alerts, and `derived`: the
        runs that started from one of its checkpoints (a finetune of this pretrain)."""
        workspace = self._workspace()
        document = run_status(workspace, name)
        registry = workspace.registry(create=False)
        steps = {row["id"]: row["step"] for row in registry.checkpoints(name)}
        document["derived"] = [
            {"run": row["name"], "stage": row["stage"], "step": steps[row["base_checkpoint"]]}
            for row in registry.runs()
            if row["base_checkpoint"] in steps
        ]
        return document

    def curves(self, name: str) -> dict[str, Any]:
        """Train loss, validation loss and learning rate as [step, value] points, and the run's
        state now (a page polls this while the run trains)."""
        log = self._workspace().run_dir(name) / LOG_NAME
        with self._lock:
            watch = self._watches.get(name)
            if watch is None:
                watch = self._watches[name] = RunWatch(log, history_points=CURVE_POINTS)
            watch.refresh()
            state = watch.state
            summary = state.summary(time.time())
            return jsonable(
                {
                    "run": name,
                    "state": summary["state"],
                    "step": summary["step"],
                    "max_steps": summary["max_steps"],
                    "progress": summary["progress"],
                    "eta_s": summary["eta_s"],
                    "train": summary["train"],
                    "last_eval": summary["last_eval"],
                    "best_eval": summary["best_eval"],
                    "checkpoints": state.checkpoint_count,
                    "train_loss": state.train_loss.points(),
                    "val_loss": state.val_loss.points(),
                    "lr": state.lr.points(),
                }
            )
