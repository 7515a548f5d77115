"""Model FLOPs utilisation: achieved training FLOP/s against the device's peak.

GPUs are looked up in a table of vendor peaks; a CPU has no such table, so its matrix-multiply
peak is measured once (fp32 and bf16) and cached, which also tells whether bf16 is fast here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import time
from pathlib import Path

import torch

from llmctl.storage import write_json_atomic

# Dense (no sparsity) peaks from NVIDIA's spec sheets: (16-bit tensor core with fp32 accumulate,
# fp32 as TF32 tensor core where the GPU has it). Longer names first so "H100 PCIe" wins over "H100".
GPU_PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "H100 PCIe": (756e12, 378e12),
    "H100 NVL": (835e12, 418e12),
    "H100": (989e12, 494e12),
    "H200": (989e12, 494e12),
    "GH200": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "A10G": (70e12, 35e12),
    "A10": (125e12, 62.5e12),
    "L40S": (362e12, 183e12),
    "L4": (121e12, 60e12),
    "RTX 4090": (165e12, 82.6e12),
    "RTX 4080": (97.5e12, 48.7e12),
    "RTX 4070": (58.3e12, 29.1e12),
    "RTX 4060 Ti": (44e12, 22e12),
    "RTX 4060": (30.2e12, 15.1e12),
    "RTX 3090": (71e12, 35.6e12),
    "RTX 3080": (59.5e12, 29.8e12),
    "V100": (125e12, 15.7e12),
    "T4": (65e12, 8.1e12),
}

_PROBE_SIZE = 1024
_PROBE_SECONDS = 0.4
_PROBE_BURSTS = 8


def gpu_peak_flops(device_name: str, sixteen_bit: bool) -> float | None:
    for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            half, single = GPU_PEAK_FLOPS[key]
            return half if sixteen_bit else single
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "llmctl"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _matmul_flops(dtype: torch.dtype) -> float:
    """The best of several short bursts: other processes can only slow a burst down, so the
    fastest one is the closest to what the CPU can do."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(_PROBE_SIZE, _PROBE_SIZE, generator=generator).to(dtype)
    b = torch.randn(_PROBE_SIZE, _PROBE_SIZE, generator=generator).to(dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(_PROBE_BURSTS):
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < _PROBE_SECONDS / _PROBE_BURSTS:
            a @ b
            calls += 1
        best = max(best, 2 * _PROBE_SIZE**3 * calls / (time.perf_counter() - start))
    return best


def cpu_matmul_peaks() -> dict[str, float]:
    """Measured fp32 and bf16 matmul FLOP/s of this CPU at the current thread count.

    Cached per CPU model, torch version and thread count in ~/.cache/llmctl (XDG_CACHE_HOME),
    because the measurement costs about a second and the answer does not change. A measurement
    taken while other processes kept the cores busy reads low, so it is used (for the rest of
    this process) but taken again next time, until one is taken on a quiet machine.
    """
    return _measured_peaks(f"{_cpu_name()} | torch {torch.__version__} | threads {torch.get_num_threads()}")


@functools.cache
def _measured_peaks(key: str) -> dict[str, float]:
    path = cache_dir() / "cpu-matmul.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    entry = cached.get(key)
    if entry is None or not entry.get("quiet"):
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0  # not on Windows
        busy = load / (os.cpu_count() or 1)
        entry = {
            "fp32": _matmul_flops(torch.float32),
            "bf16": _matmul_flops(torch.bfloat16),
            "quiet": busy < 0.5,
        }
        cached[key] = entry
        with contextlib.suppress(OSError):  # a read-only home only costs measuring again next time
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, cached)
    return entry


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (x86 'flags', ARM 'Features'); None elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_has_fast_bf16() -> bool:
    """bf16 pays off on CPUs with bf16 matrix instructions (AVX512-BF16, AMX, ARM BF16): about 2x
    fp32 there, while elsewhere it is emulated and slower. The flags decide where the OS lists them,
    because a timing taken on a busy machine could decide differently from one run to the next;
    elsewhere the measured peaks decide."""
    flags = _cpu_flags()
    if flags is not None:
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    peaks = cpu_matmul_peaks()
    return peaks["bf16"] >= 1.3 * peaks["fp32"]


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The peak FLOP/s one device offers at `precision` ('fp32', 'bf16', 'fp16'); None if unknown."""
    sixteen_bit = precision in ("bf16", "fp16")
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), sixteen_bit)
    if device.type == "cpu":
        return cpu_matmul_peaks()["bf16" if sixteen_bit else "fp32"]
    return None
