"""A real `llmctl pretrain` seen from outside: running, then finished; SIGKILLed, then crashed.

Both runs train a one-layer, 32-wide model so the steps are milliseconds and the time goes to
starting torch; they run side by side.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TINY_MODEL = [
    "--preset",
    "cpu-debug",
    "--set",
    "model.n_layer=1",
    "--set",
    "model.d_model=32",
    "--set",
    "model.n_head=2",
    "--set",
    "model.context_length=16",
    "--set",
    "train.micro_batch_size=4",
    "--set",
    "train.log_every=5",
    "--set",
    "train.eval_every=50",
    "--set",
    "train.eval_batches=2",
    "--set",
    "train.warmup_steps=2",
    "--set",
    "train.max_steps=1000000",
]


def pretrain(run: str, *limits: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "llmctl",
        "pretrain",
        "--corpus",
        "tiny",
        "--tokenizer",
        "bytes",
        "--run",
        run,
        *TINY_MODEL,
        *limits,
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(cli, run: str, predicate, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = {row["name"]: row for row in cli("status", "--json").json()["runs"]}
        if run in runs and predicate(runs[run]):
            return runs[run]
        time.sleep(0.2)
    raise AssertionError(f"run {run} never matched; last seen {runs.get(run)}")


def test_a_real_pretrain_run_is_running_then_finished_and_a_killed_one_crashed(cli, tmp_path: Path):
    sources = tmp_path / "src"
    sources.mkdir()
    for i in range(8):
        (sources / f"m{i}.py").write_text(
            "".join(f"def f{i}_{j}(x):\n    return x * {j}\n" for j in range(300))
        )
    assert cli("corpus", "build", "tiny", "--source", sources).exit_code == 0
    assert cli("tokenizer", "train", "bytes", "--corpus", "tiny", "--kind", "byte").exit_code == 0

    finishing = pretrain("finishing", "--max-time", "8s")
    doomed = pretrain("doomed", "--max-time", "120s")
    try:
        running = wait_for(cli, "finishing", lambda row: row["state"] == "running" and row["step"] > 0)
        assert running["stage"] == "pretrain" and running["last_event_age_s"] < 30

        wait_for(cli, "doomed", lambda row: row["state"] == "running" and row["step"] > 0)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        crashed = wait_for(cli, "doomed", lambda row: row["state"] != "running", timeout=10)
        assert crashed["state"] == "crashed"
        detail = cli("status", "doomed", "--json").json()
        assert (
            detail["alerts"][-1]["kind"] == "crashed"
            and f"process {doomed.pid}" in detail["alerts"][-1]["message"]
        )

        assert finishing.wait(timeout=120) == 0, finishing.stderr.read()
        finished = wait_for(cli, "finishing", lambda row: row["state"] != "running", timeout=10)
        assert finished["state"] == "finished" and finished["step"] > running["step"]
        assert (
            finished["best_eval"]["val_loss"] > 0
            and finished["latest_checkpoint"]["step"] == finished["step"]
        )
        frame = cli("monitor", "finishing", "--once", "--width", 120).stdout
        assert "finished: max time at step" in frame and "✓ no alerts" in frame
    finally:
        for process in (finishing, doomed):
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
