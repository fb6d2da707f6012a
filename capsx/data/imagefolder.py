"""Your own images as a data set: a folder in the layout torchvision's `ImageFolder` reads,
`root/train/<class>/*.png|jpg|...` and `root/test/<class>/...`, or one `root/<class>/...` split by a
seeded `test_fraction`. Read once with Pillow into capsx's in-memory uint8 tensors at the recipe's
`size` and `channels`; the decoded splits are cached (keyed by every file's path, size and modification
time, and the reading settings) in $CAPSX_CACHE, never in the data folder."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from capsx.data.cache import cache_dir, files_key, load_cached, save_cached
from capsx.data.config import DataConfig, register_dataset
from capsx.data.imageset import DataSplits, ImageSet
from capsx.data.integrity import copies
from capsx.errors import DataError

# What Pillow reads and torchvision's ImageFolder accepts (its IMG_EXTENSIONS).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
THREADED_FROM_BYTES = 64 << 10  # files this large on average are decoded by several threads
SKIP_HINT = "fix or remove it, or set data.skip_bad: true to skip such files"


class BadImage(Exception):
    """A file that cannot be one of the data set's images, and why."""


def read_photo(path: Path, size: int, channels: int, resize: str = "crop", max_pixels: int = 40_000_000,
               ) -> np.ndarray:
    """(channels, size, size) uint8: the picture turned by its EXIF orientation, made grey or RGB, and
    fitted to size x size: `crop` scales the shorter side to `size` and takes the centre, `pad` scales
    the longer side and pads with black, `stretch` scales each side on its own."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:  # the header only: the size is known before any decoding
            if im.width * im.height > max_pixels:
                raise BadImage(f"{im.width}x{im.height} pixels is more than data.max_pixels ({max_pixels:,})")
            mode = "L" if channels == 1 else "RGB"
            im.draft(mode, (size, size))  # JPEG: decode at the smallest scale still >= size (much faster)
            picture = ImageOps.exif_transpose(im).convert(mode)
    except BadImage:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise BadImage(f"not an image Pillow can read ({type(e).__name__})") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
        raise BadImage(f"cannot be decoded ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") \
            from None
    box = (size, size)
    if resize == "crop":
        picture = ImageOps.fit(picture, box, Image.Resampling.BILINEAR)
    elif resize == "pad":
        picture = ImageOps.pad(picture, box, Image.Resampling.BILINEAR, color=0)
    else:
        picture = picture.resize(box, Image.Resampling.BILINEAR)
    pixels = np.array(picture, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on Pillow's)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


@dataclass
class FolderImages:
    """One split read from disk: its images, labels, the files they came from, and the files skipped."""

    images: torch.Tensor
    labels: torch.Tensor
    files: list[str]
    skipped: list[str]


@register_dataset
class ImageFolderConfig(DataConfig):
    """`data: {name: imagefolder, root: FOLDER}`: class folders of images; see the module docstring."""

    name: Literal["imagefolder"] = "imagefolder"
    root: str | None = None  # the folder holding train/ and test/ (or the class folders); relative to the recipe
    size: int = Field(32, ge=4, le=1024)  # images become size x size
    channels: Literal[1, 3] = 3  # 1: grey, 3: RGB
    resize: Literal["crop", "pad", "stretch"] = "crop"
    test_fraction: float | None = Field(None, gt=0, lt=1)  # no test/ folder: this share of each class is test
    split_seed: int = 0  # which images test_fraction takes
    skip_bad: bool = False  # skip files that are not readable images (counted), instead of stopping
    max_pixels: int = Field(40_000_000, ge=1, le=1 << 31)  # larger pictures are refused before decoding
    class_names: list[str] | None = None  # the class folders' names, filled in when training reads them

    needs_root: ClassVar[bool] = True
    user_images: ClassVar[str] = "photo"

    @model_validator(mode="after")
    def _names_are_distinct(self) -> ImageFolderConfig:
        if self.class_names is not None and (len(set(self.class_names)) != len(self.class_names)
                                             or len(self.class_names) < 2):
            raise ValueError("class_names: expected two or more distinct names")
        return self

    @property
    def image_shape(self) -> tuple[int, int, int]:  # type: ignore[override]
        return (self.channels, self.size, self.size)

    @property
    def classes(self) -> list[str]:  # type: ignore[override]
        if self.class_names is not None:
            return self.class_names
        if self.root is not None and Path(self.root).is_dir():
            return class_folders(_train_folder(Path(self.root)))
        where = f"data.root {self.root} is not a folder" if self.root is not None else "no data.root is set"
        raise DataError(f"imagefolder: the class names are the class folders' names, and {where}; point "
                        "data.root at your image folder (training also takes --data-root)")

    def resolved(self, splits: DataSplits) -> ImageFolderConfig:
        """This config with the class names the folder gave (kept in the run's recipe and checkpoints)."""
        if self.class_names is None:
            return self.model_copy(update={"class_names": list(splits.classes)})
        if list(splits.classes) != self.class_names:
            raise DataError(f"imagefolder: the folder's classes {splits.classes} are not the run's "
                            f"{self.class_names}")
        return self

    def load(self, root: Path) -> DataSplits:
        if not root.is_dir():
            raise DataError(f"imagefolder: {root} is not a folder; expected {root}/train/<class>/ and "
                            f"{root}/test/<class>/ holding images (or <class>/ folders and data.test_fraction)")
        train_dir = _train_folder(root)
        classes = class_folders(train_dir)
        if len(classes) < 2:
            raise DataError(f"imagefolder: {train_dir} holds {len(classes)} class folder(s) ({', '.join(classes)}); "
                            "expected one folder of images per class, two or more")
        test_dir = root / "test" if train_dir != root else None
        if test_dir is not None and not test_dir.is_dir():
            if self.test_fraction is None:
                raise DataError(f"imagefolder: {root} has train/ but no test/ folder; add test/<class>/ images or "
                                "set data.test_fraction to hold out a share of train/")
            test_dir = None
        if test_dir is None and self.test_fraction is None:
            raise DataError(f"imagefolder: {root} has no train/ and test/ folders; set data.test_fraction (e.g. "
                            "0.2) to hold out a share of each class folder as the test split")
        if test_dir is not None and self.test_fraction is not None:
            raise DataError(f"imagefolder: {root} has a test/ folder and data.test_fraction is set; remove one")
        train = self._read(train_dir, classes, require_all=True)
        reads = [(train_dir, train)]
        if test_dir is not None:
            unknown = sorted(set(class_folders(test_dir)) - set(classes))
            if unknown:
                raise DataError(f"imagefolder: {test_dir} has class folder(s) {', '.join(unknown)} that "
                                f"{train_dir} has not")
            test = self._read(test_dir, classes, require_all=False)
            reads.append((test_dir, test))
        else:
            train, test = _split(train, self.test_fraction or 0.0, self.split_seed)
        if len(test.labels) == 0:
            raise DataError(f"imagefolder: no test images in {test_dir or train_dir}")
        _check_no_copies(train, test)
        notes = [f"imagefolder: skipped {len(r.skipped)} file(s) that are not readable images under {d} "
                 f"(first: {r.skipped[0]})" for d, r in reads if r.skipped]
        return DataSplits(train=ImageSet(train.images, train.labels), test=ImageSet(test.images, test.labels),
                          classes=classes, notes=notes)

    def _read(self, folder: Path, classes: list[str], require_all: bool) -> FolderImages:
        """Every file under folder/<class>/, decoded (or from the cache while nothing changed)."""
        listed: list[tuple[Path, int]] = []
        for k, name in enumerate(classes):
            files = sorted(files_under(folder / name)) if (folder / name).is_dir() else []
            if not files and require_all:
                raise DataError(f"imagefolder: {folder / name}: an empty class folder; expected images of "
                                f"{name!r} (remove the folder or add images)")
            listed += [(f, k) for f in files]
        settings = json.dumps([self.size, self.channels, self.resize, self.max_pixels, self.skip_bad, classes])
        key = files_key(f"imagefolder {settings}", [f for f, _ in listed])
        path = cache_dir() / "imagefolder" / f"{key}.pt"
        cached = load_cached(path, ("images", "labels", "files", "skipped"))
        if cached is not None:
            return FolderImages(cached["images"], cached["labels"], cached["files"], cached["skipped"])
        read = self._decode(listed)
        save_cached(path, {"images": read.images, "labels": read.labels, "files": read.files,
                           "skipped": read.skipped})
        return read

    def _decode(self, listed: list[tuple[Path, int]]) -> FolderImages:
        def one(item: tuple[Path, int]) -> np.ndarray | str:
            path, _ = item
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                return f"{path}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})"
            try:
                return read_photo(path, self.size, self.channels, self.resize, self.max_pixels)
            except BadImage as e:
                return f"{path}: {e}"

        # Pillow's decoders release the GIL, so threads read large pictures several at once; a small one is
        # mostly Python (0.2 ms for a 32x32 PNG here), which threads only slow down (0.5 ms: measured)
        mean_bytes = sum(f.stat().st_size for f, _ in listed) / max(1, len(listed))
        if mean_bytes < THREADED_FROM_BYTES or (os.cpu_count() or 1) == 1:
            results = [one(item) for item in listed]
        else:
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                results = list(pool.map(one, listed, chunksize=16))
        kept, labels, files, skipped = [], [], [], []
        for (path, k), result in zip(listed, results, strict=True):
            if isinstance(result, str):
                if not self.skip_bad:
                    raise DataError(f"imagefolder: {result}; {SKIP_HINT}")
                skipped.append(str(path))
                continue
            kept.append(result)
            labels.append(k)
            files.append(str(path))
        C, H, W = self.image_shape
        images = torch.from_numpy(np.stack(kept)) if kept else torch.zeros(0, C, H, W, dtype=torch.uint8)
        return FolderImages(images, torch.tensor(labels, dtype=torch.long), files, skipped)


def _train_folder(root: Path) -> Path:
    return root / "train" if (root / "train").is_dir() else root


def class_folders(folder: Path) -> list[str]:
    """The class folders' names, sorted as torchvision's ImageFolder sorts them (hidden ones left out)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def files_under(folder: Path) -> Iterable[Path]:
    """Every file below `folder` (nested folders too, as ImageFolder reads them), hidden ones left out."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name


def _split(read: FolderImages, fraction: float, seed: int) -> tuple[FolderImages, FolderImages]:
    """A seeded `fraction` of each class (at least one image of a class with two or more) as test."""
    g = torch.Generator().manual_seed(seed)
    test_idx = []
    for k in read.labels.unique().tolist():
        members = (read.labels == k).nonzero().flatten()
        n = min(len(members) - 1, max(1, round(fraction * len(members)))) if len(members) > 1 else 0
        test_idx.append(members[torch.randperm(len(members), generator=g)[:n]])
    is_test = torch.zeros(len(read.labels), dtype=torch.bool)
    if test_idx:
        is_test[torch.cat(test_idx)] = True

    def part(mask: torch.Tensor) -> FolderImages:
        idx = mask.nonzero().flatten()
        return FolderImages(read.images[idx], read.labels[idx], [read.files[i] for i in idx.tolist()], [])

    return part(~is_test), part(is_test)


def _check_no_copies(train: FolderImages, test: FolderImages) -> None:
    """A test image that is a pixel copy of a train image (after reading) makes the test error a memory test."""
    found = copies(train.images, test.images)
    if found:
        pairs = "; ".join(f"{test.files[j]} = {train.files[i]}" for j, i in found[:3]) + (
            f"; and {len(found) - 3} more" if len(found) > 3 else "")
        raise DataError(f"imagefolder: {len(found)} test image(s) are pixel copies of train images ({pairs}); "
                        "expected disjoint splits")

