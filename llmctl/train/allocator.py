"""The C library's allocator, tuned for training on a CPU."""

from __future__ import annotations

import contextlib
import ctypes

GLIBC_M_MMAP_THRESHOLD = -3  # mallopt's parameter number for the mmap threshold (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_frees_to_the_os() -> None:
    """Serve allocations of 1 MB and more from mmap, so freeing them returns the memory at once.

    glibc keeps freed blocks below its dynamic mmap threshold (which grows up to 32 MB) in the heap.
    Training on a CPU frees and reallocates activation and dequantized-weight buffers of many sizes
    in every layer, the heap fragments, and the resident size grows far past the live tensors (for
    QLoRA about twice; docs/benchmarks.md has the figures). A no-op where the C library has no mallopt.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(GLIBC_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
