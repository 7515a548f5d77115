"""The plan's memory estimate (what `--dry-run` shows and presets are chosen by) against the memory a
short run really takes on this CPU, for pretrain, full finetune, LoRA and QLoRA.

Each run is a child process; its peak resident size comes from wait4's ru_maxrss. The same command
with --dry-run is the baseline, measured the same way: the interpreter, torch, peft, bitsandbytes,
the tokenizer and the plan, everything but the training itself. What the run holds above that
baseline is compared with the estimate's tensors plus its 10% allocator margin (the estimate's
0.5 GiB stands for a GPU's CUDA context, which a CPU run does not have; the baseline takes its
place).

Tolerance (TOLERANCE): within 35% either way. The estimate counts tensor bytes; resident pages
are coarser: oneDNN's scratch buffers, autograd's saved tensors where a kernel keeps more or less
than the Korthikanti count, the checkpoint written at the end, and glibc's heap each move the
peak by tens of megabytes on runs of a few hundred. A term missing from the estimate (a moment,
the gradients, a layer's activations) moves it by 25-100% at these shapes, which is what the
test is there to catch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from finetune_helpers import task_records, write_jsonl
from pretrain_helpers import one_thread

from llmctl.cli.main import main
from llmctl.data.build import BuildOptions, build_corpus
from llmctl.model.sizing import GIB
from llmctl.tokenizer_build import train_tokenizer
from llmctl.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.35
SHAPE = [
    "--set",
    "model.n_layer=4",
    "--set",
    "model.n_head=8",
    "--set",
    "model.d_model=512",
    "--set",
    "model.context_length=128",
]
RUN = [
    "--precision",
    "fp32",
    "--max-steps",
    "3",
    "--set",
    "train.micro_batch_size=8",
    "--set",
    "train.eval_batches=1",
]
STAGES = {
    "pretrain": ["pretrain", "--corpus", "code", "--tokenizer", "bytes", "--preset", "cpu-debug", *SHAPE],
    "full finetune": ["finetune", "--model", "mem-base"],
    "lora": ["finetune", "--model", "mem-base", "--lora", "--lora-r", "16"],
    # without activation checkpointing (qlora's default), so that what the estimate counts is most of
    # what the run holds: with it, 60 MB of activations would sit beside 40 MB of imports and buffers
    # the dry run does not have
    "qlora": [
        "qlora",
        "--model",
        "mem-base",
        "--lora-r",
        "16",
        "--set",
        "train.activation_checkpointing=false",
    ],
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A byte tokenizer, a few stdlib files and run 'mem-base': the model the finetunes start from."""
    root = tmp_path_factory.mktemp("memory") / "workspace"
    with one_thread():
        build_corpus(Workspace(root), "code", ["stdlib"], BuildOptions(limit=20, val_fraction=0.2))
        train_tokenizer(Workspace(root), "bytes", "code", vocab_size=None, kind="byte")
        args = [*STAGES["pretrain"], *RUN, "--run", "mem-base", "--max-steps", "1"]
        assert main(["--workspace", str(root), *args]) == 0
    write_jsonl(root / "task.jsonl", task_records() * 20)
    return root


# Linux carries a process's peak resident size across fork and exec, so a child of this test
# process (hundreds of MB) would report at least that. A fresh, small launcher forks the run.
LAUNCHER = """
import os, subprocess, sys
with open(sys.argv[2], "w") as log:
    child = subprocess.Popen(sys.argv[3:], stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(f"{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def peak_rss(workspace: Path, args: list[str]) -> int:
    """Peak resident bytes of `llmctl ARGS` in a child process (wait4's ru_maxrss, KiB on Linux)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "160"}
    result, log = workspace / "rss.txt", workspace / "child.log"
    command = [sys.executable, "-m", "llmctl", "--workspace", str(workspace), *args]
    subprocess.run([sys.executable, "-c", LAUNCHER, result, log, *command], env=env, check=True, timeout=600)
    kib, code = map(int, result.read_text().split())
    assert code == 0, log.read_text()[-3000:]
    return kib * 1024


@pytest.mark.parametrize("stage", ["pretrain", "full finetune", "lora", "qlora"])
def test_the_plans_memory_estimate_is_what_a_short_run_takes(workspace, cli, stage):
    args = [*STAGES[stage], *RUN]
    if stage != "pretrain":
        args += ["--data", str(workspace / "task.jsonl")]
    run = f"mem-{stage.replace(' ', '-')}"
    plan = cli("--workspace", workspace, *args, "--run", run, "--dry-run", "--json")
    assert plan.exit_code == 0, plan.stderr
    estimate = plan.json()["memory"]
    tensors = estimate["weights"] + estimate["gradients"] + estimate["optimizer"] + estimate["activations"]
    assert estimate["total"] == pytest.approx(1.1 * tensors + GIB // 2, abs=2)

    baseline = peak_rss(workspace, [*args, "--run", run, "--dry-run"])
    measured = peak_rss(workspace, [*args, "--run", run]) - baseline
    expected = 1.1 * tensors
    print(
        f"\nMEM {stage}: measured {measured / 2**20:.0f} MiB, estimated {expected / 2**20:.0f} MiB {estimate}"
    )
    assert measured == pytest.approx(expected, rel=TOLERANCE), (measured, estimate)
