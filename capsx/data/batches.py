"""Batches from an in-memory `ImageSet`, shuffled and augmented on the device.

Both the epoch's order and each batch's shifts and crops come from generators
seeded by (seed, epoch, step), so an epoch can be restarted at any step and
produce the same batches: that is what makes resume exact.

The order is torch's `DistributedSampler`'s, also with one process: with N
processes, rank r's batch at each step is every N-th image of the one-process
batch (with the same shifts and crops), so N processes see exactly the data one
does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from capsx.data.imageset import Examples, Order, unit_float
from capsx.data.transforms import shift_by, take_windows, window_offsets


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
    """Iterates `Batch`es of an `ImageSet` (or a generated set) already on its device.

    `batch_size` is the global batch; with `world` processes this one (`rank`) takes every `world`-th
    example of it, starting at `rank`: the split torch's `DistributedSampler` makes of the epoch's order,
    down to padding the last batch with the order's first examples (training). Evaluation batches are
    not padded, so each test example is counted exactly once over the processes.
    """

    def __init__(self, data: Examples, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 shift: int = 0, crop: int | None = None, max_steps: int | None = None, rank: int = 0,
                 world: int = 1) -> None:
        if shuffle and batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by {world} processes")
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.shift = shift
        self.crop = crop  # a random crop per image (training); the test split is centre-cropped at load
        self.max_steps = max_steps
        self.rank, self.world = rank, world

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __len__(self) -> int:
        n = -(-len(self.data) // self.batch_size)
        return n if self.max_steps is None else min(n, self.max_steps)

    def order(self, epoch: int) -> Order | None:
        """The epoch's order of examples (the same on every process); None: in order."""
        return self.data.shuffled(_seed(self.seed, epoch)) if self.shuffle else None

    def _global_batch(self, order: Order | None, step: int) -> Tensor:
        lo, hi = step * self.batch_size, min((step + 1) * self.batch_size, len(self.data))
        idx = order[lo:hi] if order is not None else torch.arange(lo, hi, device=self.device)
        short = -len(idx) % self.world
        if short and self.shuffle:  # every process takes the same number of examples, as DistributedSampler
            first = order[0:short] if order is not None else torch.arange(short, device=self.device)
            idx = torch.cat([idx, first])
        return idx

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The batches of `epoch`, from `start_step` on (this process's share of each)."""
        for _, batch in self.indexed(epoch, start_step):
            yield batch

    def indexed(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Batch]]:
        """`epoch`'s batches with the indices of their examples in the data (what an evaluation's
        mistakes are named by, whichever process saw them)."""
        order = self.order(epoch)
        share = slice(self.rank, None, self.world)
        for step in range(start_step, len(self)):
            everyone = self._global_batch(order, step)
            idx = everyone[share]
            if len(idx) == 0:
                continue  # the other processes evaluate the last few examples
            images, labels, sources = self.data.take(idx)
            # random offsets are drawn for the whole global batch; this process uses its share of them.
            # They are drawn on the CPU (a few hundred integers) so that a seed gives the same data on
            # every device: a CUDA generator draws other numbers than the CPU's from the same seed.
            if self.shift > 0:
                assert sources is None, "shifting the input would leave its objects' images behind"
                g = torch.Generator().manual_seed(_seed(self.seed, epoch, step, 1))
                span = 2 * self.shift
                offsets = _on(self.device, window_offsets(len(everyone), span, span, g)[:, share])
                images = shift_by(images, offsets, self.shift)
            if self.crop is not None:
                assert sources is None, "cropping the input would leave its objects' images behind"
                g = torch.Generator().manual_seed(_seed(self.seed, epoch, step, 2))
                H, W = images.shape[-2:]
                offsets = _on(self.device, window_offsets(len(everyone), H - self.crop, W - self.crop, g)[:, share])
                images = take_windows(images, offsets, self.crop, self.crop)
            x = unit_float(images)
            yield idx, Batch(x, labels, x if sources is None else unit_float(sources))


def _on(device: torch.device, offsets: Tensor) -> Tensor:
    """CPU-drawn offsets on the data's device. To a GPU through pinned memory and without waiting: a
    plain copy from pageable memory would wait for every queued kernel, once a step."""
    if device.type != "cuda":
        return offsets.to(device)
    return offsets.pin_memory().to(device, non_blocking=True)
