"""MNIST through torchvision's own reader (`torchvision.datasets.MNIST`)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torchvision

from capsx.data.config import DataConfig, register_dataset
from capsx.data.files import reading, require_files
from capsx.data.imageset import DataSplits, ImageSet
from capsx.errors import DataError

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

    image_shape: ClassVar[tuple[int, int, int]] = (1, 28, 28)
    classes: ClassVar[list[str]] = [str(d) for d in range(10)]
    needs_root: ClassVar[bool] = True

    def load(self, root: Path) -> DataSplits:
        return read_mnist(root, self.download)


def read_mnist(root: Path, download: bool = False) -> DataSplits:
    """Both MNIST splits from `<root>/MNIST/raw/` (also the source of the data sets built from MNIST)."""
    if not download:
        require_files("MNIST", root / "MNIST" / "raw", MNIST_FILES, holder="MNIST/")
    return read_idx_splits(torchvision.datasets.MNIST, root, download, MNISTConfig.classes)


def read_idx_splits(dataset: type[torchvision.datasets.MNIST], root: Path, download: bool,
                    classes: list[str]) -> DataSplits:
    """Both splits of an MNIST-format data set (IDX files in root/<ClassName>/raw/), by torchvision's reader."""
    return DataSplits(train=_read_split(dataset, root, train=True, download=download),
                      test=_read_split(dataset, root, train=False, download=download), classes=classes)


def _read_split(dataset: type[torchvision.datasets.MNIST], root: Path, train: bool, download: bool) -> ImageSet:
    raw = root / dataset.__name__ / "raw"
    with reading(f"{dataset.__name__} {'train' if train else 't10k'}", raw):
        ds = dataset(str(root), train=train, download=download)
    if ds.data.dim() != 3 or len(ds.data) != len(ds.targets):
        raise DataError(f"{dataset.__name__} files in {raw}: {len(ds.data)} images but "
                        f"{len(ds.targets)} labels; expected the same number")
    return ImageSet(images=ds.data.unsqueeze(1).contiguous(), labels=ds.targets.long())
