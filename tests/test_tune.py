"""`llmctl tune` end to end on the small real corpus: a study of short pretraining trials (pruned on
their evaluations, registered with their study, better than the default), its report and best
config; two processes sharing a study; SIGKILL mid-trial, then the same command again; bad input."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import optuna
import pytest
import yaml
from pretrain_helpers import BASE, events_of, llmctl_process

from llmctl.tune.storage import open_storage
from llmctl.workspace import Workspace

pytestmark = pytest.mark.usefixtures("single_thread")

TUNE = ["tune", *BASE[1:], "--set", "train.eval_every=10"]  # the tiny pretraining runs of pretrain_helpers
DEFAULT_LR = 1e-3  # the cpu-debug preset's rate


def study_of(ws: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(f"sqlite:///{ws / 'studies.db'}"))


def last_event(ws: Path, run: str) -> dict:
    return [event for event in events_of(ws, run) if event["event"] != "heartbeat"][-1]


# ---------------------------------------------------------------- a study


def test_a_study_prunes_poor_trials_registers_them_and_beats_the_default(cli, ws):
    # trial 0 runs the default rate (--baseline); the random ones below it learn too slowly and are
    # pruned at their first evaluation, against the median of the trials that completed
    search = ["--set", "train.min_lr=1e-7", "--param", "train.lr=log:1e-6..1e-2", "--trial-steps", "30"]
    result = cli(
        *TUNE, "--study", "lr", *search, "--trials", "6", "--baseline", "--sampler", "random", "--seed", "3",
        "--startup-trials", "1", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    summary = result.json()
    assert summary["ran"] == [0, 1, 2, 3, 4, 5] and summary["counts"]["done"] == 6

    trials = study_of(ws, "lr").get_trials()
    assert trials[0].params == {"train.lr": DEFAULT_LR} and trials[0].state.name == "COMPLETE"
    pruned = [trial for trial in trials if trial.state.name == "PRUNED"]
    complete = [trial for trial in trials if trial.state.name == "COMPLETE"]
    assert pruned and len(complete) >= 2
    baseline_at_10 = trials[0].intermediate_values[10]
    for trial in pruned:
        # stopped at the first evaluation that was worse than the median before it; its run says so
        assert list(trial.intermediate_values) == [10] and trial.intermediate_values[10] > baseline_at_10
        assert trial.params["train.lr"] < DEFAULT_LR
        end = last_event(ws, f"lr-t{trial.number:03d}")
        assert end["event"] == "end" and end["reason"] == "pruned" and end["step"] == 10

    registry = Workspace(ws).registry()
    assert registry.study("lr")["stage"] == "pretrain"
    runs = registry.trial_runs("lr")
    assert [(row["meta"]["study"], row["meta"]["trial"]) for row in runs] == [("lr", n) for n in range(6)]
    status = cli("status", "--json").json()
    assert {run["name"]: run["study"] for run in status["runs"]}["lr-t002"] == {"name": "lr", "trial": 2}
    # each trial trained with its own rate
    best = max(complete, key=lambda trial: -trial.value)
    saved = yaml.safe_load((ws / "runs" / f"lr-t{best.number:03d}" / "config.yaml").read_text())
    assert saved["train"]["lr"] == pytest.approx(best.params["train.lr"])

    # a plain run with the default rate and the same budget does no better than the best trial
    default = cli(*BASE, "--run", "default", "--set", "train.eval_every=10", "--max-steps", "30")
    assert default.exit_code == 0, default.stderr
    default_val = [event for event in events_of(ws, "default") if event["event"] == "eval"][-1]["val_loss"]
    assert (
        best.value <= default_val + 1e-6 and best.params["train.lr"] > DEFAULT_LR and best.value < default_val
    )

    shown = cli("tune", "show", "lr", "--json", "--plot", ws / "lr.png")
    assert shown.exit_code == 0, shown.stderr
    document = shown.json()
    assert document["best"]["number"] == best.number and document["counts"]["pruned"] == len(pruned)
    assert (ws / "lr.png").stat().st_size > 10_000
    written = cli("tune", "best", "lr", "--write", ws / "best.yaml")
    assert written.exit_code == 0, written.stderr
    assert yaml.safe_load((ws / "best.yaml").read_text()) == {"train": {"lr": best.params["train.lr"]}}
    shown = cli("config", "show", "--config", ws / "best.yaml", "--json")
    assert shown.exit_code == 0 and shown.json()["train"]["lr"] == pytest.approx(best.params["train.lr"])


def test_a_search_block_in_the_config_file_and_a_grid(cli, ws, tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text(
        "train:\n  lr: 2.0e-3\nsearch:\n  model.n_layer: [1, 2]\n  train:\n    warmup_steps: int:2..6:4\n"
    )
    result = cli(
        *TUNE, "--study", "grid", "--config", config, "--sampler", "grid", "--trials", "4",
        "--trial-steps", "10", "--pruner", "none", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    trials = study_of(ws, "grid").get_trials()
    points = {(t.params["model.n_layer"], t.params["train.warmup_steps"]) for t in trials}
    assert points == {(1, 2), (1, 6), (2, 2), (2, 6)}  # the whole grid, once each
    for trial in trials:
        saved = yaml.safe_load((ws / "runs" / f"grid-t{trial.number:03d}" / "config.yaml").read_text())
        assert saved["model"]["n_layer"] == trial.params["model.n_layer"]
        assert saved["train"]["warmup_steps"] == trial.params["train.warmup_steps"]
        assert saved["train"]["lr"] == 2e-3  # the rest of the file applies to every trial


# ---------------------------------------------------------------- processes sharing a study


def test_two_processes_share_one_study(ws):
    command = [*TUNE, "--study", "shared", "--param", "train.lr=log:1e-4..1e-2", "--trials", "6"]
    command += ["--trial-steps", "10", "--pruner", "none", "--json"]
    processes = [llmctl_process(ws, *command) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr
    ran = [json.loads(stdout)["ran"] for stdout, _ in outputs]
    assert ran[0] and ran[1], ran  # both took part
    trials = study_of(ws, "shared").get_trials()
    numbers = [trial.number for trial in trials]
    # distinct trial numbers, none lost: the study's trials are exactly the ones the two ran
    assert sorted(ran[0] + ran[1]) == numbers and not set(ran[0]) & set(ran[1])
    # both may start a last trial at once: at most one more than asked
    assert 6 <= len(trials) <= 7 and all(trial.state.name == "COMPLETE" for trial in trials)
    hosts = {(trial.user_attrs["pid"], trial.user_attrs["run"]) for trial in trials}
    assert len({pid for pid, _ in hosts}) == 2 and len(hosts) == len(trials)
    assert len(Workspace(ws).registry().trial_runs("shared")) == len(trials)


def test_jobs_run_trials_in_several_processes(cli, ws):
    result = cli(
        *TUNE, "--study", "jobs", "--param", "train.lr=log:1e-4..1e-2", "--trials", "2", "--jobs", "2",
        "--trial-steps", "5", "--pruner", "none",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    trials = study_of(ws, "jobs").get_trials()
    assert len(trials) == 2 and all(trial.state.name == "COMPLETE" for trial in trials)
    assert len({trial.user_attrs["pid"] for trial in trials}) == 2


# ---------------------------------------------------------------- a study survives its process


def test_sigkill_mid_trial_then_the_same_command_continues_the_study(cli, ws):
    command = [*TUNE, "--study", "killed", "--param", "train.lr=log:1e-4..1e-2", "--trials", "2"]
    command += ["--trial-time", "2s", "--set", "train.max_steps=100000", "--pruner", "none"]
    process = llmctl_process(ws, *command)
    log = ws / "runs" / "killed-t000" / "events.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and any(e["event"] == "checkpoint" for e in events_of(ws, "killed-t000"))):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert cli("status", "killed-t000", "--json").json()["run"]["state"] == "crashed"

    again = cli(*command, "--json")
    assert again.exit_code == 0, again.stderr
    trials = study_of(ws, "killed").get_trials()
    assert [trial.state.name for trial in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    # the killed trial ran again with its parameters; the study reached its count of trials
    assert trials[1].system_attrs["failed_trial"] == 0 and trials[1].params == trials[0].params
    assert again.json()["ran"] == [1, 2] and again.json()["counts"]["done"] == 2
    assert "trial 0: its process died" in again.stderr
    # the killed trial's run ended as failed, in its events and in the registry
    end = last_event(ws, "killed-t000")
    assert end["event"] == "end" and end["reason"] == "error" and "process died" in end["message"]
    assert Workspace(ws).registry().run("killed-t000")["meta"]["end_reason"] == "error"
    states = {run["name"]: run["state"] for run in cli("status", "--json").json()["runs"]}
    assert states == {"killed-t000": "failed", "killed-t001": "finished", "killed-t002": "finished"}


# ---------------------------------------------------------------- bad input


LR = ["--param", "train.lr=log:1e-4..1e-2"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--param", "train.lrr=log:1e-4..1e-2"],
            "unknown config key 'train.lrr' in 'train.lrr=log:1e-4..1e-2' — did you mean 'train.lr'?",
        ),
        (["--param", "train.warmup_steps=int:50..10"], "'train.warmup_steps=int:50..10' is an empty range"),
        (
            ["--param", "model.n_layer=choice:1,two"],
            "--param model.n_layer=choice:1,two: with model.n_layer=two, invalid value for 'model.n_layer'",
        ),
        (["--param", "model.mlp=choice:gelu,relu"], "invalid value for 'model.mlp' (got 'relu')"),
        (
            [*LR, "--objective", "val_accuracy"],
            "--objective val_accuracy: no evaluation of the pretrain stage produces it; "
            "its evaluations give val_loss, val_ppl, val_bpb",
        ),
        (
            [*LR, "--storage", "sqlite:////nonexistent/dir/studies.db"],
            "cannot open the study storage 'sqlite:////nonexistent/dir/studies.db': unable to open database",
        ),
        (
            [*LR, "--storage", "postgresql://tune@127.0.0.1:1/studies"],
            "cannot open the study storage 'postgresql://tune@127.0.0.1:1/studies'",
        ),
        (
            ["--param", "train.max_steps=int:10..20", "--trial-steps", "5"],
            "the trials would not use it — train.max_steps stays 5",
        ),
        (["--param", "adapter.r=choice:4,8"], "adapter settings do nothing"),
    ],
)
def test_bad_input_is_one_line_and_starts_no_trial(cli, ws, args, message):
    result = cli(*TUNE, "--study", "bad", *args)
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in " ".join(lines), result.stderr
    assert not (ws / "runs").exists() and Workspace(ws).registry().study("bad") is None
    assert not (ws / "studies.db").exists()
