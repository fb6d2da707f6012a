"""MNIST through torchvision's own reader (`torchvision.datasets.MNIST`)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torchvision

from capsx.data.config import DataConfig, register_dataset
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

    input_shape: ClassVar[tuple[int, int, int]] = (1, 28, 28)
    classes: ClassVar[list[str]] = [str(d) for d in range(10)]
    needs_root: ClassVar[bool] = True

    def load(self, root: Path) -> DataSplits:
        return read_mnist(root, self.download)


def read_mnist(root: Path, download: bool = False) -> DataSplits:
    """Both MNIST splits from `<root>/MNIST/raw/` (also the source of the data sets built from MNIST)."""
    raw = root / "MNIST" / "raw"
    missing = [f for f in MNIST_FILES if not (raw / f).is_file()]
    if missing and not download:
        raise DataError(
            f"MNIST not found: expected {', '.join(missing)} in {raw} "
            "(point CAPSX_DATA or --data-root at the folder holding MNIST/, "
            "or add --set data.download=true to fetch it)"
        )
    return DataSplits(
        train=_read_split(root, train=True, download=download),
        test=_read_split(root, train=False, download=download),
        classes=MNISTConfig.classes,
    )


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
