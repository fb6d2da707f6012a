"""Which algorithm computes a strided convolution on this machine: measured once, then remembered.

Why: the frequency-domain convolution (`fourier_conv`) does 3.3x fewer multiply-adds than the direct
one for PrimaryCaps, but whether it is faster depends on the CPU (its products follow the machine's
matrix-product rate; oneDNN's direct kernel has its own speed on each instruction set), on the batch,
and on training or inference. A batch threshold timed on one CPU was wrong on another (an AVX2-only
machine halved the frequency path's speed and kept the direct one's). So the first call of each problem
(layer shape, batch class, dtype, training or inference) times the candidates on random data and keeps
the fastest: the frequency domain, the direct conv, and, where the conv's reduction is short (channels x
kernel taps no more than its output channels, as for Conv1's single input channel: the unfolded input
is then no larger than the output), the unfolded input times the kernel matrix (`im2col`; oneDNN's AVX2
weight gradient for Conv1 ran at 13 GFLOP/s, a third of a batched matrix product's speed). The verdict
is stored in `$CAPSX_CACHE/conv-algorithm.json` under this machine's key (CPU model, torch version, the
kernels' CPU capability, oneDNN and MKL instruction caps, threads, a hash of the layer code), so later
processes on the same machine agree with it and do not measure again. The first verdict written wins:
concurrent processes (DDP workers, a resumed run) adopt it, so they compute alike.

`CAPSX_CONV_ALGORITHM=fourier`, `direct` or `im2col` forces one for every such layer (`auto`, the
default, measures); deleting the cache file measures again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from capsx.atomic import replacing
from capsx.data.cache import cache_dir
from capsx.errors import CapsxError

ALGORITHMS = ("fourier", "direct", "im2col")
LABELS = {"fourier": "frequency domain", "direct": "direct", "im2col": "im2col"}
ENV = "CAPSX_CONV_ALGORITHM"
MAX_MEASURED_BATCH = 256  # per-image cost is flat beyond this; larger batches share its verdict
TRIALS = 3  # timed calls per algorithm, interleaved, after one untimed call each: the best is kept

# conv(algorithm, x, weight, bias) -> y: the algorithms of one layer, as its forward runs them
Compute = Callable[[str, Tensor, Tensor, Tensor | None], Tensor]


@dataclass(frozen=True)
class Problem:
    """What the verdict depends on, besides the machine."""

    batch: int  # the batch class: the next power of two, at most MAX_MEASURED_BATCH
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: int
    stride: int
    dtype: str  # "float32", or "bfloat16" under bf16 autocast
    training: bool
    padding: int = 0  # zeros on each side

    @property
    def key(self) -> str:
        pad = f" p{self.padding}" if self.padding else ""
        return (f"{self.in_channels}x{self.height}x{self.width}->{self.out_channels} k{self.kernel} s{self.stride}"
                f"{pad} {self.dtype} {'train' if self.training else 'infer'} batch {self.batch}")


@dataclass(frozen=True)
class Choice:
    algorithm: str
    source: str  # "measured" (this process), "cached" (an earlier one), "forced" ($CAPSX_CONV_ALGORITHM)
    ms: dict[str, float] | None = None  # each candidate's best time

    def describe(self) -> str:
        if self.source == "forced" or not self.ms:
            return f"{self.algorithm} (forced by {ENV})"
        # in ALGORITHMS' order, however the cache file ordered them
        times = ", ".join(f"{self.ms[a]:.1f} ms {LABELS[a]}" for a in ALGORITHMS if a in self.ms)
        return f"{self.algorithm}: {times} ({self.source})"


_verdicts: dict[Problem, Choice] = {}  # this process's, in the order they were made


def batch_class(batch: int) -> int:
    return min(1 << max(0, batch - 1).bit_length(), MAX_MEASURED_BATCH)


def forced() -> str | None:
    """$CAPSX_CONV_ALGORITHM's algorithm, None for auto."""
    value = os.environ.get(ENV, "auto").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ALGORITHMS:
        raise CapsxError(f"{ENV}={value!r}: expected auto, fourier, direct or im2col")
    return value


def choose(problem: Problem, compute: Compute) -> str:
    """The algorithm for `problem`: forced, this process's verdict, the cache's, or measured now."""
    if (name := forced()) is not None:
        _verdicts[problem] = Choice(name, "forced")
        return name
    if (choice := _verdicts.get(problem)) is not None and choice.source != "forced":
        return choice.algorithm
    if torch.compiler.is_compiling():  # no timing inside a trace: the cache's verdict, else the transform
        cached = _read_cache().get(problem.key)
        return cached["algorithm"] if cached else "fourier"
    choice = _stored(problem) or _store(problem, measure(problem, compute))
    _verdicts[problem] = choice
    return choice.algorithm


def choices_made() -> dict[str, Choice]:
    """This process's verdicts by problem, for `capsx bench` to say which path it took and why."""
    return {p.key: c for p, c in _verdicts.items()}


