"""What the class capsules hold, as decoder pictures: the paper's Fig. 3
(reconstructions) and Fig. 4 (one dimension perturbed at a time)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from capsx.errors import CapsxError
from capsx.models.capsule_classifier import CapsuleClassifier


def require_decoder(model: nn.Module, what: str) -> CapsuleClassifier:
    """The model as a capsule model with a decoder, or a usage error saying why not."""
    if not isinstance(model, CapsuleClassifier):
        raise CapsxError(f"{what} needs a capsule model; this run's model is {type(model).__name__}, "
                         "which has no class capsules")
    if model.decoder is None:
        raise CapsxError(f"{what} needs a decoder; this run was trained with model.decoder=false")
    return model


MAX_STEPS = 101  # columns of a perturbation grid: a picture's width, and memory, grow with them


def perturbation_values(start: float, stop: float, steps: int) -> Tensor:
    """The paper's columns: -0.25 .. 0.25 in steps of 0.05 is (start, stop, steps) = (-0.25, 0.25, 11)."""
    if not 2 <= steps <= MAX_STEPS:
        raise CapsxError(f"--steps: expected 2 to {MAX_STEPS} columns (the paper's: 11), got {steps}")
    if not start < stop:
        raise CapsxError(f"--range: expected START < STOP, got {start}:{stop}")
    return torch.linspace(start, stop, steps)


@torch.no_grad()
def perturb_capsule(model: CapsuleClassifier, capsule: Tensor, cls: int, dims: list[int], deltas: Tensor) -> Tensor:
    """Decode `capsule` (D,) of class `cls` with dimension d shifted by each delta, for each d in dims.

    Returns (len(dims), len(deltas), C, H, W): row = dimension, column = delta.
    """
    D = capsule.shape[-1]
    bad = [d for d in dims if not 0 <= d < D]
    if bad:
        raise CapsxError(f"--dim {bad[0]}: out of range; this model's class capsules have {D} dimensions "
                         f"(0..{D - 1})")
    rows, cols = len(dims), len(deltas)
    v = capsule.expand(rows, cols, D).clone()  # (rows, cols, D)
    for r, d in enumerate(dims):
        v[r, :, d] += deltas.to(v)
    caps = torch.zeros(rows * cols, model.num_classes, D, dtype=v.dtype, device=v.device)
    caps[:, cls] = v.view(-1, D)  # the other class capsules stay masked (zero), as in training
    classes = torch.full((rows * cols,), cls, dtype=torch.long, device=v.device)
    return model.reconstruct(caps, classes).view(rows, cols, *model.input_shape)


@torch.no_grad()
def class_capsules(model: CapsuleClassifier, images: Tensor, batch: int = 500) -> tuple[Tensor, Tensor]:
    """Class capsules (N, K, D) and predictions (N,) of many images, in batches."""
    caps, preds = [], []
    for i in range(0, len(images), batch):
        out = model(images[i:i + batch])
        caps.append(out.capsules)
        preds.append(out.prediction)
    return torch.cat(caps), torch.cat(preds)


def class_mean_capsule(capsules: Tensor, predictions: Tensor, labels: Tensor, cls: int) -> Tensor:
    """The mean winning capsule of class `cls` over the images it classifies correctly."""
    sel = (labels == cls) & (predictions == cls)
    if not sel.any():
        raise CapsxError(f"--class {cls}: no test image of this class is classified correctly; no mean to take")
    return capsules[sel, cls].mean(dim=0)


@torch.no_grad()
def reconstruct_as(model: CapsuleClassifier, images: Tensor,
                   classes: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Reconstructions of `images` from the capsule of `classes` (default: the prediction).

    Returns (reconstructions, predictions, per-image sum of squared errors).
    """
    out = model(images)
    which = out.prediction if classes is None else classes
    recon = model.reconstruct(out.capsules, which)
    sse = (recon - images).pow(2).flatten(1).sum(dim=1)
    return recon, out.prediction, sse
