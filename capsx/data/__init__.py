"""Data sets: a registry of configs that each load into in-memory `ImageSet`s."""

from __future__ import annotations

import os
from pathlib import Path

# Importing the data sets registers them.
from capsx.data import cifar10 as _cifar10  # noqa: F401
from capsx.data import fashion_mnist as _fashion_mnist  # noqa: F401
from capsx.data import imagefolder as _imagefolder  # noqa: F401
from capsx.data import mnist as _mnist  # noqa: F401
from capsx.data import multimnist as _multimnist  # noqa: F401
from capsx.data import shapes as _shapes  # noqa: F401
from capsx.data import smallnorb as _smallnorb  # noqa: F401
from capsx.data import svhn as _svhn  # noqa: F401
from capsx.data.batches import Batch, Batches
from capsx.data.config import DATASETS, AugmentConfig, DataConfig, register_dataset
from capsx.data.files import canonical_root
from capsx.data.imageset import DataSplits, ImageSet
from capsx.data.transforms import center_crop, random_crop, random_shift

DEFAULT_DATA_ROOT = Path("data")


def resolve_data_root(cli_root: str | None, recipe_root: str | None) -> Path:
    """--data-root, else the recipe's data root, else $CAPSX_DATA, else ./data; as a canonical path."""
    for candidate in (cli_root, recipe_root, os.environ.get("CAPSX_DATA")):
        if candidate:
            return canonical_root(candidate)
    return canonical_root(DEFAULT_DATA_ROOT)


__all__ = ["DATASETS", "AugmentConfig", "Batch", "Batches", "DataConfig", "DataSplits", "ImageSet",
           "canonical_root", "center_crop", "random_crop", "random_shift", "register_dataset", "resolve_data_root"]
