"""Losses: the paper's margin loss (+ scaled reconstruction loss) and cross-entropy.

A criterion maps (model output, images, labels) to `LossTerms`: the total to
back-propagate (a batch mean) and its named parts, per sample, for logging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

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
    """Sum of squared pixel differences per image, (B,)."""
    return (reconstruction - images).pow(2).flatten(1).sum(dim=1)


class MarginLossConfig(Section):
    """`loss: {name: margin}`: the paper's loss for CapsNets."""

    name: Literal["margin"] = "margin"
    m_plus: float = Field(0.9, gt=0, le=1)
    m_minus: float = Field(0.1, ge=0, lt=1)
    down_weight: float = Field(0.5, ge=0)  # the paper's lambda for absent classes
    recon_weight: float = Field(0.0005, ge=0)  # scales the reconstruction loss so it does not dominate

    def __call__(self, out: ModelOutput, images: Tensor, labels: Tensor) -> LossTerms:
        targets = F.one_hot(labels, out.scores.shape[1]).to(out.scores.dtype)
        margin = margin_loss(out.scores, targets, self.m_plus, self.m_minus, self.down_weight)
        parts = {"margin_loss": margin}
        total = margin
        if out.reconstruction is not None and self.recon_weight > 0:
            recon = reconstruction_loss(out.reconstruction.float(), images.float())
            parts["recon_loss"] = recon
            total = margin + self.recon_weight * recon
        return LossTerms(total=total.mean(), parts=parts)


class CrossEntropyConfig(Section):
    """`loss: {name: cross_entropy}`: softmax + cross-entropy on the class scores."""

    name: Literal["cross_entropy"] = "cross_entropy"
    label_smoothing: float = Field(0.0, ge=0, lt=1)

    def __call__(self, out: ModelOutput, images: Tensor, labels: Tensor) -> LossTerms:
        ce = F.cross_entropy(out.scores.float(), labels, reduction="none", label_smoothing=self.label_smoothing)
        return LossTerms(total=ce.mean(), parts={"ce_loss": ce})


LossConfig = Annotated[MarginLossConfig | CrossEntropyConfig, Field(discriminator="name")]

__all__ = ["CrossEntropyConfig", "LossConfig", "LossTerms", "MarginLossConfig", "margin_loss",
           "reconstruction_loss"]
