"""Checkpoints: plain dicts of tensors and Python values, written atomically and
read with `torch.load(weights_only=True)`, so a file can never run code."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from capsx.errors import RunError

FORMAT = "capsx.checkpoint"
VERSION = 1


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    """Write to a temp file beside `path`, then rename: a kill mid-write leaves the old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_weights_file(path: Path, what: str = "checkpoint") -> Any:
    """Whatever `torch.save` wrote to `path`, loaded on the CPU with `weights_only=True`: tensors and
    plain containers only; a file holding pickled objects (code) is refused."""
    if not path.is_file():
        raise RunError(f"{path}: {what} not found")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not ours
        raise RunError(f"{path}: not a readable {what} (expected a file written by torch.save)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise RunError(f"{path}: refused to load: it holds pickled objects, not only tensors and plain values "
                       f"({first[:160]})") from None
    except Exception as e:  # truncated zip, not a torch file at all, ...
        raise RunError(f"{path}: not a readable {what} ({type(e).__name__}: {str(e)[:160]})") from None


def is_checkpoint(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a capsx checkpoint on the CPU; refuse anything that is not one."""
    payload = read_weights_file(path)
    if not is_checkpoint(payload):
        raise RunError(f"{path}: not a capsx checkpoint (expected a dict with format={FORMAT!r})")
    if payload.get("version") != VERSION:
        raise RunError(f"{path}: checkpoint version {payload.get('version')!r}; this capsx reads {VERSION}")
    return payload
