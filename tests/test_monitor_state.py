"""The run state folded from events: curves at bounded size, derived alerts, liveness, and a
tail that survives partial lines, truncated or replaced logs and resumed runs."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

from llmctl.events import EventWriter
from llmctl.monitor.series import Series
from llmctl.monitor.state import LOST_AFTER_S, STALL_AFTER_S, RunState, process_alive
from llmctl.monitor.watch import RunWatch


def start(writer: EventWriter, step: int = 0, **figures) -> None:
    defaults = {
        "run": "r1",
        "stage": "pretrain",
        "preset": "cpu-debug",
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "device": "cpu",
        "max_steps": 1000,
    }
    writer.write("start", step, **{**defaults, **figures})


def watched(log: Path) -> RunState:
    watch = RunWatch(log)
    watch.refresh()
    return watch.state


def kinds(state: RunState) -> list[str]:
    return [alert.kind for alert in state.alerts]


def test_series_stays_bounded_and_keeps_the_curve():
    series = Series(capacity=64)
    for step in range(100_000):
        series.append(step, 10.0 - step / 10_000)
    points = series.points()
    assert len(points) <= 65
    assert points[0][0] < 2_000 and points[-1][0] > 98_000
    # every kept point is the mean of its raw points: on a straight line it lies on the line
    assert all(abs(value - (10.0 - step / 10_000)) < 1e-6 for step, value in points)


def test_series_truncates_after_a_step():
    series = Series(capacity=8)
    for step in range(20):
        series.append(step, float(step))
    series.truncate_after(9)
    assert series.points() and max(step for step, _ in series.points()) <= 9


def test_figures_are_the_figures_written(tmp_path: Path):
    log = tmp_path / "events.jsonl"
    with EventWriter(log) as writer:
        start(writer)
        writer.write(
            "train",
            10,
            loss=3.25,
            lr=2e-4,
            grad_norm=0.5,
            tokens_per_s=5120.0,
            mfu=0.25,
            mem_bytes=1.5e9,
            tokens=20480,
        )
        writer.write("eval", 10, val_loss=3.5, val_ppl=33.1, val_bpb=1.25)
        writer.write(
            "checkpoint", 10, path="runs/r1/checkpoints/step-00000010", kind="full", best=True, val_loss=3.5
        )
        writer.write("sample", 10, prompt="def f(", text="x):\n    return x")
    state = watched(log)
    assert (state.run, state.stage, state.preset, state.max_steps) == ("r1", "pretrain", "cpu-debug", 1000)
    assert state.step == 10 and state.latest["loss"] == 3.25 and state.latest["tokens_per_s"] == 5120.0
    assert state.last_eval["val_ppl"] == 33.1 and state.best_eval["val_bpb"] == 1.25
    assert state.best_checkpoint["step"] == 10 and state.sample["text"].startswith("x):")
    assert state.liveness() == "running" and state.progress(state.last_ts, "running") == 0.01


def test_nonfinite_loss_alerts_once_even_when_the_trainer_reports_it_too(tmp_path: Path):
    log = tmp_path / "events.jsonl"
    with EventWriter(log) as writer:
        start(writer)
        writer.write("train", 10, loss=float("nan"))
        writer.write("alert", 10, level="error", kind="nonfinite_loss", message="loss is nan; step skipped")
        writer.write("train", 20, loss=float("inf"))
    state = watched(log)
    assert kinds(state) == ["nonfinite_loss", "nonfinite_loss"]
    assert [alert.step for alert in state.alerts] == [10, 20]
    assert not state.train_loss.points()  # NaN never reaches the chart


def test_loss_spike_alert_and_no_alert_for_a_noisy_falling_curve(tmp_path: Path):
    log = tmp_path / "events.jsonl"
    with EventWriter(log) as writer:
        start(writer)
        for step in range(10, 1010, 10):
            noise = 0.03 * math.sin(step * 7.3)
            writer.write("train", step, loss=2.0 + 6.0 * math.exp(-step / 150) + noise)
    assert kinds(watched(log)) == []
    with EventWriter(log) as writer:
        writer.write("train", 1010, loss=4.5)
    state = watched(log)
    assert kinds(state) == ["loss_spike"] and "4.5" in state.alerts[0].message


def test_overfitting_alert_when_val_rises_while_train_falls(tmp_path: Path):
    log = tmp_path / "events.jsonl"
    with EventWriter(log) as writer:
        start(writer)
        val_losses = [3.0, 2.6, 2.4, 2.45, 2.5, 2.6, 2.7]
        for i, val_loss in enumerate(val_losses):
            for step in range(i * 100 + 10, i * 100 + 101, 10):
                writer.write("train", step, loss=3.0 - step / 1000)
            writer.write("eval", i * 100 + 100, val_loss=val_loss)
    state = watched(log)
    assert kinds(state) == ["overfitting"]  # once for the streak, not at every further rise
    assert state.alerts[0].step == 600 and state.best_eval["val_loss"] == 2.4


def test_no_overfitting_alert_when_train_loss_rises_too(tmp_path: Path):
    log = tmp_path / "events.jsonl"
    with EventWriter(log) as writer:
        start(writer)
        for i, val_loss in enumerate([2.0, 2.1, 2.2, 2.3]):
            writer.write("train", i * 100 + 50, loss=1.5 + i * 0.1)
            writer.write("eval", i * 100 + 100, val_loss=val_loss)
    assert kinds(watched(log)) == []


def test_stalled_then_lost_by_the_clock(tmp_path: Path):
    log = tmp_path / "events.jsonl"
    with EventWriter(log) as writer:
        start(writer, pid=None, host="gpu-box-elsewhere")
        writer.write("train", 10, loss=2.0)
    state = watched(log)
    assert state.liveness(state.last_ts + 5) == "running"
    stalled_at = state.last_ts + STALL_AFTER_S + 30
    assert state.liveness(stalled_at) == "stalled"
    assert [a.kind for a in state.current_alerts(stalled_at, "stalled")] == ["stalled"]
    lost_at = state.last_ts + LOST_AFTER_S + 1
    assert state.liveness(lost_at) == "crashed"
    assert "no event for" in state.current_alerts(lost_at, "crashed")[-1].message


def test_end_reasons_map_to_states(tmp_path: Path):
    for reason, expected in [
        ("finished", "finished"),
        ("early_stopping", "finished"),
        ("interrupted", "stopped"),
        ("nonfinite_loss", "failed"),
        ("error", "failed"),
    ]:
        log = tmp_path / reason / "events.jsonl"
        with EventWriter(log) as writer:
            start(writer)
            writer.write("end", 5, reason=reason, elapsed_s=1.0)
        assert watched(log).liveness() == expected, reason


def test_a_dead_pid_on_this_host_is_crashed_and_an_unknown_host_is_unknown():
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    assert process_alive(dead, socket.gethostname(), None) is False
    assert process_alive(os.getpid(), socket.gethostname(), None) is True
    assert process_alive(os.getpid(), "some-other-host", None) is None
    # a pid now used by a process started long after the run's start is not the run's process
    assert process_alive(os.getpid(), socket.gethostname(), 1.0) is False


def test_partial_last_line_waits_for_its_end(tmp_path: Path):
    log = tmp_path / "events.jsonl"
    with EventWriter(log) as writer:
        start(writer)
        writer.write("train", 10, loss=3.0)
    watch = RunWatch(log)
    watch.refresh()
    with open(log, "ab") as handle:
        handle.write(b'{"ts":1,"event":"train","step":20,"loss":2.')
    watch.refresh()
    assert watch.state.step == 10 and watch.state.latest["loss"] == 3.0
    with open(log, "ab") as handle:
        handle.write(b"5}\n")
    watch.refresh()
    assert watch.state.step == 20 and watch.state.latest["loss"] == 2.5


def test_truncated_and_replaced_logs_start_the_state_over(tmp_path: Path):
    log = tmp_path / "events.jsonl"
    with EventWriter(log) as writer:
        start(writer, run="old")
        for step in range(10, 510, 10):
            writer.write("train", step, loss=2.0)
        writer.write("train", 510, loss=float("nan"))
    watch = RunWatch(log)
    watch.refresh()
    assert watch.state.run == "old" and watch.state.alerts

    with open(log, "wb") as handle:  # truncated in place, then a longer new run written before the next poll
        handle.truncate()
    with EventWriter(log) as writer:
        start(writer, run="new")
        for step in range(10, 1010, 10):
            writer.write("train", step, loss=1.0)
    watch.refresh()
    assert watch.state.run == "new" and watch.state.step == 1000 and not watch.state.alerts
    assert len(watch.state.train_loss.points()) == 100

    copy = tmp_path / "copy.jsonl"
    with EventWriter(copy) as writer:
        start(writer, run="copied")
        writer.write("train", 7, loss=4.0)
    os.replace(copy, log)
    watch.refresh()
    assert watch.state.run == "copied" and watch.state.step == 7 and watch.state.events == 2


def test_resumed_run_continues_the_curve_from_its_checkpoint(tmp_path: Path):
    log = tmp_path / "events.jsonl"
    with EventWriter(log) as writer:
        start(writer)
        for step in range(10, 310, 10):
            writer.write("train", step, loss=3.0)
        writer.write("eval", 300, val_loss=3.1)
        # killed at step 300; the last checkpoint was at step 200
        start(writer, step=200, resumed=True)
        for step in range(210, 260, 10):
            writer.write("train", step, loss=2.0)
    state = watched(log)
    steps = [step for step, _ in state.train_loss.points()]
    assert state.starts == 2 and state.step == 250
    assert steps == sorted(steps) and steps[-1] == 250  # the old steps 210-300 were dropped
    assert [step for step, _ in state.val_loss.points()] == []
    assert state.liveness() == "running"


def test_big_log_read_in_slices_gives_the_same_state(tmp_path: Path):
    log = tmp_path / "events.jsonl"
    with EventWriter(log) as writer:
        start(writer)
        for step in range(1, 5001):
            writer.write("train", step, loss=5.0 - step / 5000)
    whole = watched(log)
    sliced = RunWatch(log)
    slices = 0
    while True:
        sliced.refresh(max_bytes=16_384)
        slices += 1
        if not sliced.catching_up:
            break
    assert slices > 10
    assert sliced.state.events == whole.events == 5001
    assert sliced.state.train_loss.points() == whole.train_loss.points()


def test_skimming_train_lines_gives_the_same_status_row(tmp_path: Path):
    log = tmp_path / "events.jsonl"
    with EventWriter(log) as writer:
        start(writer)
        for step in range(1, 3001):
            writer.write("train", step, loss=4.0 - step / 1000, tokens_per_s=1000.0 + step)
            if step % 500 == 0:
                writer.write("eval", step, val_loss=4.1 - step / 1000, val_ppl=60.0 - step / 100, val_bpb=1.5)
            if step % 1000 == 0:
                writer.write("checkpoint", step, path=f"ckpt-{step}", kind="full", best=True, val_loss=1.0)
        writer.write("heartbeat", 3000)
    full, skimmed = RunWatch(log), RunWatch(log, skim=True)
    full.refresh()
    skimmed.refresh()
    now = full.state.last_ts + 1
    a, b = full.state.summary(now), skimmed.state.summary(now)
    for key in (
        "state",
        "step",
        "max_steps",
        "elapsed_s",
        "last_event_age_s",
        "best_eval",
        "last_eval",
        "best_checkpoint",
        "latest_checkpoint",
    ):
        assert a[key] == b[key], key
    assert b["train"]["loss"] == a["train"]["loss"] == 1.0 and b["train"]["tokens_per_s"] == 4000.0
    assert skimmed.state.events < 20 < full.state.events


def test_progress_and_eta_follow_the_limit_reached_first(tmp_path: Path):
    log = tmp_path / "events.jsonl"
    with EventWriter(log) as writer:
        start(writer, max_steps=100_000, max_time_s=100.0, max_tokens=None)
        writer.write("train", 10, loss=3.0, elapsed_s=20.0, tokens=1000, tokens_per_s=50.0)
        writer.write("train", 20, loss=2.9, elapsed_s=25.0, tokens=2000, tokens_per_s=50.0)
    state = watched(log)
    now = state.last_ts
    assert [limit.kind for limit in state.limits(now, "running")] == ["steps", "time"]
    assert state.progress(now, "running") == 0.25  # 25 s of 100 s, far ahead of 20 of 100,000 steps
    assert state.eta_s(now, "running") == 75.0
    assert state.progress(now + 10, "running") == 0.35  # the trainer's clock runs on between events
    assert state.eta_s(now, "finished") is None


def test_a_log_far_behind_is_sampled_then_read_in_full(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(RunWatch, "FULL_READ_BYTES", 64 << 10)
    monkeypatch.setattr(RunWatch, "MIN_SAMPLE_BYTES", 4 << 10)
    log = tmp_path / "events.jsonl"
    with EventWriter(log) as writer:
        start(writer, max_steps=20_000)
        for step in range(1, 20_001):
            writer.write("train", step, loss=9.0 - step / 4000, tokens_per_s=1000.0)
            if step % 1000 == 0:
                writer.write("eval", step, val_loss=9.1 - step / 4000, val_ppl=100.0, val_bpb=2.0)
        writer.write("train", 20_000, loss=float("nan"))
    full, sampled = RunWatch(log), RunWatch(log)
    full.FULL_READ_BYTES = 1 << 40  # the reference reads every line
    full.refresh()
    sampled.refresh()
    assert sampled.state.events < full.state.events / 3  # most train lines were never parsed
    now = full.state.last_ts
    a, b = full.state.summary(now), sampled.state.summary(now)
    for key in ("state", "step", "progress", "last_eval", "best_eval", "train", "alerts"):
        assert a[key] == b[key], key
    steps = [step for step, _ in sampled.state.train_loss.points()]
    assert steps[0] < 1000 and steps[-1] > 19_900 and len(steps) > 200
    assert len(sampled.state.val_loss.points()) == 20  # every evaluation is read
    assert all(abs(value - (9.0 - step / 4000)) < 0.05 for step, value in sampled.state.train_loss.points())
