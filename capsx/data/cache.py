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


def load_cached(path: Path, keys: tuple[str, ...]) -> dict | None:
    """A cache file's payload (tensors, lists, strings) holding `keys`, or None on a miss: absent, or
    truncated or foreign, which is then removed so that the next write replaces it."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001
        payload = None
    if not isinstance(payload, dict) or not all(k in payload for k in keys):
        path.unlink(missing_ok=True)
        return None
    return payload


def save_cached(path: Path, payload: dict) -> None:
    """Atomic; a cache that cannot be written only means the files are read again next time."""
    try:
        with replacing(path) as f:
            torch.save(payload, f)
    except OSError:
        pass


def store_split(name: str, files: list[Path], split: ImageSet) -> None:
    """Keep `split` (read from `files`) for the next `cached_split`."""
    try:
        path = split_path(name, files)
    except OSError:  # a file gone since it was read
        return
    if not path.is_file():
        save_cached(path, {"images": split.images.cpu(), "labels": split.labels.cpu()})


def cached_split(name: str, files: list[Path], read: Callable[[], ImageSet]) -> ImageSet:
    """The split `read()` gives for `files`, from the cache while the files are unchanged."""
    if not all(f.is_file() for f in files):  # missing (a download to come, or an error `read` will name)
        return read()
    payload = load_cached(split_path(name, files), ("images", "labels"))
    if payload is not None:
        return ImageSet(payload["images"], payload["labels"])
    split = read()
    store_split(name, files, split)
    return split
