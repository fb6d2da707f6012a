"""The in-memory form every data set is loaded into."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class ImageSet:
    """One split held as a single uint8 tensor: cheap to keep on the device, and
    batches are slices, not per-image Python work."""

    images: Tensor  # (N, C, H, W) uint8, 0..255
    labels: Tensor  # (N,) int64
    extras: dict[str, Tensor] = field(default_factory=dict)  # per-image ground truth beyond the label

    def __post_init__(self) -> None:
        assert self.images.dtype == torch.uint8 and self.images.dim() == 4, self.images.shape
        assert self.labels.shape == (len(self.images),), (self.labels.shape, self.images.shape)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int, seed: int = 0) -> ImageSet:
        """A seeded random subset of n images (the same for every training seed)."""
        if n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return ImageSet(self.images[idx], self.labels[idx], {k: v[idx] for k, v in self.extras.items()})

    def to(self, device: torch.device) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device),
                        {k: v.to(device) for k, v in self.extras.items()})


@dataclass
class DataSplits:
    train: ImageSet
    test: ImageSet
    classes: list[str]
