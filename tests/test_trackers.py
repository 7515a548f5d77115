"""Experiment trackers mirror the event stream: TensorBoard, MLflow (file store) and W&B (offline),
read back with their own libraries. Each tracker holds every train and eval figure of events.jsonl
at every step once, with its value, after a whole run, after a SIGKILL and resume, and when
`llmctl report` builds the mirror afterwards; a tracker that is missing or fails costs the run
nothing."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from finetune_helpers import QUICK
from pretrain_helpers import BASE, events_of, llmctl_process, wait_for_event
from tracker_helpers import (
    check_series,
    expected,
    float32,
    mlflow_client,
    mlflow_metrics,
    mlflow_run_id,
    offline_env,
    steps_in_log,
    tensorboard_scalars,
    tensorboard_served_steps,
    tensorboard_texts,
    wandb_runs,
    wandb_series,
    wandb_service_gone,
)

from llmctl.config import resolve_config
from llmctl.errors import UsageError
from llmctl.events import read_events
from llmctl.train.trackers.history import effective, figures

pytestmark = pytest.mark.usefixtures("single_thread")
pytest_plugins = ["finetune_fixtures"]

ALL = "tensorboard,mlflow,wandb"
SHORT = ["--set", "train.eval_every=20", "--set", "train.save_every=20", "--set", "train.lr=3e-3"]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    offline_env(monkeypatch, tmp_path)


def check_all_trackers(ws: Path, run: str) -> None:
    run_dir = ws / "runs" / run
    wanted = expected(run_dir)
    check_series(tensorboard_scalars(run_dir / "tensorboard"), wanted, convert=float32)
    client = mlflow_client(ws)
    check_series(mlflow_metrics(client, mlflow_run_id(run_dir)), wanted)
    check_series(wandb_series(wandb_runs(run_dir)), wanted)


# ---------------------------------------------------------------- the history and the config


def test_the_effective_history_drops_what_a_resumed_session_redoes():
    log = [
        {"event": "start", "step": 0},
        *({"event": "train", "step": s, "loss": 10 - s} for s in (5, 10, 15, 20, 25)),
        {"event": "checkpoint", "step": 10},
        {"event": "heartbeat", "step": 25},
        {"event": "start", "step": 10, "resumed": True},  # killed at 25, resumed from step 10
        {"event": "train", "step": 15, "loss": 1.5},  # killed again at 15: 20 and 25 never came back
        {"event": "start", "step": 15, "resumed": True},
        {"event": "train", "step": 20, "loss": 2.0},
    ]
    kept = effective(log)
    assert [(e["event"], e["step"], e.get("loss")) for e in kept if e["event"] == "train"] == [
        ("train", 5, 5),
        ("train", 10, 0),
        ("train", 15, 1.5),
        ("train", 20, 2.0),
    ]
    assert not any(e["event"] == "heartbeat" for e in kept)
    assert figures({"event": "eval", "step": 3, "ts": 1.0, "val_loss": "nan", "best": True, "n": 2}) == {
        "eval/val_loss": pytest.approx(float("nan"), nan_ok=True),
        "eval/n": 2.0,
    }


def test_report_to_is_a_config_key_and_a_flag(cli, ws, monkeypatch):
    assert resolve_config(overrides=["train.report_to=tensorboard,WandB"]).train.report_to == [
        "tensorboard",
        "wandb",
    ]
    assert resolve_config(overrides=["train.report_to=[mlflow, mlflow]"]).train.report_to == ["mlflow"]
    assert resolve_config(overrides=["train.report_to=none"]).train.report_to == []
    with pytest.raises(UsageError, match="unknown tracker 'tensorbord'; did you mean 'tensorboard'"):
        resolve_config(overrides=["train.report_to=tensorbord"])

    bad = cli(*BASE, "--run", "x", "--report-to", "wandb,mlfow", "--dry-run")
    assert bad.exit_code == 2 and "did you mean 'mlflow'" in bad.stderr
    monkeypatch.setitem(sys.modules, "wandb", None)
    plan = cli(*BASE, "--run", "x", "--report-to", "tensorboard,wandb", "--dry-run")
    assert plan.exit_code == 0, plan.stderr
    assert "report to" in plan.stdout and "wandb (not installed: pip install 'llmctl[wandb]')" in plan.stdout
    summary = json.loads(
        cli(*BASE, "--run", "x", "--set", "train.report_to=mlflow", "--dry-run", "--json").stdout
    )
    assert summary["report_to"] == ["mlflow"]


# ---------------------------------------------------------------- a whole run


def test_a_run_is_mirrored_to_all_three_trackers(cli, ws):
    result = cli(
        *BASE,
        "--run",
        "mirrored",
        "--max-steps",
        "60",
        "--report-to",
        ALL,
        *SHORT,
        "--set",
        "train.sample_every=30",
    )
    assert result.exit_code == 0, result.stderr
    run_dir = ws / "runs" / "mirrored"
    check_all_trackers(ws, "mirrored")
    wanted = expected(run_dir)
    assert sorted(wanted["train/loss"]) == list(range(5, 61, 5)) and sorted(wanted["eval/val_loss"]) == [
        20,
        40,
        60,
    ]

    logdir = run_dir / "tensorboard"
    assert [step for step, _ in tensorboard_texts(logdir, "samples")] == [30, 60]
    assert [step for step, _ in tensorboard_texts(logdir, "checkpoints")] == steps_in_log(
        run_dir, "checkpoint"
    )
    assert tensorboard_texts(logdir, "end")[-1][1].startswith("finished")

    client = mlflow_client(ws)
    run = client.get_run(mlflow_run_id(run_dir))
    config = resolve_config(config_file=run_dir / "config.yaml")
    assert run.info.status == "FINISHED" and run.info.run_name == "mirrored"
    assert run.data.params["train.lr"] == str(config.train.lr) == "0.003"
    assert run.data.params["model.d_model"] == "32" and run.data.tags["llmctl.stage"] == "pretrain"
    assert run.data.tags["llmctl.end_reason"] == "finished"
    assert run.data.tags["llmctl.latest_checkpoint"].endswith("step-00000060")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for a in client.list_artifacts(run.info.run_id, "samples")
    }
    assert {"config.yaml", "samples/step-00000030.txt", "samples/step-00000060.txt"} <= artifacts

    (session,) = wandb_runs(run_dir)
    assert session["run"].display_name == "mirrored" and session["exit"] == 0
    assert session["config"]["train"]["lr"] == 0.003 and session["config"]["llmctl"]["stage"] == "pretrain"
    assert session["summary"]["end_reason"] == "finished"
    assert session["summary"]["latest_checkpoint"].endswith("step-00000060")


def test_finetune_reports_through_the_same_recipe_core(ft, base_workspace):
    result = ft(
        "finetune", "--model", "base", "--data", base_workspace / "task.jsonl", "--run", "ft-mirrored",
        "--lora", "--max-steps", "20", *QUICK, "--report-to", "tensorboard,mlflow",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    run_dir = base_workspace / "runs" / "ft-mirrored"
    wanted = expected(run_dir)
    assert sorted(wanted["train/loss"]) == [10, 20] and sorted(wanted["eval/val_loss"]) == [20]
    check_series(tensorboard_scalars(run_dir / "tensorboard"), wanted, convert=float32)
    run = mlflow_client(base_workspace).get_run(mlflow_run_id(run_dir))
    check_series(mlflow_metrics(mlflow_client(base_workspace), run.info.run_id), wanted)
    assert run.data.tags["llmctl.stage"] == "finetune" and run.data.params["adapter.enabled"] == "True"


# ---------------------------------------------------------------- SIGKILL and resume


def test_after_a_sigkill_and_resume_every_step_is_mirrored_once_with_the_values_that_count(cli, ws):
    process = llmctl_process(ws, *BASE, "--run", "cut", "--max-steps", "60", "--report-to", ALL, *SHORT)
    run_dir = ws / "runs" / "cut"
    checkpoint = wait_for_event(ws, "cut", "checkpoint", process)["step"]
    while (
        max(
            (step for step, _ in tensorboard_scalars(run_dir / "tensorboard").get("train/loss", [])),
            default=0,
        )
        <= checkpoint
    ):
        assert process.poll() is None, process.communicate()  # until a tracker holds a step past it
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    wandb_service_gone(process.pid)
    resume_step = max(steps_in_log(run_dir, "checkpoint"))
    killed_at = max(steps_in_log(run_dir, "train"))
    assert killed_at > resume_step and not steps_in_log(run_dir, "end")

    # the kill came between tracker writes and the next checkpoint: TensorBoard took the steps
    # past the checkpoint, MLflow only what the checkpoint covers; W&B's service kept the last
    # records of its session in memory and lost them with the kill
    assert max(step for step, _ in tensorboard_scalars(run_dir / "tensorboard")["train/loss"]) > resume_step
    held = mlflow_metrics(mlflow_client(ws), mlflow_run_id(run_dir))["train/loss"]
    assert held and max(step for step, _ in held) < resume_step
    assert all(step < resume_step for step, _ in wandb_series(wandb_runs(run_dir)).get("train/loss", []))

    resumed = cli("pretrain", "--run", "cut", "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    train_steps = steps_in_log(run_dir, "train")
    assert len(train_steps) > len(set(train_steps))  # the log holds the redone steps twice
    check_all_trackers(ws, "cut")  # the trackers hold each once, the later value
    assert tensorboard_served_steps(run_dir / "tensorboard", "train/loss") == sorted(set(train_steps))

    # one W&B run, continued: two offline sessions of the same id, the second finished
    wandb_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]["id"]
    first, second = wandb_runs(run_dir)
    assert first["dir"].name.endswith(wandb_id) and second["run"].run_id == wandb_id and second["exit"] == 0
    assert mlflow_client(ws).get_run(mlflow_run_id(run_dir)).info.status == "FINISHED"
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2

    rebuilt = cli("report", "cut", "--to", "tensorboard")  # from events.jsonl alone: the same mirror
    assert rebuilt.exit_code == 0, rebuilt.stderr
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    check_series(tensorboard_scalars(run_dir / "tensorboard"), expected(run_dir), convert=float32)


# ---------------------------------------------------------------- llmctl report


def test_report_builds_the_mirrors_of_a_run_trained_without_trackers(cli, ws):
    assert cli(*BASE, "--run", "plain", "--max-steps", "40", *SHORT).exit_code == 0
    run_dir = ws / "runs" / "plain"
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "trackers.json").exists()

    for _ in range(2):  # a second report changes nothing: no step twice
        result = cli("report", "plain", "--to", ALL, "--group", "sweep")
        assert result.exit_code == 0, result.stderr
        check_all_trackers(ws, "plain")
    assert "tensorboard: " in result.stderr and "wandb sync" in result.stderr

    run = mlflow_client(ws).get_run(mlflow_run_id(run_dir))
    assert run.data.tags["llmctl.group"] == "sweep" and run.info.status == "FINISHED"
    assert {session["run"].run_group for session in wandb_runs(run_dir)} == {"sweep"}

    probe = (
        "import sys; from llmctl.cli.main import main; code = main(sys.argv[1:]); "
        "print(code, 'torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, "report", str(run_dir), "--to", "tensorboard"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split()[-2:] == ["0", "False"], done.stderr  # no training stack loaded

    assert cli("report", "nope", "--to", "tensorboard").exit_code == 2
    assert "unknown tracker" in cli("report", "plain", "--to", "comet").stderr


def test_a_tracker_added_on_resume_receives_the_earlier_history_first(cli, ws):
    assert cli(*BASE, "--run", "late", "--max-steps", "40", *SHORT).exit_code == 0
    resumed = cli(
        "pretrain", "--run", "late", "--resume", "--max-steps", "60", "--report-to", "tensorboard,mlflow"
    )
    assert resumed.exit_code == 0, resumed.stderr
    run_dir = ws / "runs" / "late"
    wanted = expected(run_dir)
    assert min(wanted["train/loss"]) == 5 and max(wanted["train/loss"]) == 60
    check_series(tensorboard_scalars(run_dir / "tensorboard"), wanted, convert=float32)
    check_series(mlflow_metrics(mlflow_client(ws), mlflow_run_id(run_dir)), wanted)


# ---------------------------------------------------------------- trackers that fail


def test_a_missing_tracker_library_warns_and_costs_the_run_nothing(cli, ws, monkeypatch):
    for name in ("tensorboard", "wandb", "mlflow"):
        monkeypatch.setitem(sys.modules, name, None)
    result = cli(*BASE, "--run", "bare", "--max-steps", "40", "--report-to", ALL, *SHORT)
    assert result.exit_code == 0, result.stderr
    for name in ("tensorboard", "wandb", "mlflow"):
        assert result.stderr.count(f"{name} is not installed") == 1
        assert f"pip install 'llmctl[{name}]'" in result.stderr
    run_dir = ws / "runs" / "bare"
    assert steps_in_log(run_dir, "checkpoint") == [20, 40] and steps_in_log(run_dir, "end") == [40]
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "trackers.json").exists()

    missing = cli("report", "bare", "--to", "wandb")
    assert missing.exit_code == 2 and "pip install 'llmctl[wandb]'" in missing.stderr


def test_a_failing_tracker_warns_once_and_the_others_and_the_checkpoints_go_on(cli, ws, monkeypatch):
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    flushes = {"n": 0}
    real_flush = EventFileWriter.flush

    def disk_fills_up(self):
        flushes["n"] += 1
        if flushes["n"] > 8:  # a few steps in
            raise OSError(errno.ENOSPC, "No space left on device")
        real_flush(self)

    monkeypatch.setattr(EventFileWriter, "flush", disk_fills_up)
    result = cli(*BASE, "--run", "rough", "--max-steps", "60", "--report-to", ALL, *SHORT)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("TensorBoard stopped mirroring run 'rough'") == 1
    assert result.stderr.count("MLflow stopped mirroring run 'rough' at step 0") == 1
    assert (
        "No space left on device" in result.stderr and "llmctl report rough --to tensorboard" in result.stderr
    )

    run_dir = ws / "runs" / "rough"
    alerts = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "alert"]
    assert sorted(e["message"].split(" stopped")[0] for e in alerts if e["kind"] == "tracker_failed") == [
        "MLflow",
        "TensorBoard",
    ]
    assert (
        steps_in_log(run_dir, "checkpoint") == [20, 40, 60]
        and events_of(ws, "rough")[-1]["reason"] == "finished"
    )
    check_series(wandb_series(wandb_runs(run_dir)), expected(run_dir))  # the tracker that works is whole
