"""What is measured, said or refused before training starts: a batch that will not fit the device
(refused, with the batch that would), an epoch longer than two hours, bf16 on a CPU without bf16 units
(one warning line each, never a refusal)."""

from __future__ import annotations

import torch
from torch import nn

from capsx.errors import CapsxError
from capsx.train import memory
from capsx.train.device import cpu_has_bf16_units


def check_memory(model: nn.Module, criterion: object, input_shape: tuple[int, int, int], optimizer: str,
                 device: torch.device, batch: int, objects: int = 1, precision: str = "fp32",
                 beside: int = 0) -> memory.Probe:
    """Stop before training if a step at `batch` will not fit the device, saying what would.
    Returns what the probe steps measured (their time too)."""
    probe = memory.probe(model, criterion, input_shape, optimizer, device, objects, precision, beside)
    est = probe.memory
    if est is None or est.peak(batch) <= est.available:
        return probe
    fits = est.largest_batch()
    advice = f"the largest batch that fits is about {fits}" if fits else "not even a batch of 1 fits"
    raise CapsxError(f"data.batch_size {batch}: a training step needs about {memory.gib(est.peak(batch))} "
                     f"({memory.gib(100 * est.per_image)} per 100 images) but {device.type} has "
                     f"{memory.gib(est.available)} free; {advice}")


LONG_EPOCH_SECONDS = 2 * 3600  # an epoch longer than this gets a word before training starts
BF16_WITHOUT_UNITS = ("train.precision=bf16 on a CPU without bf16 units (no avx512_bf16 or amx_bf16): torch "
                      "converts to fp32 and back around each operation, so this is likely much slower than fp32 "
                      "here (on a 2-core AVX2 CPU the paper's CapsNet trained at 1.8 img/s in bf16, 70.6 in fp32)")


BF16_EMULATED = ("train.precision=bf16 on {gpu}, which has no bf16 arithmetic (before Ampere: V100, T4): CUDA "
                 "emulates it, usually slower than fp32; train.precision=fp16 (with its gradient scaler) is "
                 "this GPU's fast mixed precision")


def bf16_advice(device: torch.device, precision: str) -> str | None:
    """A warning line when bf16 will be slow on this device (a CPU or GPU without bf16 units); else None."""
    if precision != "bf16":
        return None
    if device.type == "cpu" and cpu_has_bf16_units() is False:
        return BF16_WITHOUT_UNITS
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return BF16_EMULATED.format(gpu=torch.cuda.get_device_name(device))
    return None


def long_epoch_advice(seconds: float, steps: int, batch: int, device: torch.device, precision: str) -> str:
    """One line: how long an epoch will take here, and what would shorten it. Never a refusal: the
    paper's protocol is a valid thing to start."""
    ways = ["data.subset=N (train on N images)", "train.max_steps_per_epoch=N"]
    if precision == "fp32" and (device.type != "cpu" or cpu_has_bf16_units()):
        ways.append("train.precision=bf16")
    if device.type != "cuda":
        ways.append("a GPU (device: cuda)")
    return (f"one epoch is {steps:,} steps of batch {batch} and will take about {_duration(seconds)} on this "
            f"{device.type} (timed on the pre-flight's probe step); to shorten it: {', '.join(ways)}")


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:,.0f} h" if hours >= 10 else f"{hours:.1f} h"
