"""Which device, numeric precision and compilation a run uses, decided once before it starts."""

from __future__ import annotations

import contextlib
import os
import resource
from dataclasses import dataclass

import torch

from llmctl.errors import UsageError
from llmctl.model.device import resolve_device as resolve_model_device
from llmctl.train.mfu import cpu_has_fast_bf16

_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str  # 'fp32', 'bf16' or 'fp16'
    device_type: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _AUTOCAST_DTYPES[self.name]

    @property
    def needs_grad_scaler(self) -> bool:
        # fp16's narrow exponent underflows small gradients; bf16 shares fp32's range
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Weights stay fp32; matmuls run in the 16-bit type inside this context."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """The device `train.device` names, for this process of a run (see llmctl.model.device)."""
    return resolve_model_device(requested, local_rank, setting="train.device")


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """auto: bf16 on CUDA GPUs that support it, else fp16 with a grad scaler; on CPU bf16 only
    where the CPU multiplies bf16 matrices fast (measured once), else fp32."""
    if requested == "auto":
        if device.type == "cuda":
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu":
            requested = "bf16" if cpu_has_fast_bf16() else "fp32"
        else:
            requested = "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise UsageError("precision fp16 needs a CUDA GPU; use --precision bf16 or fp32 on this device")
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"{torch.cuda.get_device_name(device)} does not support bf16; use --precision fp16")
    return Precision(requested, device.type)


def resolve_compile(requested: str, device: torch.device) -> bool:
    """auto compiles on CUDA, where it pays back within minutes; on CPU it costs more than it saves
    for short runs, and needs a C++ compiler."""
    if requested == "auto":
        return device.type == "cuda"
    return requested == "on"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    return str(device)


def device_memory_bytes(device: torch.device) -> int | None:
    """Memory one training process may use: the GPU's, or the machine's RAM for a CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        with contextlib.suppress(ValueError, OSError, AttributeError):
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """The most memory this process has held: the GPU's allocated peak since the last call (reset
    here), or on a CPU the peak resident size."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
