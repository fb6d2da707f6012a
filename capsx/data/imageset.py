"""The in-memory form every data set is loaded into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor


def unit_float(images: Tensor) -> Tensor:
    """uint8 pixels 0..255 as a new float32 tensor in 0..1; anything else is returned as it is."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


class Order(Protocol):
    """An epoch's order of example indices; slicing gives one batch's indices."""

    def __getitem__(self, part: slice) -> Tensor: ...


@dataclass
class ImageSet:
    """One split held as a single uint8 tensor: cheap to keep on the device, and
    batches are slices, not per-image Python work."""

    images: Tensor  # (N, C, H, W) uint8, 0..255
    labels: Tensor  # (N,) int64, or (N, k) for k labelled objects per image
    extras: dict[str, Tensor] = field(default_factory=dict)  # per-image ground truth beyond the label
    # extras["sources"], if present: (N, k, C, H, W) uint8, each labelled object alone (what a decoder rebuilds)

    def __post_init__(self) -> None:
        assert self.images.dtype == torch.uint8 and self.images.dim() == 4, self.images.shape
        assert self.labels.dim() in (1, 2) and len(self.labels) == len(self.images), \
            (self.labels.shape, self.images.shape)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def take(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(images, labels, sources or None) of the examples `idx`."""
        sources = self.extras.get("sources")
        return self.images[idx], self.labels[idx], None if sources is None else sources[idx]

    def head(self, n: int) -> ImageSet:
        """The first n examples."""
        return self if n >= len(self) else ImageSet(self.images[:n], self.labels[:n],
                                                    {k: v[:n] for k, v in self.extras.items()})

    def shuffled(self, seed: int) -> Order:
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).to(self.device)

    def subset(self, n: int, seed: int = 0) -> ImageSet:
        """A seeded random subset of n images (the same for every training seed)."""
        if n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return ImageSet(self.images[idx], self.labels[idx], {k: v[idx] for k, v in self.extras.items()})

    def to(self, device: torch.device) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device),
                        {k: v.to(device) for k, v in self.extras.items()})


class Examples(Protocol):
    """What `Batches` draws from: an `ImageSet`, or a set generated batch by batch (MultiMNIST's pairs)."""

    def __len__(self) -> int: ...
    @property
    def device(self) -> torch.device: ...
    def take(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor | None]: ...
    def shuffled(self, seed: int) -> Order: ...
    def head(self, n: int) -> ImageSet: ...
    def subset(self, n: int, seed: int = 0) -> Examples: ...
    def to(self, device: torch.device) -> Examples: ...


@dataclass
class DataSplits:
    train: Examples
    test: Examples
    classes: list[str]
    notes: list[str] = field(default_factory=list)  # what reading the files skipped, for the user to read
