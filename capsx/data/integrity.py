"""Train and test splits must not share an image: a test image seen in training makes
the test error a memory test. Checked by content hash once per set of files, the
verdict cached (keyed by the files' paths, sizes and modification times) so a run
pays for it only the first time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

import numpy as np
from torch import Tensor

from capsx.atomic import write_text
from capsx.data.cache import cache_dir, files_key
from capsx.data.files import canonical_root
from capsx.errors import DataError

CACHE_FILE = "split_check.json"


def image_hashes(images: Tensor) -> list[bytes]:
    """One 16-byte BLAKE2 digest per image of a (N, ...) uint8 tensor."""
    rows = np.ascontiguousarray(images.reshape(len(images), -1).cpu().numpy())
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]


def copies(train: Tensor, test: Tensor) -> list[tuple[int, int]]:
    """(test index, train index) of each test image with a pixel-for-pixel copy in the train split."""
    seen = {h: i for i, h in enumerate(image_hashes(train))}
    return [(j, seen[h]) for j, h in enumerate(image_hashes(test)) if h in seen]


def shared_images(train: Tensor, test: Tensor) -> int:
    """How many test images have a pixel-for-pixel copy in the train split."""
    return len(copies(train, test))


def check_disjoint(name: str, files: list[Path], train: Tensor, test: Tensor) -> None:
    """Raise `DataError` if the splits share images; the verdict is cached per `files` (the key and the
    entry name the same canonical paths, however the data root was spelled)."""
    files = [canonical_root(f) for f in files]
    key = files_key(name, files)
    path = cache_dir() / CACHE_FILE
    cache = _read(path)
    entry = cache.get(key)
    if entry is None:
        started = time.perf_counter()
        overlap = shared_images(train, test)
        entry = {"data": name, "files": [str(f) for f in files], "shared": overlap,
                 "train": len(train), "test": len(test), "seconds": round(time.perf_counter() - started, 3)}
        cache[key] = entry
        _write(path, cache)
    if entry["shared"]:
        where = files[0].parent if files else name
        raise DataError(f"{name} in {where}: {entry['shared']} of {entry['test']} test image(s) also appear in "
                        f"the train split (identical pixels); expected disjoint splits")


def _read(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, cache: dict[str, dict]) -> None:
    """Atomic; a cache that cannot be written only means the check runs again next time."""
    with contextlib.suppress(OSError):
        write_text(path, json.dumps(cache, indent=1))
