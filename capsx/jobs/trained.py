"""A trained run, opened once for every command that reads one (eval, ensemble, sweep, the pictures):
its checkpoint resolved and read, its model rebuilt on the device, and where its data and MLflow run are."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from capsx.data import ImageSet
from capsx.data.imageset import Examples, unit_float
from capsx.data.user_image import prepare_user_image
from capsx.errors import CapsxError
from capsx.jobs.context import Context
from capsx.recipe import Recipe
from capsx.track.runs import resolve_checkpoint, run_tracking_uri
from capsx.track.tracker import Tracker
from capsx.train.checkpoint import Checkpoint
from capsx.train.device import resolve_device
from capsx.train.loop import load_model

GENERATED_LIMIT = 10_000  # a generated test set can hold millions; pictures and sweeps look at its start


@dataclass
class TrainedRun:
    """What a run was trained as, its model (eval mode, on `device`), and where it lives and logs."""

    recipe: Recipe
    model: nn.Module
    checkpoint: Checkpoint
    device: torch.device
    data_root: Path
    run_dir: Path | None  # None: a checkpoint file outside any run directory
    tracking_uri: str | None  # the store its MLflow run is in; None: trained with tracking off
    preloaded_test: Examples | None = None  # its test split, when the caller holds it already (a training)

    @property
    def path(self) -> Path:
        assert self.checkpoint.path is not None
        return self.checkpoint.path

    @property
    def run_id(self) -> str | None:
        return self.checkpoint.run_id

    @property
    def label(self) -> str:
        """How tables and messages name it: its run id, else its checkpoint file."""
        return str(self.run_id or self.path)

    @property
    def epoch(self) -> int:
        return self.checkpoint.epoch

    @property
    def classes(self) -> list[str]:
        return self.recipe.data.classes

    @property
    def objects(self) -> int:
        return self.recipe.data.objects

    def test_set(self, limit: int | None = None) -> ImageSet:
        """The first `limit` test examples (by default all, or the first GENERATED_LIMIT of a generated set)."""
        test = self.preloaded_test if self.preloaded_test is not None else self.recipe.data.load_test_split(
            self.data_root)
        if limit is None:
            limit = len(test) if isinstance(test, ImageSet) else GENERATED_LIMIT
        return test.head(limit)

    def inputs(self, images: Tensor) -> Tensor:
        """Images as the model takes them: on its device, uint8 scaled to [0, 1]."""
        return unit_float(images.to(self.device))

    def user_image(self, path: Path) -> Tensor:
        return self.inputs(prepare_user_image(self.recipe.data, path))

    def tracker(self) -> Tracker | None:
        """Its MLflow run, opened in this process; None when it was trained with tracking off."""
        return Tracker.attach(self.tracking_uri, self.run_id) if self.tracking_uri and self.run_id else None


def open_run(ref: str, ctx: Context) -> TrainedRun:
    """A run id, 'latest', a run directory or a checkpoint file -> the run, ready to evaluate or draw."""
    path = resolve_checkpoint(ref, ctx.runs_dir, ctx.tracking_uri, which="best")
    ckpt = Checkpoint.read(path)
    device = resolve_device(ctx.device)
    recipe, model = load_model(ckpt, device)
    model.eval()
    run_dir = path.parent.parent if (path.parent.parent / "run.json").is_file() else None
    return TrainedRun(recipe, model, ckpt, device, ctx.data_root_for(recipe.data), run_dir,
                      run_tracking_uri(path, ctx.tracking_uri, ctx.runs_dir))


def run_or_checkpoint(run: str | None, checkpoint: Path | None) -> str:
    """The picture commands' --run / --checkpoint as one reference (default: latest)."""
    if run is not None and checkpoint is not None:
        raise CapsxError("give --run or --checkpoint, not both")
    return str(checkpoint) if checkpoint is not None else (run or "latest")
