"""`llmctl pretrain --nproc 2` on CPU: torch.distributed.run, gloo, DDP, rank-0 checkpoints, resume."""

from __future__ import annotations

import pytest
from pretrain_helpers import BASE, events_of, llmctl_process

from llmctl.workspace import Workspace

pytestmark = pytest.mark.usefixtures("single_thread")


def test_two_gloo_processes_with_half_the_batch_follow_the_single_process_curve(cli, ws):
    schedule = [
        "--max-steps",
        "30",
        "--precision",
        "fp32",
        "--set",
        "train.eval_every=10",
        "--set",
        "train.save_every=10",
    ]
    assert cli(*BASE, "--run", "one", *schedule, "--set", "train.micro_batch_size=8").exit_code == 0
    process = llmctl_process(
        ws, *BASE, "--run", "two", *schedule, "--set", "train.micro_batch_size=4", "--nproc", "2"
    )
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr

    def curve(run: str, kind: str, figure: str) -> list[float]:
        return [event[figure] for event in events_of(ws, run) if event["event"] == kind]

    assert curve("two", "start", "distributed") == ["gloo"] and curve("one", "start", "distributed") == [None]
    assert curve("two", "start", "world_size") == [2] and curve("two", "start", "tokens_per_step") == [8 * 32]
    assert curve("two", "train", "loss") == pytest.approx(curve("one", "train", "loss"), abs=1e-4)
    assert curve("two", "eval", "val_loss") == pytest.approx(curve("one", "eval", "val_loss"), abs=1e-4)
    assert len(Workspace(ws).registry().checkpoints("two")) == 3  # rank 0 alone registered them

    process = llmctl_process(ws, "pretrain", "--run", "two", "--resume", "--max-steps", "35", "--nproc", "2")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    starts = [event for event in events_of(ws, "two") if event["event"] == "start"]
    assert starts[-1]["resumed"] and starts[-1]["step"] == 30 and events_of(ws, "two")[-1]["step"] == 35
