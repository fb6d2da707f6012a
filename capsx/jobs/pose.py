"""`capsx eval --pose`: how much of each image's pose a trained model's features hold, as a number.

Per class, a linear readout (least squares with an intercept) from the features to each pose quantity is
fitted on a seeded half of that class's test images and scored (R^2) on the other half. A capsule model's
features are the class capsule's vector (its label's); a CNN's, the input of its output layer, for
comparison. Per feature dimension: which pose quantity it correlates with most, and how much."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from capsx.data.imageset import ImageSet
from capsx.data.pose import PoseQuantity
from capsx.errors import CapsxError
from capsx.jobs.context import Context
from capsx.jobs.trained import TrainedRun, open_run
from capsx.models.capsule_classifier import CapsuleClassifier
from capsx.train.device import eval_mode

SPLIT_SEED = 0  # which half of a class's images fits the readout: the same every time
CHUNK = 500  # images per forward pass


@dataclass
class PoseReadout:
    """R^2 per class and quantity (NaN: too few images, or not a quantity of that class), their means over
    classes, and per feature dimension the quantity it correlates with most (mean |r| over classes)."""

    features: str  # what was read: "class capsule (16-D)" or "penultimate layer (W-D)"
    width: int
    classes: list[str]
    quantities: list[str]
    r2: list[list[float]]  # [class][quantity]
    dims: list[tuple[str, float]] = field(default_factory=list)  # [dimension] -> (quantity, mean |r|)

    @property
    def mean(self) -> dict[str, float]:
        out = {}
        for j, q in enumerate(self.quantities):
            values = [row[j] for row in self.r2 if not math.isnan(row[j])]
            out[q] = sum(values) / len(values) if values else float("nan")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"features": self.features, "width": self.width, "quantities": self.quantities,
                "r2": {c: dict(zip(self.quantities, row, strict=True)) for c, row in zip(self.classes, self.r2,
                                                                                        strict=True)},
                "mean_r2": self.mean, "dims": [{"quantity": q, "mean_abs_r": r} for q, r in self.dims]}


def held_out_r2(x: Tensor, y: Tensor, seed: int = SPLIT_SEED) -> float:
    """R^2 on a seeded half of the rows of a least-squares fit of y (n, m) on x (n, d) plus an intercept,
    fitted on the other half; all m columns together: 1 - SSE / SST, SST about the scored half's mean.
    NaN when the fitted half has no more rows than unknowns."""
    n, d = x.shape
    if n // 2 <= d + 1:
        return float("nan")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, score = order[: n // 2], order[n // 2:]
    design = torch.cat([x.to(torch.float64), torch.ones(n, 1, dtype=torch.float64)], dim=1)
    y = y.to(torch.float64)
    weights = torch.linalg.lstsq(design[fit], y[fit], driver="gelsd").solution
    residual = y[score] - design[score] @ weights
    spread = y[score] - y[score].mean(dim=0)
    sst = float((spread ** 2).sum())
    return 1.0 - float((residual ** 2).sum()) / sst if sst > 0 else float("nan")


def correlations(x: Tensor, y: Tensor) -> Tensor:
    """(d, m) Pearson correlation of each column of x (n, d) with each column of y (n, m); 0 for a constant."""
    xc, yc = x.to(torch.float64) - x.mean(0), y.to(torch.float64) - y.mean(0)
    norm = xc.norm(dim=0).unsqueeze(1) * yc.norm(dim=0).unsqueeze(0)
    return torch.where(norm > 0, xc.T @ yc / norm.clamp(min=1e-300), torch.zeros_like(norm))


def readout(features: Tensor, labels: Tensor, quantities: list[PoseQuantity], classes: list[str],
            what: str) -> PoseReadout:
    """The readout of `quantities` from `features` (N, K, D) (each image's own class row) or (N, D)."""
    n = len(labels)
    rows = features[torch.arange(n), labels] if features.dim() == 3 else features
    width = rows.shape[1]
    r2: list[list[float]] = []
    dim_r = torch.zeros(width, len(quantities), dtype=torch.float64)  # summed |r| over classes
    counted = torch.zeros(len(quantities), dtype=torch.float64)
    for c in range(len(classes)):
        in_class = labels == c
        row: list[float] = []
        for j, q in enumerate(quantities):
            sel = in_class & q.valid
            count = int(sel.sum())
            row.append(held_out_r2(rows[sel], q.values[sel]) if count else float("nan"))
            if count > 2:
                dim_r[:, j] += correlations(rows[sel], q.values[sel]).abs().amax(dim=1)
                counted[j] += 1
        r2.append(row)
    mean_r = dim_r / counted.clamp(min=1)
    best = mean_r.argmax(dim=1)
    dims = [(quantities[int(b)].name, float(mean_r[i, b])) for i, b in enumerate(best)]
    return PoseReadout(what, width, classes, [q.name for q in quantities], r2, dims)


@torch.no_grad()
def features_of(t: TrainedRun, images: Tensor) -> tuple[Tensor, str]:
    """A capsule model's class capsules (N, K, D), or a CNN's output layer's inputs (N, W), on the CPU."""
    model = t.model
    taken: list[Tensor] = []
    hook = None
    if not isinstance(model, CapsuleClassifier):  # a CNN: the features its classifier reads
        last = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not last:
            raise CapsxError(f"{t.label}: --pose needs a capsule model or a CNN with a linear output layer")
        hook = last[-1].register_forward_hook(lambda _m, inputs, _out: taken.append(inputs[0].float().cpu()))
    chunks: list[Tensor] = []
    try:
        with eval_mode(model):
            for i in range(0, len(images), CHUNK):
                out = model(t.inputs(images[i:i + CHUNK]))
                if hook is None:
                    if out.capsules is None:
                        raise CapsxError(f"{t.label}: --pose reads class capsules, and this model has none")
                    chunks.append(out.capsules.float().cpu())
    finally:
        if hook is not None:
            hook.remove()
    if hook is not None:
        feats = torch.cat(taken).flatten(1)
        return feats, f"penultimate layer ({feats.shape[1]}-D)"
    caps = torch.cat(chunks)
    return caps, f"class capsule ({caps.shape[2]}-D)"


def run_pose(ref: str, ctx: Context, *, images: int | None = None) -> PoseReadout:
    """Read the pose out of a run's features on its test split; print, and (with ctx.track) log it."""
    from capsx.console import pose_tables

    t = open_run(ref, ctx)
    if t.objects != 1:
        raise CapsxError(f"--pose: {t.recipe.data.name} images hold {t.objects} objects; the pose readout is "
                         "for one object per image (shapes, smallnorb)")
    test = t.test_set()
    if images is not None:
        test = test.subset(images)
    quantities = t.recipe.data.pose(test) if isinstance(test, ImageSet) else []
    if not quantities:
        raise CapsxError(f"--pose: {t.recipe.data.name} keeps no pose of its images; data sets that do: "
                         "shapes (x, y, rotation, scale), smallnorb (azimuth, elevation, lighting)")
    feats, what = features_of(t, test.images)
    result = readout(feats, test.labels, quantities, t.classes, what)
    for table in pose_tables(f"{t.recipe.name}: pose read linearly from the {what}", result,
                             f"{len(test)} test images; each class's readout fitted on half of its images, "
                             "R² on the other half"):
        ctx.say(table)
    if ctx.track and t.run_id:
        tracker = t.tracker()
        if tracker is None:
            ctx.say("[dim]not logged: the run was trained without tracking[/]")
        else:
            tracker.log_metrics({f"pose/r2/{q}": v for q, v in result.mean.items() if not math.isnan(v)},
                                step=t.epoch)
            tracker.log_dict(result.as_dict(), "pose/readout.json")
            ctx.say(f"[dim]logged to run {t.run_id} at {t.tracking_uri}[/]")
    return result
