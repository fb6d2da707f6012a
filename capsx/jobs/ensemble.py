"""`capsx eval --ensemble`: several trained models as one classifier, the mean of their class probabilities.

The paper's CIFAR-10 number (10.6%) is a 7-model ensemble that averages the models'
capsule lengths. Capsule lengths are already on a 0-1 scale; a CNN's logits are put on
it by the function its loss reads them with (softmax for one label per image, sigmoid
for several), so CapsNets and CNNs can be ensembled alike, even together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from capsx.console import ensemble_table
from capsx.data import Batches
from capsx.errors import CapsxError
from capsx.jobs.context import Context
from capsx.jobs.evaluation import eval_set, report_check
from capsx.jobs.trained import TrainedRun, open_run
from capsx.models import ModelOutput
from capsx.paper import check_rows
from capsx.recipe import Recipe
from capsx.track.runs import find_run_dir, is_run_id
from capsx.track.tracker import Tracker, child_run_ids, parent_run_id
from capsx.train.device import autocast, eval_mode, eval_precision
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
                with autocast(device, eval_precision(m.recipe.train.precision, device)):
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


def ensemble_members(refs: Sequence[str], ctx: Context) -> list[str]:
    """The runs an ensemble is made of: each ref itself, or, for a `train --seeds` parent run,
    its seeds' runs."""
    out: list[str] = []
    for ref in refs:
        local = Path(ref).is_file() or find_run_dir(ctx.runs_dir, ref) is not None
        maybe_parent = not local and is_run_id(ref)
        children = child_run_ids(ctx.store(), ref) if maybe_parent else []
        out.extend(children or [ref])
    if len(out) < 2:
        raise CapsxError(f"--ensemble: {', '.join(refs)} is one model; give two runs or more, or a "
                         "`train --seeds` parent run")
    return out


def run_ensemble(refs: Sequence[str], ctx: Context, *, dataset: str = "test", check: bool = False,
                 images: int | None = None) -> EnsembleResult:
    """Evaluate several runs as one classifier (mean class probabilities, the paper's CIFAR-10
    protocol); print each member and the ensemble; log to the runs' common parent if they have one."""
    runs = [open_run(ref, ctx) for ref in ensemble_members(refs, ctx)]
    members = [Member(t.label, t.recipe, t.model) for t in runs]
    _same_question(runs)
    first = runs[0]
    if check:
        check_rows(first.recipe.paper, dataset, 0.0, len(members))  # no paper number: say so before evaluating
    test = eval_set(first.recipe, dataset, first.data_root, run_label=first.label)
    if images is not None:
        test = test.subset(images)
    batches = Batches(test.to(first.device), first.recipe.data.eval_batch_size)
    result = evaluate_ensemble(members, batches, first.device, first.classes)
    split = "test split" if dataset == "test" else dataset
    ctx.say(ensemble_table(f"{first.recipe.name}: ensemble of {len(members)} on {first.recipe.data.name} "
                                 f"({split}, {result.ensemble.images:,} images)",
                                 [f"{m.recipe.model.name} {m.label}" for m in members], result))
    rows = check_rows(first.recipe.paper, dataset, result.ensemble.error, len(members)) if check else []
    if ctx.track:
        uri = first.tracking_uri
        parents = {parent_run_id(uri, m.label) for m in members} if uri else {None}
        parent = parents.pop() if len(parents) == 1 else None
        if uri is None or parent is None:
            ctx.say("[dim]not logged: the runs are not the seeds of one parent run[/]")
        else:
            prefix = "ensemble" if dataset == "test" else f"ensemble/{dataset}"
            Tracker.attach(uri, parent).log_metrics(
                {f"{prefix}/error": result.ensemble.error, f"{prefix}/acc": result.ensemble.accuracy,
                 f"{prefix}/members": float(len(members)),
                 **{f"{prefix}/paper_check/{r.number.metric}": float(r.within) for r in rows}}, step=0)
            ctx.say(f"[dim]logged to parent run {parent} at {uri}[/]")
    report_check(f"{first.recipe.name} ensemble against the paper ({split})", rows, "the ensemble's ", ctx.say)
    return result


def _same_question(runs: Sequence[TrainedRun]) -> None:
    """An ensemble's models must share data set, input shape, classes and objects per image."""
    first = runs[0].recipe.data
    for t in runs[1:]:
        data = t.recipe.data
        for what, a, b in (("data set", first.name, data.name),
                           ("input shape", first.input_shape, data.input_shape),
                           ("classes", first.classes, data.classes),
                           ("objects per image", first.objects, data.objects)):
            if a != b:
                raise CapsxError(f"--ensemble: run {t.label} was trained with {what} {b} but run "
                                 f"{runs[0].label} with {a}; an ensemble's models must answer the same question")
