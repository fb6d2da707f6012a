"""Losses: the paper's margin loss (+ scaled reconstruction loss), cross-entropy,
binary cross-entropy on sigmoid outputs for several labels per image, and the spread loss of matrix
capsules (its margin grows over the training: `progress`, the fraction of the run's steps done).

A criterion maps (model output, reconstruction targets, labels) to `LossTerms`:
the total to back-propagate (a batch mean) and its named parts, per sample, for
logging. Labels are (B,), or (B, k) for k objects per image (MultiMNIST), and
the reconstruction targets are the input itself, or (B, k, C, H, W) each object
alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from capsx.errors import CapsxError
from capsx.models.output import ModelOutput
from capsx.schema import Section


@dataclass
class LossTerms:
    total: Tensor  # () the batch mean that is back-propagated
    parts: dict[str, Tensor]  # name -> (B,) per-sample values, for logging


def margin_loss(lengths: Tensor, targets: Tensor, m_plus: float = 0.9, m_minus: float = 0.1,
                down_weight: float = 0.5) -> Tensor:
    """Eq. 4, summed over classes: T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2.

    lengths, targets: (B, K), targets 0/1 (several ones for multi-label inputs). Returns (B,).
    """
    present = targets * F.relu(m_plus - lengths).pow(2)
    absent = down_weight * (1.0 - targets) * F.relu(lengths - m_minus).pow(2)
    return (present + absent).sum(dim=1)


def reconstruction_loss(reconstruction: Tensor, images: Tensor) -> Tensor:
    """Sum of squared pixel differences per image, (B,); for (B, k, C, H, W) the sum over the k objects."""
    return (reconstruction - images).pow(2).flatten(1).sum(dim=1)


def class_targets(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """(B, K) 0/1 targets: one-hot for labels (B,), k-hot for labels (B, k)."""
    hot = F.one_hot(labels, num_classes)
    return (hot if labels.dim() == 1 else hot.amax(dim=1)).to(dtype)


class MarginLossConfig(Section):
    """`loss: {name: margin}`: the paper's loss for CapsNets."""

    name: Literal["margin"] = "margin"
    m_plus: float = Field(0.9, gt=0, le=1)
    m_minus: float = Field(0.1, ge=0, lt=1)
    down_weight: float = Field(0.5, ge=0)  # the paper's lambda for absent classes
    recon_weight: float = Field(0.0005, ge=0)  # scales the reconstruction loss so it does not dominate

    def __call__(self, out: ModelOutput, targets: Tensor, labels: Tensor, progress: float = 1.0) -> LossTerms:
        present = class_targets(labels, out.scores.shape[1], out.scores.dtype)
        margin = margin_loss(out.scores, present, self.m_plus, self.m_minus, self.down_weight)
        parts = {"margin_loss": margin}
        total = margin
        if out.reconstruction is not None and self.recon_weight > 0:
            recon = reconstruction_loss(out.reconstruction.float(), targets.float())
            parts["recon_loss"] = recon
            total = margin + self.recon_weight * recon
        return LossTerms(total=total.mean(), parts=parts)


class CrossEntropyConfig(Section):
    """`loss: {name: cross_entropy}`: softmax + cross-entropy on the class scores."""

    name: Literal["cross_entropy"] = "cross_entropy"
    label_smoothing: float = Field(0.0, ge=0, lt=1)

    def __call__(self, out: ModelOutput, targets: Tensor, labels: Tensor, progress: float = 1.0) -> LossTerms:
        ce = F.cross_entropy(out.scores.float(), labels, reduction="none", label_smoothing=self.label_smoothing)
        return LossTerms(total=ce.mean(), parts={"ce_loss": ce})


class BinaryCrossEntropyConfig(Section):
    """`loss: {name: binary_cross_entropy}`: an independent sigmoid per class, BCE against the
    k-hot targets, summed over classes: a CNN's loss when an image holds several labels."""

    name: Literal["binary_cross_entropy"] = "binary_cross_entropy"

    def __call__(self, out: ModelOutput, targets: Tensor, labels: Tensor, progress: float = 1.0) -> LossTerms:
        present = class_targets(labels, out.scores.shape[1], torch.float32)
        bce = F.binary_cross_entropy_with_logits(out.scores.float(), present, reduction="none").sum(dim=1)
        return LossTerms(total=bce.mean(), parts={"bce_loss": bce})


def spread_loss(scores: Tensor, labels: Tensor, margin: float) -> Tensor:
    """Matrix capsules' Eq. 3: sum over the wrong classes i of max(0, m - (a_t - a_i))^2, (B,)."""
    a_t = scores.gather(1, labels.unsqueeze(1))  # (B, 1)
    gap = F.relu(margin - (a_t - scores)) ** 2  # (B, K)
    return gap.scatter(1, labels.unsqueeze(1), 0.0).sum(dim=1)  # without the true class's own term


class SpreadLossConfig(Section):
    """`loss: {name: spread}`: matrix capsules' loss on the class activations; the margin rises linearly
    from `margin_start` to `margin_end` over the training (paper: 0.2 to 0.9); evaluation uses `margin_end`."""

    name: Literal["spread"] = "spread"
    margin_start: float = Field(0.2, ge=0, le=1)
    margin_end: float = Field(0.9, ge=0, le=1)

    def margin(self, progress: float) -> float:
        return self.margin_start + (self.margin_end - self.margin_start) * min(max(progress, 0.0), 1.0)

    def __call__(self, out: ModelOutput, targets: Tensor, labels: Tensor, progress: float = 1.0) -> LossTerms:
        if labels.dim() != 1:
            raise CapsxError("loss.name: spread takes one label per image; this data set has several")
        spread = spread_loss(out.scores.float(), labels, self.margin(progress))
        return LossTerms(total=spread.mean(), parts={"spread_loss": spread})


LossConfig = Annotated[MarginLossConfig | CrossEntropyConfig | BinaryCrossEntropyConfig | SpreadLossConfig,
                       Field(discriminator="name")]

__all__ = ["BinaryCrossEntropyConfig", "CrossEntropyConfig", "LossConfig", "LossTerms", "MarginLossConfig",
           "SpreadLossConfig", "class_targets", "margin_loss", "reconstruction_loss", "spread_loss"]
