"""Checkpoints: on disk, plain dicts of tensors and Python values, written atomically and read with
`torch.load(weights_only=True)`, so a file can never run code; in the code, a typed `Checkpoint`."""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from capsx.atomic import replacing
from capsx.errors import RunError
from capsx.train.state import TrainState

FORMAT = "capsx.checkpoint"
VERSION = 1


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    """Write to a temp file beside `path`, then rename: a kill mid-write leaves the old file intact.
    A write that fails (a full disk, a file-size limit) is a RunError saying so; the old file stays."""
    try:
        with replacing(path, durable=True) as f:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as a RuntimeError
        kept = f"the previous {path.name} is kept" if path.is_file() else f"no {path.name} was written"
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0][:160]
        raise RunError(f"{path}: could not write the checkpoint ({reason}); {kept}; free some disk space "
                       "and --resume") from None
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


@dataclass
class Checkpoint:
    """One checkpoint: the recipe a run was trained as, its weights and loop state; a resumable one
    (last.pt) also the optimizer, gradient scaler and RNG states."""

    recipe: dict[str, Any]  # as trained; validated when the model is rebuilt (`loop.load_model`)
    model: dict[str, Tensor]
    state: TrainState = field(default_factory=TrainState)
    run_id: str | None = None  # its MLflow run (a local id when trained with tracking off)
    optimizer: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None  # this process's RNG states
    rng_ranks: list[dict[str, Any]] | None = None  # every process's, for a data-parallel run
    path: Path | None = None  # where it was read from

    @property
    def epoch(self) -> int:
        """Epochs completed when it was written."""
        return self.state.epoch

    @property
    def resumable(self) -> bool:
        return self.optimizer is not None and self.scaler is not None and self.rng is not None

    @classmethod
    def read(cls, path: Path) -> Checkpoint:
        payload = load_checkpoint(path)
        for key in ("recipe", "model"):
            if not isinstance(payload.get(key), dict):
                raise RunError(f"{path}: a capsx checkpoint without its {key!r} (the file is damaged)")
        try:
            state = TrainState.from_dict(payload["state"]) if payload.get("state") else TrainState()
        except (TypeError, AttributeError) as e:
            raise RunError(f"{path}: its training state is not one capsx writes ({e})") from None
        return cls(payload["recipe"], payload["model"], state,
                   payload.get("run_id"), payload.get("optimizer"), payload.get("scaler"), payload.get("rng"),
                   payload.get("rng_ranks"), path)

    def write(self, path: Path) -> Path:
        payload: dict[str, Any] = {"recipe": self.recipe, "run_id": self.run_id, "model": self.model,
                                   "state": self.state.to_dict()}
        payload.update({k: v for k, v in (("optimizer", self.optimizer), ("scaler", self.scaler),
                                          ("rng", self.rng), ("rng_ranks", self.rng_ranks)) if v is not None})
        return save_checkpoint(path, payload)
