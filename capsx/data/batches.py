"""Batches from an in-memory `ImageSet`, shuffled and augmented on the device.

Both the epoch's order and each batch's shifts come from generators seeded by
(seed, epoch, step), so an epoch can be restarted at any step and produce the
same batches: that is what makes resume exact.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from capsx.data.imageset import ImageSet
from capsx.data.transforms import random_shift


def _seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of ints (stable across runs and machines)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


class Batches:
    """Iterates (images float in [0, 1], labels) batches of an `ImageSet` already on its device."""

    def __init__(self, data: ImageSet, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 shift: int = 0, max_steps: int | None = None) -> None:
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.shift = shift
        self.max_steps = max_steps

    @property
    def device(self) -> torch.device:
        return self.data.images.device

    def __len__(self) -> int:
        n = -(-len(self.data) // self.batch_size)
        return n if self.max_steps is None else min(n, self.max_steps)

    def order(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(len(self.data), device=self.device)
        g = torch.Generator().manual_seed(_seed(self.seed, epoch))
        return torch.randperm(len(self.data), generator=g).to(self.device)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of `epoch`, from `start_step` on."""
        order = self.order(epoch)
        for step in range(start_step, len(self)):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            images = self.data.images[idx]
            if self.shift > 0:
                g = torch.Generator(device=self.device).manual_seed(_seed(self.seed, epoch, step, 1))
                images = random_shift(images, self.shift, g)
            yield images.float().div_(255), self.data.labels[idx]
