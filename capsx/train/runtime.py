"""Process-wide settings that make CPU training fast; applied once by the CLI."""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_large_tensors_on_heap() -> bool:
    """Stop glibc from mmap-ing every allocation over 32 MB.

    A CapsNet step allocates and frees tensors of ~100 MB (the routing
    predictions); served by mmap, each one is page-faulted and zeroed by the
    kernel again every step, which shows as system time comparable to the step's
    own. Served from the heap they are reused. Linux/glibc only.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another libc
        return False
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)  # and keep up to 1 GB of freed heap for reuse
    return ok


def flush_denormals() -> bool:
    """Compute subnormal floats (below 1.2e-38) as zero on the CPU (x86 FTZ/DAZ, ARM FZ).

    Adam's running means of a weight whose gradient stays 0 (a dead unit, a
    pixel that is always black) shrink by 0.9 a step and become subnormal
    after ~800 steps; x86 cores handle subnormals in microcode, many times
    slower (the baseline CNN on Fashion-MNIST holds a majority of its Adam state
    subnormal after a few epochs, and its optimiser step slows several times).
    The setting is per thread and threads inherit it, so it must come before
    torch's worker threads start. Values this small change no result we report.
    """
    import torch

    return bool(torch.set_flush_denormal(True))
