"""Where a picture command's images go (`Gallery`: PNGs in the run's pictures/ folder, the same images to
its MLflow run under stable keys), and the inputs it draws (test images, or the user's own)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from capsx.errors import CapsxError
from capsx.jobs.context import Context
from capsx.jobs.trained import TrainedRun
from capsx.pictures import canvas
from capsx.track.process import TrackerProcess
from capsx.track.tracker import NullTracker, Tracker


class Gallery:
    """A run's pictures: saved under its directory and logged to its run at one step (unless tracking is
    off for it). Use it as a context manager: leaving it waits until every image is in the store."""

    def __init__(self, run: TrainedRun, directory: Path, tracker: Tracker | TrackerProcess | NullTracker,
                 say: Callable[..., None], step: int) -> None:
        self.run, self.dir, self.tracker, self.say, self.step = run, directory, tracker, say, step
        self.written: list[Path] = []
        self.published: dict[str, canvas.Picture] = {}  # name -> the picture saved under it, as drawn
        self._reported, self._closed = 0, False

    @classmethod
    def open(cls, run: TrainedRun, ctx: Context, background: TrackerProcess | None = None) -> Gallery:
        """A picture command's: pictures/ of the run directory (else <runs>/_pictures/<run>/), logged at the
        checkpoint's epoch, so an after-the-fact picture lands where the training's own are on the slider.
        `background`: a `TrackerProcess` started before torch was imported, to log through (MLflow's
        start-up ran on another core meanwhile); closed at once if there is nothing to log."""
        directory = (run.run_dir / "pictures" if run.run_dir is not None
                     else ctx.runs_dir / "_pictures" / (run.run_id or run.path.stem))
        tracker: Tracker | TrackerProcess | NullTracker = NullTracker(run.run_id or "")
        if ctx.track and run.run_id and run.tracking_uri:
            tracker = (background.attach(run.tracking_uri, run.run_id) if background is not None
                       else Tracker.attach(run.tracking_uri, run.run_id))
        else:
            if background is not None:
                background.close()  # nothing to log: the process ends at once
            if ctx.track and run.tracking_uri is None:
                ctx.say(f"[yellow]run {run.label} was trained with tracking off (--no-track): its pictures go to "
                        f"{directory} only[/]", soft_wrap=True)
        return cls(run, directory, tracker, ctx.say, run.epoch)

    def publish(self, image: np.ndarray | canvas.Picture, name: str, key: str) -> Path:
        """Save `image` as pictures/NAME and log it under `key` at the gallery's step (the MLflow UI pages
        through a key's steps). The picture, with where its texts went, stays in `published`."""
        picture = canvas.as_picture(image)
        pixels = picture.pixels if isinstance(image, canvas.Picture) else image
        self.published[name] = picture
        path = canvas.save_png(pixels, self.dir / name)
        self.written.append(path)
        self.tracker.log_image(pixels, key=key, step=self.step)
        return path

    def publish_file(self, image: np.ndarray, name: str, artifact_path: str) -> Path:
        """Save `image` as pictures/NAME and log the file as an artifact under `artifact_path`."""
        path = canvas.save_png(image, self.dir / name)
        self.written.append(path)
        self.tracker.log_artifact(path, artifact_path)
        return path

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Numbers a picture command measured, at the gallery's step."""
        self.tracker.log_metrics(metrics, step=self.step)

    def report(self) -> None:
        """Say what was written since the last report."""
        for path in self.written[self._reported:]:
            self.say(f"  wrote {path}", soft_wrap=True)
        self._reported = len(self.written)

    def close(self) -> None:
        """Wait for the tracking process (if any) to have applied every call (its error is raised here),
        then say how many images went to the run. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if isinstance(self.tracker, TrackerProcess):
            self.tracker.close()
        if self.tracker.active and self.written:
            self.say(f"  logged {len(self.written)} image(s) to run {self.run.run_id}", soft_wrap=True)

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(CapsxError):  # the command's own error is the one to show
            self.close()


def holding(labels: Tensor, cls: int) -> Tensor:
    """(N,) bool: the images labelled `cls` (for labels (N, k): among their labels)."""
    return labels == cls if labels.dim() == 1 else (labels == cls).any(dim=1)


def choose_inputs(t: TrainedRun, image: list[Path] | None, cls: int | None, samples: int | None,
                  default_per_class: bool) -> tuple[Tensor, Tensor | None, list[str]]:
    """Inputs to show: the user's images, or test images (of one class, the first N, or one per class).
    Returns (images, labels or None, names)."""
    if image:
        xs = torch.cat([t.user_image(p) for p in image])
        return xs, None, [p.name for p in image]
    n_classes = len(t.classes)
    if cls is not None and not 0 <= cls < n_classes:
        raise CapsxError(f"--class {cls}: out of range; this model has {n_classes} classes (0..{n_classes - 1})")
    test = t.test_set()
    if cls is not None:
        idx = holding(test.labels, cls).nonzero().flatten()[: samples or 1]
    elif samples is not None:
        idx = torch.arange(min(samples, len(test)))
    elif default_per_class:
        idx = torch.stack([holding(test.labels, k).nonzero().flatten()[0] for k in range(n_classes)
                           if holding(test.labels, k).any()])
    else:
        idx = torch.arange(1)
    return t.inputs(test.images[idx]), test.labels[idx], [f"test #{i}" for i in idx.tolist()]


def one_input(t: TrainedRun, index: int, image: Path | None) -> tuple[Tensor, str, int | None]:
    """One input: the user's image, or test image `index`. Returns (image (1, C, H, W), name, label)."""
    if image is not None:
        return t.user_image(image), image.name, None
    test = t.test_set()
    if not 0 <= index < len(test):
        raise CapsxError(f"--index {index}: out of range; the test split has {len(test)} images")
    label = int(test.labels[index]) if test.labels.dim() == 1 else None  # a pair has no single label
    return t.inputs(test.images[index:index + 1]), f"test #{index}", label
