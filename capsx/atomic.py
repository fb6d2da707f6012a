"""Files written whole or not at all: a temporary file beside the target, then renamed over it.

A reader (a later command, a resume, the MLflow UI) never sees half a file, whatever stops the
writer (SIGKILL, a full disk, a file-size limit): until the new file is complete the old one stays.
A failed write removes its temporary file; one a killed process left is removed by the next write
of the same file (its name carries the writer's process id). What capsx writes for a later read goes
through here: checkpoints, run.json, recipe.yaml, pictures, the caches, the tracking buffer's
images and rewrites.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: a temporary file is private (0600); the result gets the usual mode


@contextlib.contextmanager
def replacing(path: Path, mode: str = "wb", *, durable: bool = False) -> Iterator[IO[Any]]:
    """A file object whose contents replace `path` when the block ends without an error.
    `durable`: flushed to the disk before the rename (checkpoints: a power cut keeps old or new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> Path:
    with replacing(path, "w") as f:
        f.write(text)
    return path


def _remove_orphans(path: Path) -> None:
    """Temporary files of `path` whose writer is gone (killed mid-write): a checkpoint's is as big as it."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
