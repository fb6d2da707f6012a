"""What capsx keeps between runs about data on disk, never in the data folder (which may be shared
and read-only): the split check's verdicts, and test splits as torchvision decoded them.

Every entry is keyed by its files' canonical paths, sizes and modification times, so a replaced,
rewritten or moved file is a new key and is read again. A cached test split lets a picture command
show a few test images without reading the train split or importing torchvision (1.4 s of a
command's start); it is written whenever the split is read.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from capsx.atomic import replacing
from capsx.data.imageset import ImageSet


def cache_dir() -> Path:
    """$CAPSX_CACHE, else $XDG_CACHE_HOME/capsx, else ~/.cache/capsx."""
    explicit = os.environ.get("CAPSX_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "capsx"


def files_key(name: str, files: list[Path]) -> str:
    """Changes when any file is replaced, rewritten or moved; `files` are canonical paths."""
    parts = [name]
    for f in files:
        st = f.stat()
        parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def split_path(name: str, files: list[Path]) -> Path:
    return cache_dir() / "splits" / f"{files_key(name, files)}.pt"


def store_split(name: str, files: list[Path], split: ImageSet) -> None:
    """Keep `split` (read from `files`) for the next `cached_split`; atomic, and a cache that cannot
    be written only means the files are read again next time."""
    try:
        path = split_path(name, files)
        if path.is_file():
            return
        with replacing(path) as f:
            torch.save({"images": split.images.cpu(), "labels": split.labels.cpu()}, f)
    except OSError:
        pass


def cached_split(name: str, files: list[Path], read: Callable[[], ImageSet]) -> ImageSet:
    """The split `read()` gives for `files`, from the cache while the files are unchanged."""
    if not all(f.is_file() for f in files):  # missing (a download to come, or an error `read` will name)
        return read()
    path = split_path(name, files)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return ImageSet(payload["images"], payload["labels"])
    except FileNotFoundError:
        pass
    except Exception:  # a truncated or foreign cache file is a miss, then replaced  # noqa: BLE001
        path.unlink(missing_ok=True)
    split = read()
    store_split(name, files, split)
    return split
