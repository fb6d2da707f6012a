"""Accuracy as a curve over one transform of the test set (`capsx eval --sweep`):
how far a model's accuracy holds as the digits turn, grow, lean or move.

A sweep spec is `NAME=START:STOP:STEP` (STOP included when the steps land on
it). Each value transforms the whole test split in one batched warp about the
image centre (bilinear, zero outside), the same for every model compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from capsx.data.transforms import affine_matrices, warp
from capsx.errors import CapsxError

MAX_POINTS = 1000


@dataclass(frozen=True)
class Transform:
    name: str
    unit: str  # how the values read on the plot's axis
    identity: float
    low: float = -math.inf  # values below are refused (a scale of 0 has no inverse)


TRANSFORMS = {
    "rotate": Transform("rotate", "degrees, counter-clockwise", 0.0),
    "scale": Transform("scale", "factor", 1.0, low=1e-3),
    "shear": Transform("shear", "x-shear factor", 0.0),
    "shift": Transform("shift", "pixels, to the right", 0.0),
}


@dataclass(frozen=True)
class SweepSpec:
    transform: Transform
    values: list[float]

    @property
    def name(self) -> str:
        return self.transform.name


def parse_sweep(text: str) -> SweepSpec:
    """'rotate=-45:45:5' -> rotate at -45, -40, ..., 45. Bad specs raise one `CapsxError` line."""
    usage = "expected NAME=START:STOP:STEP with NAME one of " + ", ".join(TRANSFORMS) + ", e.g. rotate=-45:45:5"
    name, sep, numbers = text.partition("=")
    name = name.strip()
    if not sep:
        raise CapsxError(f"--sweep {text!r}: {usage}")
    if name not in TRANSFORMS:
        raise CapsxError(f"--sweep {text!r}: unknown transform {name!r}; {usage}")
    parts = numbers.split(":")
    try:
        start, stop, step = (float(p) for p in parts) if len(parts) == 3 else (math.nan,) * 3
    except ValueError:
        start = stop = step = math.nan
    if not all(math.isfinite(v) for v in (start, stop, step)):
        raise CapsxError(f"--sweep {text!r}: {usage}")
    if step <= 0:
        raise CapsxError(f"--sweep {text!r}: STEP must be > 0, got {step:g}")
    if stop < start:
        raise CapsxError(f"--sweep {text!r}: STOP {stop:g} is below START {start:g}")
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > MAX_POINTS:
        raise CapsxError(f"--sweep {text!r}: {count} points; expected at most {MAX_POINTS} (use a larger STEP)")
    t = TRANSFORMS[name]
    values = [round(start + i * step, 10) for i in range(count)]
    if values[0] < t.low:
        raise CapsxError(f"--sweep {text!r}: {name} values must be > 0, got {values[0]:g}")
    return SweepSpec(t, values)


def apply_transform(images: Tensor, name: str, value: float) -> Tensor:
    """Every image (B, C, H, W) under the same transform `name` at `value`, about the centre."""
    n = len(images)
    zero, one = torch.zeros(n), torch.ones(n)
    full = torch.full((n,), float(value))
    params = {
        "rotate": (full, one, zero, zero, zero),
        "scale": (zero, full, zero, zero, zero),
        "shear": (zero, one, full, zero, zero),
        "shift": (zero, one, zero, full, zero),
    }[name]
    return warp(images, affine_matrices(*params))
