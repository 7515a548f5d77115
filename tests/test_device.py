"""One device rule for training, generation and evaluation (llmctl.model.device).

A machine with several GPUs is out of reach here, so the tests that need one describe it to torch
(`is_available`, `device_count`); everything else is the real rule."""

from __future__ import annotations

import pytest
import torch

from llmctl.errors import UsageError
from llmctl.model.device import resolve_device


def test_auto_is_the_cpu_without_a_gpu_and_names_are_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="invalid --device 'gpu0': use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    with pytest.raises(
        UsageError, match=r"train.device is 'cuda' but no CUDA GPU is visible; use --set train"
    ):
        resolve_device("cuda", setting="train.device")
    with pytest.raises(UsageError, match="use --device cpu"):
        resolve_device("cuda:0")


def test_each_process_takes_the_gpu_of_its_rank_and_a_missing_one_names_the_count(monkeypatch):
    monkeypatch.delenv("LLMCTL_DEVICE")  # the suite's pin to the CPU (conftest.py), lifted here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    with pytest.raises(
        UsageError,
        match=r"process 2 of this node asks for cuda:2, but only 2 CUDA GPUs are visible; "
        r"use at most 2 processes per node \(--nproc 2\)",
    ):
        resolve_device("auto", local_rank=2)
    with pytest.raises(
        UsageError, match="--device is cuda:5, but only 2 CUDA GPUs are visible; use a device index below 2"
    ):
        resolve_device("cuda:5")
