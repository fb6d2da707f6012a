"""Pre-flight: will a training step at this batch size fit the device, and how long will it take?

Measured, not modelled: two probe steps (forward and backward at batch 8 and
40, weights untouched) are run and their peak memory read: on CUDA from the
allocator's peak statistics, on a Linux CPU from the process's peak resident
size (reset between probes through /proc/self/clear_refs). The difference
gives the cost per image, the first probe the fixed cost; the optimizer's
state (not yet allocated) is added from the parameter count. The same probe
steps are timed, on every device, for the estimate of an epoch's length.
"""

from __future__ import annotations

import ctypes
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from capsx.train.device import autocast, synchronize

PROBE_BATCHES = (8, 40)
MARGIN = 1.5  # allocator slack and fragmentation: measured peaks ranged 0.5x-1.0x of this scaled estimate
OPTIMIZER_COPIES = {"sgd": 1, "adam": 2, "adadelta": 2, "adagrad": 1, "rmsprop": 2}  # state tensors per parameter


@dataclass
class MemoryEstimate:
    per_image: int  # bytes a step needs per image of the batch
    fixed: int  # bytes a step needs beyond that (at batch 0), optimizer state included
    available: int  # bytes free on the device now

    def peak(self, batch: int) -> int:
        return int(MARGIN * (self.fixed + self.per_image * batch))

    def largest_batch(self) -> int:
        return max(0, math.floor((self.available / MARGIN - self.fixed) / self.per_image))


@dataclass
class Probe:
    """What the two probe steps measured."""

    memory: MemoryEstimate | None  # None where this device's memory cannot be read (MPS, non-Linux CPU)
    seconds: tuple[float, float]  # wall time of each probe step (forward and backward), as PROBE_BATCHES

    def step_seconds(self, batch: int) -> float:
        """A training step at `batch`, from the larger probe's time per image. An estimate: the first
        probe pays one-time costs (first allocations, kernel selection), the probes take no optimizer
        step, and a bigger batch is often cheaper per image."""
        return self.seconds[1] / PROBE_BATCHES[1] * batch


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(field)


def _cpu_probe() -> tuple[Callable[[], None], Callable[[], int]] | None:
    """(reset, read) of the peak resident size in bytes, or None where Linux's /proc is not there."""
    clear = Path("/proc/self/clear_refs")
    try:
        _status_kib("VmHWM")
        clear.write_text("5")
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None

    def reset() -> None:
        trim(0)  # give freed heap back first: reused memory would not show as growth
        clear.write_text("5")

    def read() -> int:
        return _status_kib("VmHWM") * 1024

    return reset, read


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory while `fn` runs: the allocator's peak on CUDA (what the tensors need, not the cache's),
    the growth of the resident size on a Linux CPU; None where neither can be read (then `fn` still runs)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    probe = _cpu_probe() if device.type == "cpu" else None
    if probe is None:
        fn()
        return None
    reset, read = probe
    reset()
    start = _status_kib("VmRSS") * 1024
    fn()
    return read() - start


def _step(model: nn.Module, criterion: object, input_shape: tuple[int, int, int], batch: int,
          device: torch.device, objects: int, precision: str) -> None:
    x = torch.rand(batch, *input_shape, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    targets = x
    if objects > 1:  # k different classes per image, each with its own image to rebuild
        y = torch.arange(objects, device=device).expand(batch, objects)
        targets = x.unsqueeze(1).expand(batch, objects, *input_shape)
    with autocast(device, precision):  # as training runs it: bf16/fp16 activations take half the memory
        loss = criterion(model(x, y), targets, y).total  # type: ignore[operator]
    loss.backward()
    for p in model.parameters():
        p.grad = None


def estimate(model: nn.Module, criterion: object, input_shape: tuple[int, int, int], optimizer: str,
             device: torch.device, objects: int = 1, precision: str = "fp32") -> MemoryEstimate | None:
    """Measure the memory; None where this device's memory cannot be read (MPS, non-Linux CPU)."""
    return probe(model, criterion, input_shape, optimizer, device, objects, precision).memory


def _generators(device: torch.device) -> list[int]:
    """The CUDA generators a probe on `device` draws from (its dropout, its random inputs)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def probe(model: nn.Module, criterion: object, input_shape: tuple[int, int, int], optimizer: str,
          device: torch.device, objects: int = 1, precision: str = "fp32", beside: int = 0) -> Probe:
    """Take the two probe steps (weights and buffers untouched, every RNG it draws from as it was: the CPU's and,
    on CUDA, the device's, which a resume has already restored), reading memory and time, in the
    training's precision. `beside`: bytes the training will hold that the probe does not allocate
    (data-parallel training's gradient buckets)."""
    readers = _memory_readers(device)
    if readers is not None:
        readers[0]()
    was_training = model.training
    buffers = [(b, b.detach().clone()) for b in model.buffers()]  # batch norm's running statistics
    model.train()
    peaks, seconds = [], []
    try:
        with torch.random.fork_rng(devices=_generators(device)):  # a probe must not shift training's RNG
            baseline = readers[2]() if readers is not None else 0
            for b in PROBE_BATCHES:
                if readers is not None:
                    readers[0]()
                synchronize(device)
                started = time.perf_counter()
                _step(model, criterion, input_shape, b, device, objects, precision)
                synchronize(device)
                seconds.append(time.perf_counter() - started)
                if readers is not None:
                    peaks.append(readers[1]())
    finally:
        model.train(was_training)
        with torch.no_grad():  # the random batches must not move the running averages a model normalises with
            for buffer, saved in buffers:
                buffer.copy_(saved)
    timed = (seconds[0], seconds[1])
    if readers is None:
        return Probe(None, timed)
    _, _, now, free = readers
    (b1, b2), (p1, p2) = PROBE_BATCHES, peaks
    per_image = max(1, (p2 - p1) // (b2 - b1))
    state = sum(p.numel() * p.element_size() for p in model.parameters()) * OPTIMIZER_COPIES.get(optimizer, 2)
    fixed = max(0, p1 - baseline - per_image * b1) + state + beside
    return Probe(MemoryEstimate(per_image, fixed, free() + max(0, now() - baseline)), timed)


Readers = tuple[Callable[[], None], Callable[[], int], Callable[[], int], Callable[[], int]]


def _memory_readers(device: torch.device) -> Readers | None:
    """(reset peak, read peak, in use now, free) in bytes for `device`; None where it cannot be read."""
    if device.type == "cuda":
        def reset() -> None:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)

        def read() -> int:
            torch.cuda.synchronize(device)
            return int(torch.cuda.max_memory_allocated(device))

        def now() -> int:
            return int(torch.cuda.memory_allocated(device))

        def free() -> int:  # the driver's free memory and what PyTorch's cache holds unused (it reuses that)
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return int(torch.cuda.mem_get_info(device)[0]) + max(0, int(cached))

        return reset, read, now, free
    if device.type == "cpu":
        cpu = _cpu_probe()
        if cpu is None:
            return None

        def rss() -> int:
            return _status_kib("VmRSS") * 1024

        def available() -> int:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
            raise OSError("MemAvailable")

        return cpu[0], cpu[1], rss, available
    return None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"
