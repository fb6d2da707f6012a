"""`multimnist`: the paper's overlapping digits, generated from MNIST on the fly.

Each example overlays two digits of different classes from the same MNIST
split. Each digit is put on a black `canvas` x `canvas` image with its 28x28
frame at (pad, pad), moved by its own (dx, dy) in [-max_shift, max_shift]
(what falls off the canvas is cut), and the two are added and clipped to 255.
The paper: canvas 36, pad 4, shift 4; its reference generator shifted by up to
6. The labels are the two classes, and each example keeps both digits alone
(`sources`): the decoder rebuilds each from its own capsule.

Paper scale is 1,000 pairs per training digit (60M): far too many to store. So
every example is a pure function of (seed, split, index), drawn through a
counter-based integer hash rather than a generator's state: a batch of any
indices is made on the device, vectorised, when it is needed; the test set is
the same in every run and whatever the batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from capsx.data.config import DataConfig, register_dataset
from capsx.data.imageset import DataSplits, Examples, ImageSet
from capsx.data.mnist import MNISTConfig, read_mnist, read_mnist_test
from capsx.errors import DataError

DIGIT = 28  # MNIST's frame
MASK32 = 0xFFFFFFFF
STREAMS = ("partner_class", "partner_digit", "dx1", "dy1", "dx2", "dy2")  # one hash stream per random choice


def hash32(x: Tensor | int) -> Tensor:
    """A 32-bit integer mixer (C. Wellons' hash-prospector triple), element-wise on int64.
    Both multipliers are below 2^31 and the operand below 2^32, so no product leaves int64."""
    x = torch.as_tensor(x, dtype=torch.int64) & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & MASK32
    return x ^ (x >> 15)


def _key(*parts: int) -> int:
    k = 0x9E3779B9
    for p in parts:
        k = int(hash32(k ^ (p & MASK32)))
    return k


def place(digits: Tensor, shifts: Tensor, canvas: int, pad: int, max_shift: int) -> Tensor:
    """Digits (B, C, 28, 28) on a black (B, C, canvas, canvas) image, frame at (pad, pad) moved by
    shifts (B, 2) = (dx, dy) each in [-max_shift, max_shift]; an output pixel (y, x) reads
    the digit's pixel (y - pad - dy, x - pad - dx), zero outside the digit."""
    B, C, H, W = digits.shape
    lo, hi = pad + max_shift, max(0, canvas - H - pad + max_shift)  # borders every read index stays within
    padded = F.pad(digits, (lo, hi, lo, hi))  # (B, C, H+lo+hi, W+lo+hi)
    span = torch.arange(canvas, device=digits.device)
    rows = (span + lo - pad - shifts[:, 1:2]).view(B, 1, canvas, 1)
    cols = (span + lo - pad - shifts[:, 0:1]).view(B, 1, 1, canvas)
    batch = torch.arange(B, device=digits.device).view(B, 1, 1, 1)
    chan = torch.arange(C, device=digits.device).view(1, C, 1, 1)
    return padded[batch, chan, rows, cols]


@dataclass
class PairSet:
    """A split of MultiMNIST: `size` examples made from the MNIST `digits` of one split, on demand.

    Example i's first digit is `first_order[i % N]` (every digit once per N examples); its
    partner and both shifts come from hashing (key, i)."""

    digits: Tensor  # (N, 1, 28, 28) uint8, one MNIST split
    digit_labels: Tensor  # (N,) int64
    size: int
    key: int  # from (seed, split)
    canvas: int
    pad: int
    max_shift: int

    def __post_init__(self) -> None:
        present = self.digit_labels.unique()  # sorted
        if len(present) < 2:
            raise DataError(f"multimnist: the MNIST split has {len(present)} class(es); pairs need two different")
        assert self.size < 2**32, self.size  # the hash takes 32-bit indices
        dev = self.digits.device
        g = torch.Generator().manual_seed(self.key)
        self.first_order = torch.randperm(len(self.digits), generator=g).to(dev)
        self.by_class = self.digit_labels.argsort(stable=True)  # digit indices grouped by class
        counts = torch.bincount(self.digit_labels, minlength=int(present.max()) + 1)
        self.class_start = counts.cumsum(0) - counts
        self.class_count = counts
        self.present = present
        self.rank_of = torch.zeros(len(counts), dtype=torch.int64, device=dev)  # class -> its rank among present
        self.rank_of[present] = torch.arange(len(present), device=dev)

    def __len__(self) -> int:
        return self.size

    @property
    def device(self) -> torch.device:
        return self.digits.device

    def _draw(self, idx: Tensor, stream: str, n: Tensor | int) -> Tensor:
        """Uniform ints in [0, n) for each index, the same for the same (key, stream, index)."""
        k = _key(self.key, STREAMS.index(stream))
        return hash32(hash32(idx ^ k) + k) % n

    def pairs(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """What examples `idx` are made of: the MNIST indices of the first and second digit, (B,) each,
        and their shifts (B, 2, 2) = ((dx1, dy1), (dx2, dy2))."""
        idx = idx.to(self.device, torch.int64)
        first = self.first_order[idx % len(self.digits)]
        # The partner's class: uniform over the other classes present; then a digit of it, uniform.
        n_present = len(self.present)
        rank = (self.rank_of[self.digit_labels[first]] + 1 + self._draw(idx, "partner_class", n_present - 1))
        cls = self.present[rank % n_present]
        second = self.by_class[self.class_start[cls] + self._draw(idx, "partner_digit", self.class_count[cls])]
        width = 2 * self.max_shift + 1
        shifts = torch.stack([self._draw(idx, s, width) for s in STREAMS[2:]], dim=1) - self.max_shift
        return first, second, shifts.view(-1, 2, 2)

    def take(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(merged images (B, 1, S, S), labels (B, 2), sources (B, 2, 1, S, S)), all uint8 but the labels."""
        first, second, shifts = self.pairs(idx)
        B = len(first)
        both = torch.stack([first, second], dim=1).flatten()  # (2B,)
        placed = place(self.digits[both], shifts.view(2 * B, 2), self.canvas, self.pad, self.max_shift)
        sources = placed.view(B, 2, *placed.shape[1:])  # (B, 2, 1, S, S)
        merged = sources.sum(dim=1, dtype=torch.int16).clamp_(max=255).to(torch.uint8)
        return merged, self.digit_labels[both].view(B, 2), sources

    def shuffled(self, seed: int) -> AffineOrder:
        return AffineOrder(self.size, seed, self.device)

    def head(self, n: int) -> ImageSet:
        images, labels, sources = self.take(torch.arange(min(n, self.size), device=self.device))
        return ImageSet(images, labels, {"sources": sources})

    def subset(self, n: int, seed: int = 0) -> PairSet:
        """The first n examples: each is already a random pair, so these are a random sample."""
        return replace(self, size=min(n, self.size))

    def to(self, device: torch.device) -> PairSet:
        return replace(self, digits=self.digits.to(device), digit_labels=self.digit_labels.to(device))


class AffineOrder:
    """A shuffled order of range(n) that is never materialised: position p holds (a p + b) mod n,
    a bijection since gcd(a, n) = 1. Each example is a random pair already; this only varies
    which ones share a batch from epoch to epoch, without a 60M-entry permutation."""

    def __init__(self, n: int, seed: int, device: torch.device) -> None:
        self.n, self.device = n, device
        a = int(hash32(seed)) % n or 1
        while math.gcd(a, n) != 1:
            a += 1
        self.a, self.b = a, int(hash32(seed ^ 0x5BD1E995)) % n

    def __getitem__(self, part: slice) -> Tensor:
        p = torch.arange(*part.indices(self.n), device=self.device)
        return (self.a * p + self.b) % self.n  # a, p < n <= 6e8: no int64 overflow


@register_dataset
class MultiMNISTConfig(DataConfig):
    """`data: {name: multimnist}`: pairs of overlapping MNIST digits, generated from `seed`;
    MNIST is read from `<root>/MNIST/raw/` as for `mnist`."""

    name: Literal["multimnist"] = "multimnist"
    root: str | None = None  # folder holding MNIST/raw/; relative to the recipe file
    download: bool = False  # fetch MNIST with torchvision when it is missing
    seed: int = 0  # the pairs and shifts; the same seed gives the same examples on every machine
    canvas: int = Field(36, ge=DIGIT)  # output size (paper: 36)
    pad: int = Field(4, ge=0)  # where the unshifted 28x28 frame sits (paper: 4, centred)
    max_shift: int = Field(4, ge=0)  # each digit moves up to this many pixels each way (paper: 4; its code: 6)
    pairs_per_digit: int = Field(1000, ge=1, le=10_000)  # training examples per training digit (paper: 1,000)
    test_pairs_per_digit: int = Field(1, ge=1, le=10_000)  # per test digit (paper: 1,000; 1 gives 10,000)

    classes: ClassVar[list[str]] = MNISTConfig.classes
    needs_root: ClassVar[bool] = True
    objects: ClassVar[int] = 2

    @property
    def image_shape(self) -> tuple[int, int, int]:  # type: ignore[override]
        return (1, self.canvas, self.canvas)

    @model_validator(mode="after")
    def _fits(self) -> MultiMNISTConfig:
        if self.pad + DIGIT > self.canvas:
            raise ValueError(f"pad {self.pad}: the 28-pixel digit does not fit canvas {self.canvas}; "
                             f"expected pad <= canvas - 28 = {self.canvas - DIGIT}")
        if self.augment.shift:
            raise ValueError(f"augment.shift: expected 0, got {self.augment.shift}: max_shift already moves "
                             "each digit, and shifting the merged image would leave the digits' own images behind")
        return self

    def load_test(self, root: Path) -> Examples:
        test = read_mnist_test(root, self.download)
        return PairSet(test.images, test.labels, len(test) * self.test_pairs_per_digit, _key(self.seed, 1),
                       self.canvas, self.pad, self.max_shift)

    def load(self, root: Path) -> DataSplits:
        mnist = read_mnist(root, self.download)
        splits = []
        for split, (data, per_digit) in enumerate(((mnist.train, self.pairs_per_digit),
                                                   (mnist.test, self.test_pairs_per_digit))):
            assert isinstance(data, ImageSet)
            splits.append(PairSet(data.images, data.labels, len(data) * per_digit, _key(self.seed, split),
                                  self.canvas, self.pad, self.max_shift))
        return DataSplits(train=splits[0], test=splits[1], classes=self.classes)
