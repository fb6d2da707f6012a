"""Several trained models as one classifier: the mean of their class probabilities.

The paper's CIFAR-10 number (10.6%) is a 7-model ensemble that averages the models'
capsule lengths. Capsule lengths are already on a 0-1 scale; a CNN's logits are put on
it by the function its loss reads them with (softmax for one label per image, sigmoid
for several), so CapsNets and CNNs can be ensembled alike, even together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from capsx.data import Batches
from capsx.models import ModelOutput
from capsx.recipe import Recipe
from capsx.train.device import autocast, eval_mode
from capsx.train.losses import BinaryCrossEntropyConfig
from capsx.train.metrics import EvalResult, predict


def class_probabilities(out: ModelOutput, recipe: Recipe) -> Tensor:
    """(B, K) float32 scores on a 0-1 scale, fit for averaging across models."""
    scores = out.scores.float()
    if out.capsules is not None:  # capsule lengths: the paper averages these
        return scores
    if isinstance(recipe.loss_config, BinaryCrossEntropyConfig):  # one independent sigmoid per class
        return torch.sigmoid(scores)
    return torch.softmax(scores, dim=1)


@dataclass
class Member:
    """One model of the ensemble, with the recipe it was trained with (its loss and precision)."""

    label: str  # run id or checkpoint path, for the tables
    recipe: Recipe
    model: nn.Module


@dataclass
class EnsembleResult:
    ensemble: EvalResult
    members: list[EvalResult]  # each model alone, on the same images in the same pass


def evaluate_ensemble(members: Sequence[Member], batches: Batches, device: torch.device,
                      classes: list[str]) -> EnsembleResult:
    """Predict with the mean of the members' class probabilities; score each member alone too.
    Losses are not comparable across members, so the results carry NaN for them."""
    labels_all: list[Tensor] = []
    mean_preds: list[Tensor] = []
    member_preds: list[list[Tensor]] = [[] for _ in members]
    with contextlib.ExitStack() as stack:
        for m in members:
            stack.enter_context(eval_mode(m.model))
        for images, labels, _ in batches.epoch(0):
            total: Tensor | None = None
            for k, m in enumerate(members):
                with autocast(device, m.recipe.train.precision):
                    out = m.model(images)
                member_preds[k].append(predict(out, labels))
                probs = class_probabilities(out, m.recipe)
                total = probs if total is None else total + probs
            assert total is not None
            labels_all.append(labels)
            mean_preds.append(predict(ModelOutput(scores=total / len(members)), labels))
    labels_cat = torch.cat(labels_all)

    def result(preds: list[Tensor]) -> EvalResult:
        return EvalResult.from_predictions(float("nan"), {}, labels_cat, torch.cat(preds), classes)

    return EnsembleResult(result(mean_preds), [result(p) for p in member_preds])
