"""The pictures a training logs as it goes: after every `tracking.pictures_every`-th epoch's evaluation,
at step = the epoch, under the keys the picture commands use, for the same test inputs every epoch (so
the MLflow UI's slider shows the model changing, not the input), and once at step 0, before the first
epoch: the untrained model, which is also what MLflow's image cards open on (they show step 0 until the
slider is moved). They are the picture commands' own drawings, made from the model in memory: the first
conv layer's filters and activations (a CapsNet's primary-capsule lengths too); for a CapsNet with a
decoder the reconstructions with the epoch's mistakes (Fig. 3, or Fig. 5 for two digits), one Fig. 4
grid and the routing couplings; for a CNN a saliency map."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from capsx.data.imageset import Examples
from capsx.jobs.context import silent
from capsx.jobs.perturb import run_perturb
from capsx.jobs.pictures import Gallery
from capsx.jobs.reconstruct import run_reconstruct
from capsx.jobs.trained import TrainedRun
from capsx.jobs.visualize import Job, first_layer_jobs, run_routing, run_saliency
from capsx.models.capsnet import CapsNet
from capsx.models.capsule_classifier import CapsuleClassifier
from capsx.recipe import Recipe
from capsx.track.tracker import NullTracker, Tracker
from capsx.train.checkpoint import Checkpoint
from capsx.train.device import eval_mode
from capsx.train.loop import Run
from capsx.train.state import TrainState

PAIR_ERROR_IMAGES = 100  # two-digit runs: the pairs an epoch's reconstruction error is taken over


def epoch_pictures(recipe: Recipe, run: Run, tracker: Tracker | NullTracker, test: Examples,
                   tracking_uri: str | None) -> Callable[[nn.Module, TrainState], None] | None:
    """The training's `after_epoch`: draws and logs the epoch's pictures; None when there is nothing to
    log them to or `tracking.pictures_every` is 0."""
    every = recipe.tracking.pictures_every
    if every == 0 or not tracker.active:
        return None

    def draw(model: nn.Module, state: TrainState) -> None:
        if state.epoch % every:
            return
        trained = TrainedRun(recipe, model, Checkpoint(recipe.to_dict(), {}, state, tracker.run_id), run.device,
                             run.data_root, run.run_dir, tracking_uri, preloaded_test=test)
        gallery = Gallery(trained, Path(run.run_dir) / "pictures", tracker, silent, state.epoch)
        start = time.perf_counter()
        # a saliency map needs gradients; the training's random streams stay as they were
        with eval_mode(model, inference=False), torch.random.fork_rng(devices=_accelerators(run.device)):
            for job in jobs_for(model, recipe.data.objects, trained=state.epoch > 0):
                job(trained, gallery)
        tracker.log_metrics({"time/pictures_s": time.perf_counter() - start}, step=state.epoch)  # their cost

    return draw


def _accelerators(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def jobs_for(model: nn.Module, objects: int, trained: bool = True) -> list[Job]:
    """What a model's epoch pictures are, as picture-command calls. Untrained (step 0), a one-object
    reconstruction is drawn without its error and strip of mistakes (there is no evaluation to take them
    from, and a fresh pass would cost more than all the other pictures)."""
    jobs = first_layer_jobs()
    if not isinstance(model, CapsuleClassifier):
        return [*jobs, _saliency_of_the_label]
    if model.decoder is not None:
        error_images = PAIR_ERROR_IMAGES if objects > 1 else None if trained else 0
        jobs.append(lambda t, out: run_reconstruct(t, out, count=10, misclassified=10, force_class=None, image=None,
                                                   error_images=error_images))
        if objects == 1:
            jobs.append(lambda t, out: run_perturb(t, out, dims=None, value_range=(-0.25, 0.25), steps=11, cls=None,
                                                   samples=1, image=None, class_mean=False))
    if isinstance(model, CapsNet):  # the couplings over its primary-capsule grid
        jobs.append(lambda t, out: run_routing(t, out, index=0, image=None))
    return jobs


def _saliency_of_the_label(t: TrainedRun, out: Gallery) -> None:
    """What drives the first test image's own class (not the prediction, which changes): one key throughout."""
    label = t.test_set(1).labels[0]
    cls = int(label) if label.dim() == 0 else None
    run_saliency(t, out, index=0, image=None, cls=cls, method="integrated-gradients", layer=None, steps=32)

