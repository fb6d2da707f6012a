"""Batches from an in-memory `ImageSet`, shuffled and augmented on the device.

Both the epoch's order and each batch's shifts and crops come from generators seeded by
(seed, epoch, step), so an epoch can be restarted at any step and produce the
same batches: that is what makes resume exact.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from capsx.data.imageset import ImageSet


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


def random_crop(images: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """A size x size window of each image (B, C, H, W), each at its own random position."""
    B, C, H, W = images.shape
    tops = torch.randint(0, H - size + 1, (B,), generator=generator, device=generator.device).to(images.device)
    lefts = torch.randint(0, W - size + 1, (B,), generator=generator, device=generator.device).to(images.device)
    window = torch.arange(size, device=images.device)
    rows = (tops.view(B, 1) + window).view(B, 1, size, 1)
    cols = (lefts.view(B, 1) + window).view(B, 1, 1, size)
    batch = torch.arange(B, device=images.device).view(B, 1, 1, 1)
    chan = torch.arange(C, device=images.device).view(1, C, 1, 1)
    return images[batch, chan, rows, cols]  # (B, C, size, size)


def center_crop(images: Tensor, size: int) -> Tensor:
    """The central size x size window of every image (B, C, H, W); odd margins leave the extra pixel below/right."""
    H, W = images.shape[-2:]
    top, left = (H - size) // 2, (W - size) // 2
    return images[..., top:top + size, left:left + size].contiguous()


def _seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of ints (stable across runs and machines)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


class Batches:
    """Iterates (images float in [0, 1], labels) batches of an `ImageSet` already on its device."""

    def __init__(self, data: ImageSet, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 shift: int = 0, crop: int | None = None, max_steps: int | None = None) -> None:
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.shift = shift
        self.crop = crop  # a random crop per image (training); the test split is centre-cropped at load
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
            if self.crop is not None:
                g = torch.Generator(device=self.device).manual_seed(_seed(self.seed, epoch, step, 2))
                images = random_crop(images, self.crop, g)
            yield images.float().div_(255), self.data.labels[idx]
