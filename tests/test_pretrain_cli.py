"""`llmctl pretrain` end to end on a small real corpus: training, the registry, dry runs, bad input,
exact resume after SIGKILL, SIGTERM, and references to the checkpoints it writes."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from pretrain_helpers import (
    BASE,
    events_of,
    llmctl_process,
    nothing_written,
    wait_for_event,
)
from safetensors.torch import load_file

from llmctl.checkpoint.load import load_model
from llmctl.checkpoint.refs import resolve_model_ref
from llmctl.errors import UsageError
from llmctl.workspace import Workspace

pytestmark = pytest.mark.usefixtures("single_thread")


def sets(assignments: str) -> list[str]:
    """'a=1 b=2' -> ['--set', 'a=1', '--set', 'b=2']"""
    return [part for assignment in assignments.split() for part in ("--set", assignment)]


# ---------------------------------------------------------------- a whole run


def test_pretrain_trains_and_records_the_run(cli, ws):
    settings = "train.eval_every=20 train.save_every=20 train.keep_last=1 train.lr=3e-3 train.sample_every=30"
    result = cli(*BASE, "--run", "base", "--max-steps", "60", *sets(settings))
    assert result.exit_code == 0, result.stderr
    assert "run 'base' ended (finished) at step 60" in result.stderr

    events = events_of(ws, "base")
    start = events[0]
    assert start["event"] == "start" and start["stage"] == "pretrain" and start["pid"] == os.getpid()
    assert start["device"] == "cpu" and start["max_steps"] == 60 and start["world_size"] == 1
    assert start["tokens_per_step"] == 4 * 32 and start["params"] > 0 and not start["resumed"]
    train = [event for event in events if event["event"] == "train"]
    figures = {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_bytes", "tokens", "elapsed_s"}
    assert figures <= set(train[0])
    evals = [event for event in events if event["event"] == "eval"]
    assert [event["step"] for event in evals] == [20, 40, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and evals[-1]["val_bpb"] < evals[0]["val_bpb"]
    assert events[-1]["event"] == "end" and events[-1]["reason"] == "finished"
    samples = [event for event in events if event["event"] == "sample"]
    assert [event["step"] for event in samples] == [30, 60]
    assert all(event["prompt"] == "" and isinstance(event["text"], str) for event in samples)

    saved = (ws / "runs" / "base" / "config.yaml").read_text()
    assert "vocab_size: 512" in saved  # the tokenizer's vocabulary replaced the preset's 8192
    assert "precision: bf16" in saved or "precision: fp32" in saved  # 'auto' is saved as what it chose

    registry = Workspace(ws).registry()
    row = registry.run("base")
    assert (row["stage"], row["corpus"], row["tokenizer"]) == ("pretrain", "code", "tok")
    assert row["meta"]["config"]["model"]["d_model"] == 32 and row["meta"]["end_reason"] == "finished"
    checkpoints = registry.checkpoints("base")
    assert checkpoints[-1]["step"] == 60 and checkpoints[-1]["meta"]["val_loss"] == pytest.approx(
        evals[-1]["val_loss"], abs=1e-5
    )
    on_disk = sorted(path.name for path in (ws / "runs" / "base" / "checkpoints").iterdir())
    # keep_last pruned rows and directories alike
    assert on_disk == [Path(c["path"]).name for c in checkpoints]

    # model references resolve to those checkpoints and load the model that wrote them
    assert resolve_model_ref(Workspace(ws), "base:latest").name == "step-00000060"
    assert resolve_model_ref(Workspace(ws), "base").name == resolve_model_ref(Workspace(ws), "base:best").name
    loaded = load_model(Workspace(ws), "base:step-60")
    assert loaded.config.model.d_model == 32 and loaded.tokenizer.vocab_size == 512
    ids = torch.tensor([loaded.tokenizer.encode("def main():\n    return 0\n")])
    again = load_model(Workspace(ws), str(loaded.path))
    assert torch.equal(loaded.model(ids), again.model(ids))
    with pytest.raises(UsageError, match="no checkpoint at step 7"):
        resolve_model_ref(Workspace(ws), "base:step-7")
    with pytest.raises(UsageError, match="did you mean 'base'"):
        resolve_model_ref(Workspace(ws), "bsae")


def test_dry_run_prints_the_plan_and_writes_nothing(cli, ws):
    result = cli(*BASE, "--run", "plan", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    plan = result.json()
    assert plan["params"] > 0 and plan["tokens_per_step"] == 128 and plan["total_steps"] == 2000
    assert plan["memory"]["total"] > plan["memory"]["weights"] > 0 and plan["fits"]
    assert nothing_written(ws, "plan")

    table = cli("pretrain", "--corpus", "code", "--tokenizer", "tok", "--preset", "gpt2-124m", "--dry-run")
    assert table.exit_code == 0, table.stderr
    for line in ("parameters", "tokens per step", "device memory"):
        assert line in table.stdout

    # processes on one CPU node share its RAM: each is measured against its share
    two = cli(*BASE, "--run", "plan", "--dry-run", "--json", "--nproc", "2").json()
    assert two["world_size"] == 2 and two["device_memory_shared_by"] == 2
    assert two["device_memory"] == plan["device_memory"] // 2 and plan["device_memory_shared_by"] == 1
    table = cli(*BASE, "--run", "plan", "--dry-run", "--nproc", "2")
    assert "(RAM / 2 processes)" in table.stdout

    huge = cli(*BASE, "--dry-run", "--json", *sets("model.n_layer=64 model.d_model=8192 model.n_head=64"))
    assert huge.exit_code == 0, huge.stderr  # a dry run shows what does not fit instead of refusing
    assert not huge.json()["fits"] and huge.json()["suggestion"]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "model.vocab_size=1000"], "model.vocab_size is 1000 but tokenizer 'tok' has 512 tokens"),
        (["--set", "model.context_length=100000"], "corpus 'code' is too small"),
        (
            ["--set", "model.n_layer=64", "--set", "model.d_model=8192", "--set", "model.n_head=64"],
            "exceeds cpu's",
        ),
        (["--tokenizer", "nope"], "tokenizer 'nope' does not exist"),
        (["--set", "train.lrr=1"], "did you mean 'train.lr'"),
        (["--precision", "fp16"], "fp16 needs a CUDA GPU"),
        (["--resume", "--overwrite"], "give one of them"),
        (["--json"], "--json prints the plan of a --dry-run"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(cli, ws, args, message):
    result = cli(*BASE, "--run", "bad", *args)
    assert result.exit_code != 0
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert nothing_written(ws, "bad")


def test_existing_runs_need_resume_or_overwrite_and_a_run_without_checkpoint_resumes_from_zero(cli, ws):
    assert cli(*BASE, "--run", "r", "--max-steps", "5").exit_code == 0
    again = cli(*BASE, "--run", "r", "--max-steps", "5")
    assert again.exit_code == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr

    fresh = cli(*BASE, "--run", "r", "--max-steps", "10", "--overwrite")
    assert fresh.exit_code == 0, fresh.stderr
    assert [e["event"] for e in events_of(ws, "r")].count("start") == 1  # the old run is gone

    missing = cli("pretrain", "--run", "ghost", "--resume")
    assert missing.exit_code == 2 and "run 'ghost' does not exist" in missing.stderr

    # a run stopped before its first checkpoint starts again from step 0, with its saved config
    shutil.rmtree(ws / "runs" / "r" / "checkpoints")
    restarted = cli("pretrain", "--run", "r", "--resume")
    assert restarted.exit_code == 0, restarted.stderr
    assert "run 'r' has no checkpoint yet" in restarted.stderr and "from step 0" in restarted.stderr
    starts = [e for e in events_of(ws, "r") if e["event"] == "start"]
    assert len(starts) == 1 and starts[0]["step"] == 0 and not starts[0]["resumed"]
    assert starts[0]["max_steps"] == 10  # the saved config's, not the preset's


def test_a_corrupt_checkpoint_is_named_and_fallback_resumes_from_the_previous_one(cli, ws):
    assert cli(*BASE, "--run", "c", "--max-steps", "10", "--set", "train.save_every=5").exit_code == 0
    weights = ws / "runs" / "c" / "checkpoints" / "step-00000010" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    refused = cli("pretrain", "--run", "c", "--resume", "--max-steps", "12")
    assert refused.exit_code == 1 and f"'{weights}' is corrupt or truncated" in refused.stderr
    assert "--fallback" in refused.stderr
    sampled = cli("sample", "--model", "c:latest", "--prompt", "x")  # any command that loads it
    assert sampled.exit_code == 1 and f"'{weights}' is corrupt or truncated" in sampled.stderr
    assert "load another checkpoint of run 'c' (c:step-5)" in sampled.stderr
    resumed = cli("pretrain", "--run", "c", "--resume", "--max-steps", "12", "--fallback")
    assert resumed.exit_code == 0, resumed.stderr
    assert "warning" in resumed.stderr and str(weights) in resumed.stderr
    starts = [event for event in events_of(ws, "c") if event["event"] == "start"]
    assert starts[-1]["resumed"] and starts[-1]["step"] == 5


# ---------------------------------------------------------------- resume and signals


def _final_state(ws: Path, run: str, step: int) -> tuple[dict, dict]:
    directory = ws / "runs" / run / "checkpoints" / f"step-{step:08d}"
    trainer_state = torch.load(directory / "trainer_state.pt", weights_only=True)
    return load_file(str(directory / "model.safetensors")), trainer_state


def test_resume_after_sigkill_ends_bit_identical_to_an_uninterrupted_run(cli, ws):
    # dropout: the torch RNG must be restored too
    steps = ["--max-steps", "300", *sets("train.save_every=25 train.eval_every=50 model.dropout=0.1")]
    assert cli(*BASE, "--run", "whole", *steps).exit_code == 0

    process = llmctl_process(ws, *BASE, "--run", "cut", *steps)
    wait_for_event(ws, "cut", "checkpoint", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = [e for e in events_of(ws, "cut") if e["event"] != "heartbeat"][-1]["step"]
    assert killed_at < 300 and not any(e["event"] == "end" for e in events_of(ws, "cut"))

    resumed = cli("pretrain", "--run", "cut", "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    weights, state = _final_state(ws, "cut", 300)
    expected_weights, expected_state = _final_state(ws, "whole", 300)
    assert weights.keys() == expected_weights.keys()
    assert all(torch.equal(weights[name], expected_weights[name]) for name in weights)
    moments = state["optimizer"]["state"]
    expected_moments = expected_state["optimizer"]["state"]
    assert all(torch.equal(moments[k]["exp_avg_sq"], expected_moments[k]["exp_avg_sq"]) for k in moments)
    assert state["tokens"] == expected_state["tokens"] and state["batches"] == expected_state["batches"]


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_exits_128_plus_it(ws, signum, exit_code):
    process = llmctl_process(ws, *BASE, "--run", "term", "--max-steps", "100000")
    wait_for_event(ws, "term", "train", process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == exit_code, stderr
    end = events_of(ws, "term")[-1]
    assert end["event"] == "end" and end["reason"] == "interrupted"
    checkpoint = ws / "runs" / "term" / "checkpoints" / f"step-{end['step']:08d}"
    assert (checkpoint / "meta.json").is_file()
    assert "--resume" in stderr
    row = Workspace(ws).registry().checkpoint_at("term", end["step"])
    assert row is not None and json.loads((checkpoint / "meta.json").read_text())["step"] == end["step"]


def test_time_and_token_limits_end_the_run(cli, ws):
    timed = cli(*BASE, "--run", "timed", "--max-steps", "100000", "--max-time", "2s")
    assert timed.exit_code == 0, timed.stderr
    end = events_of(ws, "timed")[-1]
    assert end["reason"] == "max_time" and 2 <= end["elapsed_s"] < 10

    counted = cli(*BASE, "--run", "counted", "--max-tokens", "1.2k")  # 1200 tokens: 10 steps of 128
    assert counted.exit_code == 0, counted.stderr
    events = events_of(ws, "counted")
    assert events[0]["max_steps"] == 10  # --max-tokens alone replaced the preset's 2000 steps
    assert events[-1]["reason"] == "max_tokens" and events[-1]["step"] == 10 and events[-1]["tokens"] == 1280
