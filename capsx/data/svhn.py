"""SVHN (Netzer et al. 2011), the cropped-digits format, through torchvision's own reader
(`torchvision.datasets.SVHN`, which needs scipy): 73,257 + 26,032 32x32 colour house
numbers read from `<root>/svhn/{train,test}_32x32.mat`. The paper trained on the 73,257
only, so the 531,131 'extra' images are not read. torchvision maps SVHN's label 10 to 0."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import ClassVar, Literal

import torch

from capsx.data.config import DataConfig, register_dataset
from capsx.data.files import reading, require_files
from capsx.data.imageset import DataSplits, ImageSet
from capsx.data.integrity import check_disjoint
from capsx.errors import DataError

FOLDER = "svhn"
FILES = ["train_32x32.mat", "test_32x32.mat"]


@functools.cache
def svhn_files() -> type:
    """torchvision's reader, checking that the .mat file exists rather than its MD5 (which accepts only
    the published file byte for byte). Its download still verifies the MD5. Built on first use."""
    import torchvision

    class SVHNFiles(torchvision.datasets.SVHN):
        def _check_integrity(self) -> bool:
            return (Path(self.root) / self.filename).is_file()

    return SVHNFiles


@register_dataset
class SVHNConfig(DataConfig):
    """`data: {name: svhn}`: read from `<root>/svhn/`."""

    name: Literal["svhn"] = "svhn"
    root: str | None = None  # folder holding svhn/; relative to the recipe file
    download: bool = False  # fetch the .mat files with torchvision when they are missing

    image_shape: ClassVar[tuple[int, int, int]] = (3, 32, 32)
    classes: ClassVar[list[str]] = [str(d) for d in range(10)]
    needs_root: ClassVar[bool] = True
    user_images: ClassVar[str] = "photo"

    def load(self, root: Path) -> DataSplits:
        folder = root / FOLDER
        if not self.download:
            require_files("SVHN", folder, FILES, holder=f"{FOLDER}/")
        splits = []
        for split in ("train", "test"):
            with reading(f"SVHN {split}", folder):
                ds = svhn_files()(str(folder), split=split, download=self.download)
                images = torch.from_numpy(ds.data).contiguous()  # (N, 3, 32, 32): torchvision transposed X
                labels = torch.from_numpy(ds.labels).long().reshape(-1)
            if images.dtype != torch.uint8 or images.shape[1:] != (3, 32, 32) or len(labels) != len(images):
                raise DataError(f"SVHN {split}_32x32.mat in {folder}: X gave {tuple(images.shape)} {images.dtype} "
                                f"and y {len(labels)} labels; expected X of 32x32x3xN uint8 and N labels")
            if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < 10:
                raise DataError(f"SVHN {split}_32x32.mat in {folder}: labels outside 1..10")
            splits.append(ImageSet(images=images, labels=labels))
        check_disjoint("SVHN", [folder / f for f in FILES], splits[0].images, splits[1].images)
        return DataSplits(train=splits[0], test=splits[1], classes=self.classes)
