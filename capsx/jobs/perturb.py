"""`capsx perturb`: the paper's Fig. 4, the winning class capsule decoded with one dimension shifted at a time."""

from __future__ import annotations

from pathlib import Path

import torch

from capsx.errors import CapsxError
from capsx.jobs.pictures import Gallery, choose_inputs
from capsx.jobs.trained import TrainedRun
from capsx.pictures import canvas, capsules

MAX_SAMPLES = 100


def run_perturb(t: TrainedRun, out: Gallery, *, dims: list[int] | None, value_range: tuple[float, float], steps: int,
                cls: int | None, samples: int | None, image: list[Path] | None, class_mean: bool) -> None:
    """The paper's Fig. 4: decode the winning capsule with one dimension tweaked at a time."""
    model = capsules.require_decoder(t.model, "perturb")
    if samples is not None and not 1 <= samples <= MAX_SAMPLES:
        raise CapsxError(f"--samples {samples}: expected 1 to {MAX_SAMPLES} (each one is a picture, or a row)")
    deltas = capsules.perturbation_values(*value_range, steps)
    D = model.class_dim
    all_dims = dims is None
    dims = list(range(D)) if dims is None else dims
    if class_mean:
        if t.objects > 1:
            raise CapsxError(f"--class-mean: not available for a {t.recipe.data.name} run (two digits per image)")
        test = t.test_set()
        caps, preds = capsules.class_capsules(model, t.inputs(test.images))
        wanted = [cls] if cls is not None else list(range(len(t.classes)))
        vectors = [capsules.class_mean_capsule(caps, preds, test.labels.to(preds.device), k) for k in wanted]
        sources = [(k, v, f"class {t.classes[k]} mean", k) for k, v in zip(wanted, vectors, strict=True)]
        stem, key_kind = "mean", "_mean"
    else:
        xs, labels, names = choose_inputs(t, image, cls, samples, default_per_class=not all_dims or cls is None)
        found = model(xs)
        # keyed by the input's label where it has one: the same test image stays on one slider however the
        # prediction (whose capsule is decoded) changes from epoch to epoch
        keyed = labels.tolist() if labels is not None and labels.dim() == 1 else found.prediction.tolist()
        sources = [(int(k), v[int(k)], name, int(c))
                   for k, v, name, c in zip(found.prediction, found.capsules, names, keyed, strict=True)]
        stem, key_kind = "sample", ""
    cols = len(deltas)
    col_labels = [canvas.number(v, "+.2f") for v in deltas.tolist()]  # -0.25 .. +0.00 .. +0.25
    if len(dims) == 1:  # one grid: a row per source
        rows = [capsules.perturb_capsule(model, v, k, dims, deltas)[0] for k, v, _, _ in sources]
        tiles = canvas.to_uint8(torch.cat(rows))
        img = canvas.grid(list(tiles), cols, scale=2)
        pic = canvas.label_grid(img, len(rows), cols, [f"{n} ({t.classes[k]})" for k, _, n, _ in sources], col_labels)
        pic = canvas.caption_above(pic, [f"dimension {dims[0]} of the winning class capsule, shifted by each value"])
        name = f"perturb_dim{dims[0]}{'_mean' if class_mean else ''}.png"
        out.publish(pic, name, key=f"perturb/dim{dims[0]}{key_kind}")
    else:  # one grid per source: a row per dimension
        per_class_count: dict[int, int] = {}
        for k, v, name, c in sources:
            pics = capsules.perturb_capsule(model, v, k, dims, deltas)  # (dims, cols, C, H, W)
            img = canvas.grid(list(canvas.to_uint8(pics.flatten(0, 1))), cols, scale=2)
            pic = canvas.label_grid(img, len(dims), cols, [f"dim {d}" for d in dims], col_labels)
            pic = canvas.caption_above(pic, [f"{name}: class {t.classes[k]} capsule, one dimension per row"])
            i = per_class_count.get(c, 0)
            per_class_count[c] = i + 1
            out.publish(pic, f"perturb_{stem}_class{c}_{i}.png",
                        key=f"perturb/class{c}{key_kind}" + (f"_{i}" if i else ""))
    out.report()

