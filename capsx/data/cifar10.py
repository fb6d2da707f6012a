"""CIFAR-10 (Krizhevsky 2009) through torchvision's own reader (`torchvision.datasets.CIFAR10`):
50,000 + 10,000 32x32 colour images of ten classes, read from the pickled batches in
`<root>/cifar-10-batches-py/` (data_batch_1..5, test_batch, batches.meta)."""

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

FOLDER = "cifar-10-batches-py"
FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


@functools.cache
def cifar10_files() -> type:
    """torchvision's reader, checking that the batches exist rather than their MD5s: the checksums
    accept only the published files byte for byte, so a re-pickled copy (or a test's tiny one)
    would be refused with "not found or corrupted". A truncated pickle still fails to load.
    Built on first use: importing torchvision takes 1.4 s that a command without CIFAR-10 never pays."""
    import torchvision

    class CIFAR10Files(torchvision.datasets.CIFAR10):
        meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}

        def _check_integrity(self) -> bool:
            return all((Path(self.root) / self.base_folder / name).is_file()
                       for name, _ in self.train_list + self.test_list)

    return CIFAR10Files


@register_dataset
class CIFAR10Config(DataConfig):
    """`data: {name: cifar10}`: read from `<root>/cifar-10-batches-py/`."""

    name: Literal["cifar10"] = "cifar10"
    root: str | None = None  # folder holding cifar-10-batches-py/; relative to the recipe file
    download: bool = False  # fetch and unpack the archive with torchvision when the files are missing

    image_shape: ClassVar[tuple[int, int, int]] = (3, 32, 32)
    classes: ClassVar[list[str]] = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                    "ship", "truck"]
    needs_root: ClassVar[bool] = True
    user_images: ClassVar[str] = "photo"

    def load(self, root: Path) -> DataSplits:
        folder = root / FOLDER
        if not self.download:
            require_files("CIFAR-10", folder, FILES, holder=f"{FOLDER}/")
        splits = []
        for train in (True, False):
            with reading("CIFAR-10", folder):
                ds = cifar10_files()(str(root), train=train, download=self.download)
                images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
                labels = torch.tensor(ds.targets, dtype=torch.long)
            if ds.classes != self.classes:
                raise DataError(f"CIFAR-10 batches.meta in {folder} names the classes {ds.classes}; "
                                f"expected {self.classes}")
            if len(labels) != len(images) or (labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < 10):
                raise DataError(f"CIFAR-10 files in {folder}: {len(images)} images, {len(labels)} labels "
                                "(expected as many labels, each 0..9)")
            splits.append(ImageSet(images=images, labels=labels))
        check_disjoint("CIFAR-10", [folder / f for f in FILES], splits[0].images, splits[1].images)
        return DataSplits(train=splits[0], test=splits[1], classes=self.classes)
