"""What every on-disk data set says when its files are missing or unreadable: one line
naming the files, the folder, and how to get them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from capsx.errors import DataError

DOWNLOAD_FLAG = "add --set data.download=true to fetch it"


def canonical_root(root: str | Path) -> Path:
    """One spelling per folder: `~` expanded, made absolute, symbolic links followed. The data root is
    put through this once, where it is chosen and where a data set is loaded, so every path derived from
    it (the split check's cache key and entry, the readers, the error messages) is the same whether the
    folder was reached through a symlink, a relative path or `~`."""
    return Path(root).expanduser().resolve()


def require_files(title: str, folder: Path, names: list[str], holder: str, how_to_get: str = DOWNLOAD_FLAG) -> None:
    """Raise one DataError naming the missing `names` in `folder`; `holder` is the folder the data root
    must contain (e.g. "MNIST/"), `how_to_get` the other way to get the files."""
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{title} not found: expected {', '.join(missing)} in {folder} "
                        f"(point CAPSX_DATA or --data-root at the folder holding {holder}, or {how_to_get})")


@contextmanager
def reading(title: str, folder: Path) -> Iterator[None]:
    """Turn whatever a reader raises on a truncated or malformed file into one DataError line."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:  # readers raise RuntimeError, ValueError, EOFError, UnpicklingError, KeyError...
        raise DataError(f"{title} files in {folder} could not be read: {type(e).__name__}: {e}") from None
