"""MLflow: one MLflow run per llmctl run, in the store MLFLOW_TRACKING_URI names or, by default, a file
store in the workspace (<workspace>/mlruns). Experiment: MLFLOW_EXPERIMENT_NAME, else "llmctl".

The resolved config goes in as params (and config.yaml as an artifact), the start event's figures
as `llmctl.*` tags, train and eval figures as metrics at their step (and the event's time),
checkpoints as tags, samples and alerts as text artifacts, the end reason as a tag and the run's
status. A resumed run continues the MLflow run recorded in runs/<run>/trackers.json; metrics are
committed once no resume can redo their step (see BufferedSink), and any (metric, step) the
MLflow run already holds is skipped, so each step is there once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmctl.events import EndReason
from llmctl.train.trackers.base import BufferedSink, Target, load_state, save_state
from llmctl.train.trackers.history import flatten, read_config, start_fields
from llmctl.workspace import RUN_CONFIG

DEFAULT_EXPERIMENT = "llmctl"
STORE_DIRNAME = "mlruns"
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param's value
BATCH = 1000  # MLflow's limit on metrics per log_batch call
PARAM_BATCH = 100


def tracking_uri(workspace_root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or (workspace_root / STORE_DIRNAME).resolve().as_uri()


@contextlib.contextmanager
def _file_store_allowed(uri: str) -> Iterator[None]:
    """MLflow 3 keeps its file store in maintenance mode behind MLFLOW_ALLOW_FILE_STORE; llmctl's default
    store is one, so the opt-in is given while the client is built (a user's own choice stands)."""
    if not uri.startswith("file:") or "MLFLOW_ALLOW_FILE_STORE" in os.environ:
        yield
        return
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


def end_status(reason: str | None) -> str:
    if reason in {r.value for r in EndReason if r.completed or r is EndReason.PRUNED}:
        return "FINISHED"
    return "KILLED" if reason == EndReason.INTERRUPTED.value else "FAILED"


class MlflowSink(BufferedSink):
    name = "mlflow"
    title = "MLflow"

    def __init__(self, target: Target):
        super().__init__(target)
        self.client: Any = None
        self.run_id: str | None = None
        self.uri = ""
        self.held: dict[str, set[int]] = {}  # metric -> the steps the MLflow run holds

    def load(self) -> None:
        import mlflow.tracking  # noqa: F401

    def open(self, start: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(self.target.workspace_root)
        with _file_store_allowed(self.uri):
            self.client = MlflowClient(tracking_uri=self.uri)
        state = load_state(self.target.run_dir).get(self.name, {})
        run = self._recorded_run(state) if state.get("tracking_uri") == self.uri else None
        if run is None:
            experiment_id = self._experiment()
            tags = {"llmctl.run": self.target.run}
            if self.target.group:
                tags["llmctl.group"] = self.target.group
            run = self.client.create_run(experiment_id, run_name=self.target.run, tags=tags)
            self.run_id = run.info.run_id
            save_state(
                self.target.run_dir,
                self.name,
                {"tracking_uri": self.uri, "experiment_id": experiment_id, "run_id": self.run_id},
            )
        else:
            self.run_id = run.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            self.held = {
                key: {metric.step for metric in self.client.get_metric_history(self.run_id, key)}
                for key in run.data.metrics
            }
        self._log_config(run.data.params)
        self._tags({f"llmctl.{key}": value for key, value in start_fields(start).items()})

    def _recorded_run(self, state: dict[str, Any]) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(state["run_id"])
        except (MlflowException, KeyError):
            return None
        return run if run.info.lifecycle_stage == "active" else None

    def _experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another trial created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def _log_config(self, present: dict[str, str]) -> None:
        """The config's keys as params; params cannot change, so a resumed run adds only new keys."""
        from mlflow.entities import Param

        params = [
            Param(key, str(value)[:MAX_PARAM_VALUE])
            for key, value in flatten(read_config(self.target.run_dir)).items()
            if key not in present
        ]
        for i in range(0, len(params), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + PARAM_BATCH])
        config_file = self.target.run_dir / RUN_CONFIG
        if config_file.is_file():
            self.client.log_artifact(self.run_id, str(config_file))

    def _tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items() if v is not None])

    # ------------------------------------------------------------ events

    def commit(self, rows: list[tuple[int, float, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        metrics = []
        for step, ts, values in rows:
            for key, value in values.items():
                steps = self.held.setdefault(key, set())
                if step not in steps:
                    metrics.append(Metric(key, value, int(ts * 1000), step))
                    steps.add(step)
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + BATCH])

    def checkpoint(self, record: dict[str, Any]) -> None:
        tags = {"llmctl.latest_checkpoint": record.get("path"), "llmctl.latest_step": record["step"]}
        if record.get("best"):
            tags.update({"llmctl.best_checkpoint": record.get("path"), "llmctl.best_step": record["step"]})
        self._tags(tags)

    def text(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        if record["event"] == "sample":
            body, name = f"{record.get('prompt', '')}{record.get('text', '')}", f"samples/step-{step:08d}.txt"
        else:
            body = f"{record.get('level')} {record.get('kind')}: {record.get('message')}\n"
            name = f"alerts/step-{step:08d}-{record.get('kind')}.txt"
            self._tags({"llmctl.last_alert": body.strip()[:5000]})
        self.client.log_text(self.run_id, body, name)

    def ended(self, record: dict[str, Any]) -> None:
        self._tags(
            {"llmctl.end_reason": record.get("reason"), "llmctl.best_val_loss": record.get("best_val_loss")}
        )

    def finish(self, end: dict[str, Any] | None) -> None:
        if end is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, end_status(end.get("reason")))

    def where(self) -> str:
        return f"run {self.run_id} in {self.uri}"


SINK = MlflowSink
