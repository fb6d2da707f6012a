"""smallNORB (LeCun, Huang, Bottou 2004): 24,300 + 24,300 96x96 stereo image pairs of
50 toys in five categories, under 18 azimuths, 9 elevations and 6 lightings; the
test set holds other toy instances than the training set.

Read from NYU's original binary files in `<root>/smallnorb/` (gzipped or not):
smallnorb-5x46789x9x18x6x2x96x96-training-{dat,cat,info}.mat and
smallnorb-5x01235x9x18x6x2x96x96-testing-{dat,cat,info}.mat. Despite the
extension they are not MATLAB files: a little-endian int32 magic number for the
element type, int32 ndim, max(3, ndim) int32 dimensions, then the data.

As in the paper, the pairs are resized to 48x48 (2x2 area averages) at load; the
32x32 crops (random in training, central at test) are `augment.crop: 32`.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from capsx.data.config import DataConfig, register_dataset
from capsx.data.files import reading, require_files
from capsx.data.imageset import DataSplits, ImageSet
from capsx.data.pose import PoseQuantity, angle, degrees, linear
from capsx.errors import DataError

FOLDER = "smallnorb"
URL = "https://cs.nyu.edu/~yann/data/norb-v1.0-small/"
PREFIX = {"train": "smallnorb-5x46789x9x18x6x2x96x96-training", "test": "smallnorb-5x01235x9x18x6x2x96x96-testing"}
PARTS = ("dat", "cat", "info")
MAGIC: dict[int, np.dtype] = {0x1E3D4C55: np.dtype("<u1"), 0x1E3D4C54: np.dtype("<i4")}  # byte matrix, int matrix
SIZE = 48  # the paper's resize of the 96x96 originals
INFO_FIELDS = ("instance", "elevation", "azimuth", "lighting")  # the columns of -info.mat


def read_norb_matrix(path: Path) -> np.ndarray:
    """One NORB binary matrix file (or its .gz) as an array of its stored shape and type."""
    if path.suffix == ".gz":
        with gzip.open(path) as f:
            raw = f.read()
    else:
        raw = path.read_bytes()
    if len(raw) < 20:
        raise DataError(f"{path}: {len(raw)} bytes, too short for a NORB header")
    magic, ndim = np.frombuffer(raw, "<i4", count=2).tolist()
    if magic not in MAGIC:
        raise DataError(f"{path}: magic number {magic:#x}; expected {0x1E3D4C55:#x} (bytes) or {0x1E3D4C54:#x} (int32)")
    if not 1 <= ndim <= 16:
        raise DataError(f"{path}: {ndim} dimensions in the header; expected 1 to 16")
    n_dims = max(3, ndim)  # the header always stores at least three sizes
    dims = np.frombuffer(raw, "<i4", count=n_dims, offset=8).tolist()[:ndim]
    dtype = MAGIC[magic]
    offset = 8 + 4 * n_dims
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise DataError(f"{path}: header says {dims} of {dtype.name} ({expected:,} bytes) but "
                        f"{len(raw) - offset:,} bytes follow it")
    return np.frombuffer(raw, dtype, offset=offset).reshape(dims)


def _file(folder: Path, split: str, part: str) -> Path:
    """The file for (split, part), preferring the unpacked one to its .gz."""
    name = f"{PREFIX[split]}-{part}.mat"
    return folder / name if (folder / name).is_file() else folder / f"{name}.gz"


def resize_pairs(pairs: np.ndarray, size: int = SIZE, chunk: int = 2048) -> torch.Tensor:
    """(N, 2, 96, 96) uint8 -> (N, 2, size, size) uint8 by area averaging, a chunk at a time
    (the whole split as float would be 1.8 GB)."""
    out = torch.empty(len(pairs), pairs.shape[1], size, size, dtype=torch.uint8)
    for start in range(0, len(pairs), chunk):
        x = torch.from_numpy(np.array(pairs[start:start + chunk])).float()  # a writable copy of the chunk
        out[start:start + chunk] = F.interpolate(x, size=(size, size), mode="area").round_().clamp_(0, 255).byte()
    return out


def read_split(folder: Path, split: str) -> ImageSet:
    dat, cat, info = (read_norb_matrix(_file(folder, split, part)) for part in PARTS)
    n = len(dat)
    if dat.dtype != np.uint8 or dat.ndim != 4 or dat.shape[1] != 2:
        raise DataError(f"smallNORB {split} -dat.mat in {folder}: {dat.shape} {dat.dtype}; expected (N, 2, H, W) bytes")
    if cat.shape != (n,) or info.shape != (n, 4):
        raise DataError(f"smallNORB {split} files in {folder}: {n} image pairs, categories {cat.shape}, info "
                        f"{info.shape}; expected ({n},) and ({n}, 4)")
    if n and not 0 <= int(cat.min()) <= int(cat.max()) < 5:
        raise DataError(f"smallNORB {split} -cat.mat in {folder}: categories outside 0..4")
    extras = {name: torch.from_numpy(info[:, k].astype(np.int64)) for k, name in enumerate(INFO_FIELDS)}
    return ImageSet(images=resize_pairs(dat), labels=torch.from_numpy(cat.astype(np.int64)), extras=extras)


@register_dataset
class SmallNORBConfig(DataConfig):
    """`data: {name: smallnorb}`: stereo pairs as 2-channel 48x48 images, read from `<root>/smallnorb/`."""

    name: Literal["smallnorb"] = "smallnorb"
    root: str | None = None  # folder holding smallnorb/; relative to the recipe file

    image_shape: ClassVar[tuple[int, int, int]] = (2, SIZE, SIZE)
    classes: ClassVar[list[str]] = ["animal", "human", "airplane", "truck", "car"]
    needs_root: ClassVar[bool] = True
    user_images: ClassVar[str] = "photo"

    def pose(self, examples: ImageSet) -> list[PoseQuantity]:
        """Azimuth (0, 20, ..., 340 degrees: as cos, sin), elevation (30 to 70 degrees), lighting (0-5)."""
        e = examples.extras
        one = torch.ones(len(examples.labels), dtype=torch.int64)
        return [angle("azimuth", degrees(e["azimuth"] * 10), one), linear("elevation", 30 + 5 * e["elevation"]),
                linear("lighting", e["lighting"])]

    def load(self, root: Path) -> DataSplits:
        folder = root / FOLDER
        names = [_file(folder, split, part).name for split in PREFIX for part in PARTS]
        require_files("smallNORB", folder, names, holder=f"{FOLDER}/",
                      how_to_get=f"download the six .mat.gz files from {URL} (capsx cannot fetch them)")
        with reading("smallNORB", folder):
            return DataSplits(train=read_split(folder, "train"), test=read_split(folder, "test"),
                              classes=self.classes)
