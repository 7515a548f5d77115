"""Reading back what the trackers hold, each with its own library, offline: TensorBoard's event
accumulator, MLflow's client on the workspace's file store, and the W&B offline run files (the
records of `run-<id>.wandb`, parsed with W&B's own protobuf schema). And the reference: the
figures events.jsonl holds for each step, the later line winning (docs/events.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from llmctl.events import as_float, read_events

NOT_FIGURES = {"ts", "event", "step"}


def offline_env(monkeypatch, tmp_path: Path) -> None:
    """W&B offline and silent, its caches in tmp; MLflow on the workspace's default store.
    WANDB_SERVICE: an in-process run earlier in the session left its service's address there for
    child processes; a trainer started here must have its own, which dies with it as a user's would."""
    for name in (
        "WANDB_SERVICE",
        "WANDB_API_KEY",
        "WANDB_DIR",
        "WANDB_PROJECT",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_EXPERIMENT_NAME",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))


def expected(run_dir: Path) -> dict[str, dict[int, float]]:
    """{'train/loss': {step: value}, 'eval/val_loss': {...}} from events.jsonl, later lines winning."""
    series: dict[str, dict[int, float]] = {}
    for event in read_events(run_dir / "events.jsonl"):
        if event["event"] not in ("train", "eval"):
            continue
        for key, value in event.items():
            if key in NOT_FIGURES or isinstance(value, bool) or value is None:
                continue
            if isinstance(value, str) and value not in ("nan", "inf", "-inf"):  # the log's non-finite floats
                continue
            series.setdefault(f"{event['event']}/{key}", {})[event["step"]] = as_float(value)
    return series


def steps_in_log(run_dir: Path, kind: str) -> list[int]:
    return [e["step"] for e in read_events(run_dir / "events.jsonl") if e["event"] == kind]


# ---------------------------------------------------------------- TensorBoard


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar point as TensorBoard's reader keeps it (purges applied), in file order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return {
        tag: [(s.step, s.value) for s in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }


def tensorboard_served_steps(logdir: Path, tag: str) -> list[int]:
    """The steps of `tag` as the Python TensorBoard server reads them (its plugin accumulator, which
    takes a directory's first SessionLog START as the beginning and later ones as restarts)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    accumulator.Reload()
    return [event.step for event in accumulator.Tensors(tag)]


def tensorboard_texts(logdir: Path, tag: str) -> list[tuple[int, str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    accumulator.Reload()
    if tag not in accumulator.Tags()["tensors"]:
        return []
    return [(t.step, t.tensor_proto.string_val[0].decode()) for t in accumulator.Tensors(tag)]


def float32(value: float) -> float:
    """What TensorBoard's simple_value (a float32) makes of a figure."""
    import numpy as np

    return float(np.float32(value))


# ---------------------------------------------------------------- MLflow


def mlflow_client(workspace: Path):
    import os

    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=(workspace / "mlruns").resolve().as_uri())


def mlflow_run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"]


def mlflow_metrics(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    run = client.get_run(run_id)
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in run.data.metrics
    }


# ---------------------------------------------------------------- W&B offline


def _wandb_records(path: Path):
    """The records of a W&B transaction log: a 7-byte header (':W&B', magic, version), then LevelDB
    log blocks of 32 KiB, each record split in chunks with a 7-byte header (crc, length, type)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:  # full
            yield chunk
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            yield pending + chunk
            pending = b""


def wandb_runs(run_dir: Path) -> list[dict[str, Any]]:
    """Each offline session of the run, oldest first: its run record, config, history and summary."""
    from wandb.proto import wandb_internal_pb2

    sessions = []
    for directory in sorted((run_dir / "wandb").glob("offline-run-*")):
        (log,) = directory.glob("run-*.wandb")
        session: dict[str, Any] = {"dir": directory, "history": [], "config": {}, "summary": {}, "exit": None}
        for raw in _wandb_records(log):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                session["run"] = record.run
                session["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                session["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                row = {
                    (i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item
                }
                session["history"].append(row)
            elif kind == "summary":
                for item in record.summary.update:
                    session["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "exit":
                session["exit"] = record.exit.exit_code
        sessions.append(session)
    return sessions


def wandb_service_gone(trainer_pid: int, timeout: float = 30) -> None:
    """Wait until the W&B service (wandb-core) of a killed trainer has exited: it notices its
    parent's death by itself, and must not be mid-write when the resumed run reads its files."""
    import time

    def alive() -> bool:
        for entry in Path("/proc").iterdir():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            serves = b"--pid" in argv and argv[argv.index(b"--pid") + 1] == str(trainer_pid).encode()
            if argv[0].endswith(b"wandb-core") and serves:
                return True
        return False

    deadline = time.monotonic() + timeout
    while alive():
        assert time.monotonic() < deadline, "wandb-core outlived its trainer"
        time.sleep(0.05)


def wandb_series(sessions: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for session in sessions:
        for row in session["history"]:
            for key, value in row.items():
                if not key.startswith("_"):
                    series.setdefault(key, []).append((row["_step"], value))
    return series


def same(value: float, wanted: float) -> bool:
    return (math.isnan(value) and math.isnan(wanted)) or value == wanted


def check_series(
    held: dict[str, list[tuple[int, float]]], wanted: dict[str, dict[int, float]], convert=float
):
    """Every figure of events.jsonl at every step, once, with its value (as the tracker stores it)."""
    assert set(held) == set(wanted), (sorted(held), sorted(wanted))
    for key, points in held.items():
        steps = [step for step, _ in points]
        assert len(steps) == len(set(steps)), f"{key}: a step appears twice: {steps}"
        assert sorted(steps) == sorted(wanted[key]), (key, steps, sorted(wanted[key]))
        for step, value in points:
            assert same(value, convert(wanted[key][step])), (key, step, value, wanted[key][step])
