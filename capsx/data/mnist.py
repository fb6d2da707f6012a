"""MNIST through torchvision's own reader (`torchvision.datasets.MNIST`).

With `canvas: 40` each digit is placed at a random position on a 40x40 black
canvas (translation only), as the paper trained for its affNIST experiment:
training digits are kept centred and moved anywhere on the canvas by the
batches' on-device shift, a new place every epoch; test digits get one seeded
place each, the same in every run.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
import torchvision
from pydantic import Field, model_validator

from capsx.data.config import DataConfig, register_dataset
from capsx.data.imageset import DataSplits, ImageSet
from capsx.data.integrity import check_disjoint
from capsx.data.transforms import centre_on_canvas, random_shift
from capsx.errors import DataError

SIZE = 28

MNIST_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


@register_dataset
class MNISTConfig(DataConfig):
    """`data: {name: mnist}`: 60,000 + 10,000 28x28 digits, read from `<root>/MNIST/raw/`."""

    name: Literal["mnist"] = "mnist"
    root: str | None = None  # folder holding MNIST/raw/; relative to the recipe file
    download: bool = False  # fetch the files with torchvision when they are missing
    canvas: int | None = Field(None, ge=SIZE)  # place each digit at random on a canvas this big (paper: 40)
    placement_seed: int = 0  # the test digits' places

    classes: ClassVar[list[str]] = [str(d) for d in range(10)]
    needs_root: ClassVar[bool] = True

    @model_validator(mode="after")
    def _canvas_fits(self) -> MNISTConfig:
        if self.canvas is not None and (self.canvas - SIZE) % 2:
            raise ValueError(f"canvas {self.canvas}: expected 28 plus an even margin (e.g. 40), so every "
                             "place on it can be reached")
        if self.canvas is not None and self.augment.shift:
            raise ValueError("augment.shift must be 0 with a canvas: the random placement already moves "
                             "each digit anywhere on it")
        return self

    @property
    def input_shape(self) -> tuple[int, int, int]:
        side = self.canvas or SIZE
        return (1, side, side)

    @property
    def placement(self) -> int:
        """How far a centred digit can move each way and stay on the canvas."""
        return 0 if self.canvas is None else (self.canvas - SIZE) // 2

    @property
    def train_shift(self) -> int:
        return self.placement if self.canvas is not None else self.augment.shift

    def load(self, root: Path) -> DataSplits:
        raw = root / "MNIST" / "raw"
        missing = [f for f in MNIST_FILES if not (raw / f).is_file()]
        if missing and not self.download:
            raise DataError(
                f"MNIST not found: expected {', '.join(missing)} in {raw} "
                "(point CAPSX_DATA or --data-root at the folder holding MNIST/, "
                "or add --set data.download=true to fetch it)"
            )
        train = _read_split(root, train=True, download=self.download)
        test = _read_split(root, train=False, download=self.download)
        check_disjoint("MNIST", [raw / f for f in MNIST_FILES], train.images, test.images)
        if self.canvas is not None:
            train = ImageSet(centre_on_canvas(train.images, self.canvas), train.labels)
            test = ImageSet(self.place(test.images), test.labels)
        return DataSplits(train=train, test=test, classes=self.classes)

    def place(self, images: torch.Tensor) -> torch.Tensor:
        """28x28 digits at seeded random places on the canvas (deterministic for `placement_seed`)."""
        assert self.canvas is not None
        g = torch.Generator().manual_seed(self.placement_seed)
        return random_shift(centre_on_canvas(images, self.canvas), self.placement, g)


def _read_split(root: Path, train: bool, download: bool) -> ImageSet:
    try:
        ds = torchvision.datasets.MNIST(str(root), train=train, download=download)
    except Exception as e:  # torchvision raises RuntimeError, ValueError, URLError, ...
        split = "train" if train else "t10k"
        raise DataError(f"MNIST {split} files in {root / 'MNIST' / 'raw'} could not be read: {e}") from None
    if ds.data.dim() != 3 or len(ds.data) != len(ds.targets):
        raise DataError(f"MNIST files in {root / 'MNIST' / 'raw'}: {len(ds.data)} images but "
                        f"{len(ds.targets)} labels; expected the same number")
    return ImageSet(images=ds.data.unsqueeze(1).contiguous(), labels=ds.targets.long())
