"""The default suite computes on the CPU even on a GPU host (conftest.py's `pinned_device`).

A GPU is out of reach here, so the tests that need one describe it to torch (`is_available`,
`device_count`); the pin, the device rule and the CLI's plan are the real ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pretrain_helpers import BASE

from llmctl.errors import UsageError
from llmctl.model.device import AUTO_DEVICE_ENV, resolve_device

ROOT = Path(__file__).resolve().parents[1]
CUDA_FILES = ["tests/test_cuda.py", "tests/test_cuda_adapters.py"]


def a_gpu_is_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_the_pin_makes_auto_the_cpu_while_an_explicit_device_still_wins(monkeypatch, pinned_device):
    assert pinned_device == "cpu" and os.environ[AUTO_DEVICE_ENV] == "cpu"
    a_gpu_is_visible(monkeypatch)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("auto", local_rank=1, setting="train.device") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda", 0)  # what a user names is not overridden
    monkeypatch.delenv(AUTO_DEVICE_ENV)
    assert resolve_device("auto") == torch.device("cuda", 0)


def test_a_pin_to_a_missing_gpu_is_a_usage_error_naming_the_variable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(AUTO_DEVICE_ENV, "cuda")
    message = "LLMCTL_DEVICE is 'cuda' but no CUDA GPU is visible; use LLMCTL_DEVICE=cpu"
    with pytest.raises(UsageError, match=message):
        resolve_device("auto", setting="train.device")


def test_a_dry_run_plans_the_cpu_when_the_config_says_auto_and_a_gpu_is_visible(cli, ws, monkeypatch):
    a_gpu_is_visible(monkeypatch)
    plan = cli(*BASE, "--run", "p", "--dry-run", "--json", "--set", "train.device=auto", "--nproc", "2")
    assert plan.exit_code == 0, plan.stderr
    summary = plan.json()
    # the failures the issue names: auto on CUDA with compile, rank 1 on a cuda:1 that is not there
    assert summary["device"] == "cpu" and summary["compile"] is False
    assert summary["precision"] in ("bf16", "fp32") and summary["world_size"] == 2


def test_the_processes_a_test_starts_inherit_the_pin():
    probe = (
        "import torch; torch.cuda.is_available = lambda: True; torch.cuda.device_count = lambda: 1\n"
        "from llmctl.model.device import resolve_device; print(resolve_device('auto'))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "cpu"


def test_cuda_marked_tests_skip_without_a_gpu_and_name_it():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the cuda-marked tests run here instead of skipping")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-rs", "-p", "no:cacheprovider", *CUDA_FILES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    summary = run.stdout.strip().splitlines()[-1]
    assert "skipped" in summary and "passed" not in summary and "failed" not in summary, run.stdout
    assert "needs a CUDA GPU: torch.cuda.is_available() is False" in run.stdout
