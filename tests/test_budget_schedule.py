"""A run bounded by time schedules its learning rate over that time: the cosine reaches its floor
when the budget ends, with the total estimated once from the measured steps and saved, so a run
killed with SIGKILL and resumed ends bit-identical to an uninterrupted run over the same steps."""

from __future__ import annotations

import itertools
import signal
import time
from pathlib import Path

import pytest
import torch
from pretrain_helpers import BASE, events_of, llmctl_process, wait_for_event
from safetensors.torch import load_file

from llmctl.config import TrainConfig
from llmctl.train.optim import CosineSchedule, TimeBudget

pytestmark = pytest.mark.usefixtures("single_thread")

PEAK, FLOOR = 3e-3, 3e-4
LIMITS = ["--set", f"train.lr={PEAK}", "--set", f"train.min_lr={FLOOR}", "--max-steps", "100000"]


def _trainer_state(ws: Path, run: str, step: int | None = None) -> tuple[int, dict]:
    root = ws / "runs" / run / "checkpoints"
    directory = root / f"step-{step:08d}" if step else sorted(root.iterdir())[-1]
    return int(directory.name.removeprefix("step-")), torch.load(
        directory / "trainer_state.pt", weights_only=True
    )


def test_the_estimate_waits_for_the_measured_steps_and_counts_the_evaluations():
    train = TrainConfig(max_time=100.0, eval_every=10, eval_batches=6, grad_accum_steps=1)
    budget = TimeBudget(train, first_step=0)
    # the first two steps (allocation, compilation) are slow and not counted
    assert budget.estimate(1, 3.0) is None and budget.estimate(2, 4.0) is None
    # 0.1 s a step from step 2 on; the estimate waits for 10 steps and 10 s (10% of the budget)
    assert budget.estimate(12, 5.0) is None and budget.estimate(92, 13.0) is None
    # at step 102, 10 s measured: 0.1 s a step, plus an evaluation (6 batches, a third of a step
    # each) every 10 steps: 0.12 s; the 86 s left hold 716 more steps
    assert budget.estimate(102, 14.0) == 102 + int(86.0 / 0.12)

    schedule = CosineSchedule(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), train, None)
    schedule.fix_total(200)
    restored = CosineSchedule(schedule.optimizer, train, None)
    restored.load_state_dict(schedule.state_dict())
    assert restored.estimated and restored.total_steps == 200
    assert restored.lr_at(200) == train.min_lr


def test_a_time_bounded_run_decays_to_its_floor_when_the_time_ends(cli, ws):
    result = cli(*BASE, "--run", "timed", *LIMITS, "--max-time", "3s")
    assert result.exit_code == 0, result.stderr
    events = events_of(ws, "timed")
    train = [event for event in events if event["event"] == "train"]
    assert events[-1]["reason"] == "max_time"
    end_step, state = _trainer_state(ws, "timed")
    estimate = state["schedule"]["estimated_total_steps"]
    # the estimate holds roughly the steps the time did (other processes slow a shared machine's
    # steps unevenly, so the bounds are loose)
    assert 0.5 * end_step < estimate < 2 * end_step, (estimate, end_step)
    # once fixed, the rate follows the cosine over the estimate: the last half of the run surely
    schedule = CosineSchedule(None, TrainConfig(lr=PEAK, min_lr=FLOOR, warmup_steps=5), estimate)
    late = [event for event in train if event["step"] > end_step / 2]
    assert late and all(event["lr"] == pytest.approx(schedule.lr_at(event["step"] - 1)) for event in late)
    # it rose through warmup to the peak, then fell; the last steps trained near the floor, where a
    # run that did not know its length kept the peak rate
    lrs = [event["lr"] for event in train]
    peak = lrs.index(max(lrs))
    assert lrs[peak] == pytest.approx(PEAK) and all(a >= b for a, b in itertools.pairwise(lrs[peak:]))
    assert lrs[-1] - FLOOR < 0.5 * (PEAK - FLOOR), (lrs[-5:], estimate, end_step)
    if estimate <= end_step:
        assert lrs[-1] == pytest.approx(FLOOR)


def test_resume_after_sigkill_keeps_the_estimate_and_ends_bit_identical(cli, ws):
    # warmup outlasts the measurement, so every step before the estimate has the same rate as in a
    # run that knew its length from the start; dropout: the torch RNG must be restored too
    settings = [
        "--set",
        "train.warmup_steps=150",
        "--set",
        "train.save_every=10",
        "--set",
        "model.dropout=0.1",
    ]
    process = llmctl_process(ws, *BASE, "--run", "cut", *LIMITS, *settings, "--max-time", "4s")
    wait_for_event(ws, "cut", "checkpoint", process)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        step, state = _trainer_state(ws, "cut")
        if "estimated_total_steps" in state["schedule"]:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not any(event["event"] == "end" for event in events_of(ws, "cut"))
    estimate = state["schedule"]["estimated_total_steps"]
    assert step < estimate and step < 150, (step, estimate)

    # the resumed run keeps the fixed estimate whatever its clock says now: given the time, it ends
    # at the estimated step, exactly where an uninterrupted run of that length ends
    resumed = cli("pretrain", "--run", "cut", "--resume", "--max-steps", estimate, "--max-time", "10m")
    assert resumed.exit_code == 0, resumed.stderr
    assert events_of(ws, "cut")[-1]["reason"] == "finished"
    whole = cli(*BASE, "--run", "whole", *LIMITS[:4], *settings, "--max-steps", estimate)
    assert whole.exit_code == 0, whole.stderr

    _, cut_state = _trainer_state(ws, "cut", estimate)
    _, whole_state = _trainer_state(ws, "whole", estimate)
    assert cut_state["schedule"] == {"step_index": estimate, "estimated_total_steps": estimate}
    weights = load_file(
        str(ws / "runs" / "cut" / "checkpoints" / f"step-{estimate:08d}" / "model.safetensors")
    )
    expected = load_file(
        str(ws / "runs" / "whole" / "checkpoints" / f"step-{estimate:08d}" / "model.safetensors")
    )
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], expected[name]) for name in weights)
    moments, expected_moments = cut_state["optimizer"]["state"], whole_state["optimizer"]["state"]
    assert all(torch.equal(moments[k]["exp_avg_sq"], expected_moments[k]["exp_avg_sq"]) for k in moments)
