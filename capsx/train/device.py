"""Resolve the recipe's `device` once: auto = CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from capsx.errors import CapsxError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(name, False):
        found = ", ".join(k for k, ok in available.items() if ok)
        raise CapsxError(f"device {name!r} is not available here; available: {found} (or use device: auto)")
    return torch.device(name)


BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 CPU flags of bf16 arithmetic units (/proc/cpuinfo)


def cpu_has_bf16_units(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU computes in bf16 natively (x86 avx512_bf16 or AMX, Arm's bf16 extension);
    None where it cannot be told (no Linux /proc/cpuinfo). Without them torch's bf16 kernels convert
    to fp32 and back around every operation, which is usually slower than fp32 itself."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, Arm
            flags.update(value.split())
    if not flags:
        return None
    return any(f in flags for f in (*BF16_FLAGS, "bf16"))


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"
    return device.type


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels: a clock read before them would time their launch only."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[None]:
    """Mixed precision for bf16/fp16; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise CapsxError(f"train.precision: fp16 needs a CUDA device, got {device.type}; use bf16 or fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def eval_precision(precision: str, device: torch.device) -> str:
    """The precision to evaluate a run trained at `precision` with, on `device`: its own, except fp16
    off CUDA (a GPU's fp16 run evaluated on a laptop), which is evaluated in fp32."""
    return "fp32" if precision == "fp16" and device.type != "cuda" else precision


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module, inference: bool = True) -> Iterator[None]:
    """model.eval() and (unless `inference` is False: gradients still wanted, a saliency map's) inference
    mode for the duration; the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(inference):
            yield
    finally:
        model.train(was_training)


CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs to give the same result every run (CUDA's documentation)


@contextlib.contextmanager
def kernel_choices(device: torch.device, *, deterministic: bool, tf32: bool) -> Iterator[dict[str, str]]:
    """How torch picks kernels for one training on `device`, set for its length and put back after;
    yields the choices as the run's tags (`kernels.*`).

    `deterministic`: every kernel that has a deterministic variant uses it (torch's deterministic
    algorithms, cuDNN without benchmarking, cuBLAS's fixed workspace), so a CUDA run repeats exactly;
    an op without one warns once and stays as it is. Otherwise, on CUDA, cuDNN times its convolution
    algorithms for each input shape and keeps the fastest (these models see one or two shapes).
    `tf32`: on CUDA, fp32 matrix products and convolutions in TF32 (10-bit mantissa, Ampere and later).
    The CPU's kernels repeat exactly either way; its choices are only recorded.
    """
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    cuda = device.type == "cuda"
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if cuda:
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    tags = {"kernels.deterministic": str(deterministic).lower(),
            "kernels.cudnn_benchmark": str(cuda and not deterministic).lower(),
            "kernels.tf32": str(cuda and tf32).lower()}
    try:
        yield tags
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
         torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = saved[2:]
