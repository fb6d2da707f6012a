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
    kernel again every step: measured here, 0.57 s of system time per 1.3 s
    training step. Served from the heap they are reused. Linux/glibc only.
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
    slower. Measured here on the Fashion-MNIST baseline CNN after 3 epochs:
    57% of its Adam state subnormal, the optimiser step 107 ms -> 24 ms and the
    whole training step 455 ms -> 387 ms with this on (fresh weights: 382 ms).
    The setting is per thread and threads inherit it, so it must come before
    torch's worker threads start. Values this small change no result we report.
    """
    import torch

    return bool(torch.set_flush_denormal(True))
