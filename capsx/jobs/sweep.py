"""`capsx eval --sweep`: accuracy as a curve over one transform of the test set:
how far a model's accuracy holds as the digits turn, grow, lean or move.

A sweep spec is `NAME=START:STOP:STEP` (STOP included when the steps land on
it). Each value transforms the whole test split in one batched warp about the
image centre (bilinear, zero outside), the same for every model compared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from capsx.console import sweep_table
from capsx.data import Batches, ImageSet
from capsx.data.transforms import affine_matrices, warp
from capsx.errors import CapsxError
from capsx.jobs.context import Context
from capsx.jobs.pictures import Gallery
from capsx.jobs.trained import TrainedRun, open_run
from capsx.pictures import curves
from capsx.train.device import eval_precision
from capsx.train.loop import evaluate

MAX_POINTS = 1000


@dataclass(frozen=True)
class Transform:
    name: str
    unit: str  # how the values read on the plot's axis
    identity: float
    low: float = -math.inf  # values below are refused (a scale of 0 has no inverse)


TRANSFORMS = {
    "rotate": Transform("rotate", "degrees, counter-clockwise", 0.0),
    "scale": Transform("scale", "factor", 1.0, low=1e-3),
    "shear": Transform("shear", "x-shear factor", 0.0),
    "shift": Transform("shift", "pixels, to the right", 0.0),
}


@dataclass(frozen=True)
class SweepSpec:
    transform: Transform
    values: list[float]

    @property
    def name(self) -> str:
        return self.transform.name


def parse_sweep(text: str) -> SweepSpec:
    """'rotate=-45:45:5' -> rotate at -45, -40, ..., 45. Bad specs raise one `CapsxError` line."""
    usage = "expected NAME=START:STOP:STEP with NAME one of " + ", ".join(TRANSFORMS) + ", e.g. rotate=-45:45:5"
    name, sep, numbers = text.partition("=")
    name = name.strip()
    if not sep:
        raise CapsxError(f"--sweep {text!r}: {usage}")
    if name not in TRANSFORMS:
        raise CapsxError(f"--sweep {text!r}: unknown transform {name!r}; {usage}")
    parts = numbers.split(":")
    try:
        start, stop, step = (float(p) for p in parts) if len(parts) == 3 else (math.nan,) * 3
    except ValueError:
        start = stop = step = math.nan
    if not all(math.isfinite(v) for v in (start, stop, step)):
        raise CapsxError(f"--sweep {text!r}: {usage}")
    if step <= 0:
        raise CapsxError(f"--sweep {text!r}: STEP must be > 0, got {step:g}")
    if stop < start:
        raise CapsxError(f"--sweep {text!r}: STOP {stop:g} is below START {start:g}")
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > MAX_POINTS:
        raise CapsxError(f"--sweep {text!r}: {count} points; expected at most {MAX_POINTS} (use a larger STEP)")
    t = TRANSFORMS[name]
    values = [round(start + i * step, 10) for i in range(count)]
    if values[0] < t.low:
        raise CapsxError(f"--sweep {text!r}: {name} values must be > 0, got {values[0]:g}")
    return SweepSpec(t, values)


def apply_transform(images: Tensor, name: str, value: float) -> Tensor:
    """Every image (B, C, H, W) under the same transform `name` at `value`, about the centre."""
    n = len(images)
    zero, one = torch.zeros(n), torch.ones(n)
    full = torch.full((n,), float(value))
    params = {
        "rotate": (full, one, zero, zero, zero),
        "scale": (zero, full, zero, zero, zero),
        "shear": (zero, one, full, zero, zero),
        "shift": (zero, one, zero, full, zero),
    }[name]
    return warp(images, affine_matrices(*params))


def transformed(test: ImageSet, name: str, value: float) -> ImageSet:
    """The split under one transform. Each object alone (a two-object image's decoder targets)
    moves with its image, so the reconstruction term still compares like with like."""
    extras = {}
    sources = test.extras.get("sources")
    if sources is not None:
        extras["sources"] = apply_transform(sources.flatten(0, 1), name, value).view_as(sources)
    return ImageSet(apply_transform(test.images, name, value), test.labels, extras)


def run_sweep(refs: list[str], spec: SweepSpec, ctx: Context, *, images: int | None) -> dict[str, Sequence[float]]:
    """Accuracy of each run over the sweep's values, on its own test split; a Rich table, an MLflow
    metric series per run (`sweep/<name>/acc` and `sweep/<name>/value`, step = the value's index)
    and one plot of every run's curve, saved beside each run and logged to it."""
    trained = [open_run(ref, ctx) for ref in refs]
    galleries = [Gallery.open(t, ctx) for t in trained]
    results: dict[str, Sequence[float]] = {}
    for t, out in zip(trained, galleries, strict=True):
        label = f"{t.recipe.name} ({t.recipe.model.name}, {str(t.run_id or t.path.stem)[:8]})"
        results[label] = _accuracies(t, out, spec, images, label, ctx.say)
    ctx.say(sweep_table(f"test accuracy under {spec.name} ({spec.transform.unit})", spec.name, spec.values,
                              results))
    picture = curves.accuracy_curves(f"accuracy under {spec.name}", f"{spec.name} ({spec.transform.unit})",
                                     spec.values, results)
    for t, out in zip(trained, galleries, strict=True):
        path = out.publish_file(picture, f"sweep-{spec.name}.png", "sweep")
        ctx.say(f"  wrote {path}", soft_wrap=True)
        if out.tracker.active:
            ctx.say(f"[dim]logged to run {t.run_id}[/]")
    return results


def _accuracies(t: TrainedRun, out: Gallery, spec: SweepSpec, images: int | None, label: str,
                say: Callable[..., None]) -> list[float]:
    """One run's accuracy at each value of the sweep, each logged as it is measured."""
    test = t.test_set()
    if images is not None:
        test = test.subset(images)
    test = test.to(t.device)  # once: each value's warp then runs where the model does (a GPU's, not the CPU)
    accuracies = []
    precision = eval_precision(t.recipe.train.precision, t.device)
    for i, value in enumerate(spec.values):
        moved = transformed(test, spec.name, value)
        result = evaluate(t.model, Batches(moved, t.recipe.data.eval_batch_size), t.recipe.loss_config,
                          precision=precision, device=t.device, classes=t.classes)
        accuracies.append(result.accuracy)
        out.tracker.log_metrics({f"sweep/{spec.name}/acc": result.accuracy, f"sweep/{spec.name}/value": value},
                                step=i)
        say(f"  {label}: {spec.name} {value:g} -> {100 * result.accuracy:.2f}%", style="dim")
    return accuracies
