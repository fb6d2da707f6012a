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
from pydantic import Field, model_validator

from capsx.data.cache import cached_split, store_split
from capsx.data.config import DataConfig, register_dataset
from capsx.data.files import reading, require_files
from capsx.data.imageset import DataSplits, Examples, ImageSet
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
    def image_shape(self) -> tuple[int, int, int]:  # type: ignore[override]
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
        splits = read_mnist(root, self.download)
        if self.canvas is not None:
            train, test = splits.train, splits.test
            assert isinstance(train, ImageSet) and isinstance(test, ImageSet)
            splits.train = ImageSet(centre_on_canvas(train.images, self.canvas), train.labels)
            splits.test = ImageSet(self.place(test.images), test.labels)
        return splits

    def load_test(self, root: Path) -> Examples:
        test = read_mnist_test(root, self.download)
        return test if self.canvas is None else ImageSet(self.place(test.images), test.labels)

    def place(self, images: torch.Tensor) -> torch.Tensor:
        """28x28 digits at seeded random places on the canvas (deterministic for `placement_seed`)."""
        assert self.canvas is not None
        g = torch.Generator().manual_seed(self.placement_seed)
        return random_shift(centre_on_canvas(images, self.canvas), self.placement, g)


def read_mnist(root: Path, download: bool = False) -> DataSplits:
    """Both MNIST splits from `<root>/MNIST/raw/` (also the source of the data sets built from MNIST)."""
    if not download:
        require_files("MNIST", root / "MNIST" / "raw", MNIST_FILES, holder="MNIST/")
    return read_idx_splits("MNIST", root, download, MNISTConfig.classes)


def read_mnist_test(root: Path, download: bool = False) -> ImageSet:
    """MNIST's test split alone (`read_idx_test`)."""
    if not download:
        require_files("MNIST", root / "MNIST" / "raw", MNIST_FILES[2:], holder="MNIST/")
    return read_idx_test("MNIST", root, download)


def read_idx_splits(dataset: str, root: Path, download: bool, classes: list[str]) -> DataSplits:
    """Both splits of an MNIST-format data set (IDX files in root/<dataset>/raw/, `dataset` the name of
    torchvision's reader class) by torchvision's reader, checked disjoint (no test image also in the train
    split); the test split is kept in the cache for `read_idx_test`."""
    train = _read_split(dataset, root, train=True, download=download)
    test = _read_split(dataset, root, train=False, download=download)
    raw = root / dataset / "raw"
    check_disjoint(dataset, [raw / f for f in MNIST_FILES], train.images, test.images)
    store_split(f"{dataset} t10k", _test_files(raw), test)
    return DataSplits(train=train, test=test, classes=classes)


def read_idx_test(dataset: str, root: Path, download: bool) -> ImageSet:
    """The test split alone: from the cache while its two files are unchanged (neither the train split
    nor torchvision is loaded), else by torchvision's reader."""
    raw = root / dataset / "raw"
    return cached_split(f"{dataset} t10k", _test_files(raw),
                        lambda: _read_split(dataset, root, train=False, download=download))


def _test_files(raw: Path) -> list[Path]:
    return [(raw / f).resolve() for f in MNIST_FILES[2:]]


def _read_split(dataset: str, root: Path, train: bool, download: bool) -> ImageSet:
    import torchvision  # here, not at the top: 1.4 s that a command reading the cache never pays

    raw = root / dataset / "raw"
    with reading(f"{dataset} {'train' if train else 't10k'}", raw):
        ds = getattr(torchvision.datasets, dataset)(str(root), train=train, download=download)
    if ds.data.dim() != 3 or len(ds.data) != len(ds.targets):
        raise DataError(f"{dataset} files in {raw}: {len(ds.data)} images but "
                        f"{len(ds.targets)} labels; expected the same number")
    return ImageSet(images=ds.data.unsqueeze(1).contiguous(), labels=ds.targets.long())
