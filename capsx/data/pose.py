"""Pose quantities a data set knows of its images (`shapes`: position, rotation, scale; smallNORB: azimuth,
elevation, lighting), as regression targets: what `capsx eval --pose` reads out of capsules.

An angle is a target only as the cosine and sine of k times it, k the object's rotational symmetry: a
rectangle turned by 180 degrees is the same image, so cos/sin of the angle itself is no function of the
image, while cos/sin of twice the angle is."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PoseQuantity:
    name: str
    values: Tensor  # (N, m) float64: one column, or the cosine and sine of an angle
    valid: Tensor  # (N,) bool: where the quantity is a function of the image (a ring has no angle)


def linear(name: str, values: Tensor) -> PoseQuantity:
    v = values.to(torch.float64).reshape(len(values), 1)
    return PoseQuantity(name, v, torch.ones(len(values), dtype=torch.bool))


def angle(name: str, radians: Tensor, symmetry: Tensor) -> PoseQuantity:
    """cos and sin of k * angle per image, k its symmetry (0: no angle, the image is not valid for it)."""
    k = symmetry.to(torch.float64)
    a = radians.to(torch.float64) * k
    return PoseQuantity(name, torch.stack([torch.cos(a), torch.sin(a)], dim=1), symmetry > 0)


def degrees(values: Tensor) -> Tensor:
    return values.to(torch.float64) * (math.pi / 180)
