"""Which torch device a command computes on: one rule for training, generation and evaluation."""

from __future__ import annotations

import os

import torch

from llmctl.errors import UsageError

# the setting the user gives a device with, and how they would ask for the CPU instead
_CPU_INSTEAD = {
    "--device": "--device cpu",
    "train.device": "--set train.device=cpu",
    "LLMCTL_DEVICE": "LLMCTL_DEVICE=cpu",
}

# what 'auto' means when set (the test suite pins itself, and the processes it starts, to the CPU
# with LLMCTL_DEVICE=cpu); an explicit device still wins, and torchrun's children inherit it
AUTO_DEVICE_ENV = "LLMCTL_DEVICE"


def resolve_device(requested: str = "auto", local_rank: int = 0, setting: str = "--device") -> torch.device:
    """'auto' is this process's CUDA GPU (cuda:LOCAL_RANK) when there is one, else the CPU; 'cuda'
    without an index is this process's GPU too. A GPU that is not there (none visible, or an index
    past the visible count: more processes than GPUs) is a usage error naming the count.
    LLMCTL_DEVICE, when set, is what 'auto' resolves to."""
    if requested == "auto":
        requested = os.environ.get(AUTO_DEVICE_ENV) or "auto"
        setting = AUTO_DEVICE_ENV if requested != "auto" else setting
    if requested == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        requested = "cuda"
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise UsageError(f"invalid {setting} '{requested}': use auto, cpu, cuda or cuda:N") from exc
    if device.type != "cuda":
        return device
    cpu = _CPU_INSTEAD.get(setting, "the CPU")
    if not torch.cuda.is_available():
        raise UsageError(f"{setting} is '{requested}' but no CUDA GPU is visible; use {cpu}")
    if device.index is None:
        device = torch.device("cuda", local_rank)
    visible = torch.cuda.device_count()
    if device.index >= visible:
        gpus = f"only {visible} CUDA GPU{'s are' if visible != 1 else ' is'} visible"
        if requested == "cuda":  # the GPU of this process's rank
            raise UsageError(
                f"process {local_rank} of this node asks for {device}, but {gpus}; "
                f"use at most {visible} processes per node (--nproc {visible})"
            )
        raise UsageError(f"{setting} is {device}, but {gpus}; use a device index below {visible}")
    return device
