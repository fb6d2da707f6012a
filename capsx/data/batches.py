"""Batches from an in-memory `ImageSet`, shuffled and augmented on the device.

Both the epoch's order and each batch's shifts come from generators seeded by
(seed, epoch, step), so an epoch can be restarted at any step and produce the
same batches: that is what makes resume exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from capsx.data.imageset import Examples, Order


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each image (B, C, H, W) by its own random (dx, dy) in [-max_shift, max_shift], zero padded."""
    B, C, H, W = images.shape
    m = max_shift
    padded = F.pad(images, (m, m, m, m))  # (B, C, H+2m, W+2m)
    offsets = torch.randint(0, 2 * m + 1, (2, B), generator=generator, device=generator.device).to(images.device)
    rows = (offsets[0].view(B, 1) + torch.arange(H, device=images.device)).view(B, 1, H, 1)
    cols = (offsets[1].view(B, 1) + torch.arange(W, device=images.device)).view(B, 1, 1, W)
    batch = torch.arange(B, device=images.device).view(B, 1, 1, 1)
    chan = torch.arange(C, device=images.device).view(1, C, 1, 1)
    return padded[batch, chan, rows, cols]


def _seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of ints (stable across runs and machines)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


class Batch(NamedTuple):
    images: Tensor  # (B, C, H, W) float in [0, 1]: the model's input
    labels: Tensor  # (B,), or (B, k) for k labelled objects per image
    targets: Tensor  # what a reconstruction should match: `images` itself, or (B, k, C, H, W) each object alone


class Batches:
    """Iterates `Batch`es of an `ImageSet` (or a generated set) already on its device."""

    def __init__(self, data: Examples, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 shift: int = 0, max_steps: int | None = None) -> None:
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.shift = shift
        self.max_steps = max_steps

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __len__(self) -> int:
        n = -(-len(self.data) // self.batch_size)
        return n if self.max_steps is None else min(n, self.max_steps)

    def order(self, epoch: int) -> Order | None:
        """The epoch's order of examples; None: in order."""
        return self.data.shuffled(_seed(self.seed, epoch)) if self.shuffle else None

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The batches of `epoch`, from `start_step` on."""
        order = self.order(epoch)
        for step in range(start_step, len(self)):
            lo, hi = step * self.batch_size, min((step + 1) * self.batch_size, len(self.data))
            idx = order[lo:hi] if order is not None else torch.arange(lo, hi, device=self.device)
            images, labels, sources = self.data.take(idx)
            if self.shift > 0:
                assert sources is None, "shifting the input would leave its objects' images behind"
                g = torch.Generator(device=self.device).manual_seed(_seed(self.seed, epoch, step, 1))
                images = random_shift(images, self.shift, g)
            x = images.float().div_(255)
            yield Batch(x, labels, x if sources is None else sources.float().div_(255))