def forget() -> None:
    """Drop this process's verdicts (the cache file keeps its own)."""
    _verdicts.clear()


def candidates(problem: Problem) -> tuple[str, ...]:
    """The algorithms measured for `problem`: im2col only where its unfolded input (channels x taps per
    output position) is no larger than the output, so its memory stays the layer's own."""
    short = problem.in_channels * problem.kernel ** 2 <= problem.out_channels
    return ALGORITHMS if short else ("fourier", "direct")


def measure(problem: Problem, compute: Compute) -> Choice:
    """The candidates timed on random data from a private generator (the global ones are not drawn from),
    outside any dispatch mode (a FLOP counter or a profiler's mode sees the layer's real call only),
    forward and backward when training, interleaved so that the machine's drift hits both alike."""
    gen = torch.Generator().manual_seed(0)
    p = problem
    x = torch.rand(p.batch, p.in_channels, p.height, p.width, generator=gen)
    weight = torch.rand(p.out_channels, p.in_channels, p.kernel, p.kernel, generator=gen) / (p.kernel * p.in_channels)
    bias = torch.rand(p.out_channels, generator=gen)
    if p.training:
        x.requires_grad_(True)
        weight.requires_grad_(True)

    def once(algorithm: str) -> float:
        t = time.perf_counter()
        with torch.enable_grad() if p.training else torch.no_grad():
            y = compute(algorithm, x, weight, bias)
            if p.training:
                y.float().sum().backward()
        return time.perf_counter() - t

    names = candidates(problem)
    best = dict.fromkeys(names, float("inf"))
    with _outside_dispatch_modes():
        for algorithm in names:
            once(algorithm)  # untimed: first calls allocate and pick kernels
        for _ in range(TRIALS):
            for algorithm in names:
                best[algorithm] = min(best[algorithm], once(algorithm))
    return Choice(verdict(best), "measured", {a: 1e3 * t for a, t in best.items()})


def verdict(seconds: dict[str, float]) -> str:
    """The fastest algorithm; direct on a tie (it needs no spectra or unfolded input in memory)."""
    return min(seconds, key=lambda a: (seconds[a], a != "direct"))


@contextlib.contextmanager
def _outside_dispatch_modes() -> Iterator[None]:
    from torch.utils._python_dispatch import _disable_current_modes  # torch's own way out of a mode stack

    with _disable_current_modes():
        yield


def machine_key() -> str:
    """What makes timings comparable: the same CPU, torch, kernels' capability and instruction caps, threads,
    and the same layer code (a capsx that changed it measures again)."""
    env = " ".join(f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS") if k in os.environ)
    parts = [cpu_model(), f"torch {torch.__version__}", torch.backends.cpu.get_cpu_capability(),
             f"{torch.get_num_threads()} threads", env, f"conv code {_code_version()}"]
    return " | ".join(p for p in parts if p)


@functools.cache
def _code_version() -> str:
    from capsx.models import fourier_conv, measured_conv

    code = b"".join(Path(m.__file__).read_bytes() for m in (fourier_conv, measured_conv))  # type: ignore[arg-type]
    return hashlib.sha256(code).hexdigest()[:12]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_path() -> Path:
    return cache_dir() / "conv-algorithm.json"


def _read_all() -> dict:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_cache() -> dict:
    entries = _read_all().get(machine_key(), {})
    return entries if isinstance(entries, dict) else {}


def _as_choice(entry: object) -> Choice | None:
    ms = entry.get("ms") if isinstance(entry, dict) else None
    if (not isinstance(entry, dict) or entry.get("algorithm") not in ALGORITHMS or not isinstance(ms, dict)
            or not all(a in ALGORITHMS and isinstance(t, int | float) for a, t in ms.items())):
        return None  # a foreign or damaged entry: measured again and replaced
    return Choice(entry["algorithm"], "cached", {a: float(t) for a, t in ms.items()})


def _stored(problem: Problem) -> Choice | None:
    return _as_choice(_read_cache().get(problem.key))


def _store(problem: Problem, choice: Choice) -> Choice:
    """Writes the verdict unless another process wrote one first, which is then adopted; a cache that
    cannot be written (read-only home) leaves the verdict this process's own."""
    try:
        with _locked():
            data = _read_all()
            entries = data.setdefault(machine_key(), {})
            if (first := _as_choice(entries.get(problem.key))) is not None:
                return first
            entries[problem.key] = {k: v for k, v in asdict(choice).items() if k != "source"}
            with replacing(cache_path(), "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
    except OSError:
        pass
    return choice


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    path = cache_path().with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            import fcntl
        except ImportError:  # Windows: no lock; the atomic rename still keeps the file whole
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


__all__ = ["ALGORITHMS", "ENV", "LABELS", "Choice", "Problem", "batch_class", "candidates", "choices_made", "choose",
           "forget", "measure", "verdict"]
