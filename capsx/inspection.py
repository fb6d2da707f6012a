"""The picture commands' whole job: open a trained run, compute what to show
(`capsx.pictures`), draw it, save PNGs under the run's directory and log the
same images to its MLflow run with stable keys."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from capsx.console import console
from capsx.data import ImageSet, resolve_data_root
from capsx.data.user_image import load_user_image
from capsx.errors import CapsxError
from capsx.models.capsnet import CapsNet
from capsx.pictures import canvas, capsules, inside
from capsx.recipe import Recipe
from capsx.track.process import TrackerProcess
from capsx.track.runs import resolve_checkpoint, run_tracking_uri
from capsx.track.tracker import Tracker
from capsx.train.checkpoint import load_checkpoint
from capsx.train.device import resolve_device
from capsx.train.loop import load_model
from capsx.train.losses import reconstruction_loss
from capsx.train.metrics import all_right

GENERATED_LIMIT = 10_000  # a generated test set can hold millions; pictures look at its start
PAIR_COLOURS = (canvas.RED, canvas.GREEN)  # Fig. 5: each of the two decoded digits in its own colour


@dataclass
class Trained:
    """A trained model opened for pictures, and where its pictures go."""

    recipe: Recipe
    model: nn.Module
    checkpoint: Path
    run_id: str | None
    epoch: int
    out_dir: Path
    data_root: Path
    tracker: Tracker | TrackerProcess | None = None
    written: list[Path] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return self.recipe.data.classes

    @property
    def objects(self) -> int:
        return self.recipe.data.objects

    def test_set(self, limit: int | None = None) -> ImageSet:
        """The first `limit` test examples (by default all, or the first GENERATED_LIMIT of a generated set)."""
        test = self.recipe.data.load_test_split(self.data_root)
        if limit is None:
            limit = len(test) if isinstance(test, ImageSet) else GENERATED_LIMIT
        return test.head(limit)

    def inputs(self, images: Tensor) -> Tensor:
        device = next(self.model.parameters()).device
        return images.to(device).float() / 255 if images.dtype == torch.uint8 else images.to(device)

    def user_image(self, path: Path) -> Tensor:
        return self.inputs(load_user_image(path, self.recipe.data.input_shape))

    def publish(self, image: np.ndarray, name: str, key: str, step: int = 0) -> Path:
        path = canvas.save_png(image, self.out_dir / name)
        self.written.append(path)
        if self.tracker is not None:
            self.tracker.log_image(image, key=key, step=step)
        return path

    def report(self) -> None:
        for path in self.written:
            console.print(f"  wrote {path}", soft_wrap=True)
        self.close()
        if self.tracker is not None and self.written:
            console.print(f"  logged {len(self.written)} image(s) to run {self.run_id}", soft_wrap=True)

    def close(self) -> None:
        """Wait for the tracking process (if any) to have applied every call; its error is raised here."""
        if isinstance(self.tracker, TrackerProcess):
            self.tracker.close()

    def __enter__(self) -> Trained:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(CapsxError):  # the command's own error is the one to show
            self.close()


def open_trained(run: str | None, checkpoint: Path | None, *, runs_dir: Path, tracking_uri: str | None,
                 data_root: Path | None, device_name: str, log: bool,
                 background: TrackerProcess | None = None) -> Trained:
    """The run's model, data and tracker. `background`: a `TrackerProcess` started before torch was
    imported, to log through (MLflow's start-up ran on another core meanwhile); closed here if unused.
    Use the result as a context manager then."""
    if run is not None and checkpoint is not None:
        raise CapsxError("give --run or --checkpoint, not both")
    ref = str(checkpoint) if checkpoint is not None else (run or "latest")
    ckpt = resolve_checkpoint(ref, runs_dir, tracking_uri, which="best")
    payload = load_checkpoint(ckpt)
    recipe, model = load_model(payload, resolve_device(device_name))
    model.eval()
    run_id = payload.get("run_id")
    run_dir = ckpt.parent.parent
    in_run_dir = (run_dir / "run.json").is_file()
    out_dir = run_dir / "pictures" if in_run_dir else runs_dir / "_pictures" / (run_id or ckpt.stem)
    tracker: Tracker | TrackerProcess | None = None
    if log and run_id:
        uri = run_tracking_uri(ckpt, tracking_uri, runs_dir)
        if uri is not None:
            tracker = background.attach(uri, run_id) if background is not None else Tracker.attach(uri, run_id)
    if background is not None and tracker is None:
        background.close()  # nothing to log: the process ends at once
    root = resolve_data_root(str(data_root) if data_root else None, getattr(recipe.data, "root", None))
    epoch = int(payload.get("state", {}).get("epoch", 0))
    return Trained(recipe, model, ckpt, run_id, epoch, out_dir, root, tracker)


def _digits(values: Tensor) -> list[str]:
    return [f"{v if abs(v) > 1e-9 else 0.0:+.2f}" for v in values.tolist()]


def _holding(labels: Tensor, cls: int) -> Tensor:
    """(N,) bool: the images labelled `cls` (for labels (N, k): among their labels)."""
    return labels == cls if labels.dim() == 1 else (labels == cls).any(dim=1)


def _sources(t: Trained, image: list[Path] | None, cls: int | None, samples: int | None,
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
        idx = _holding(test.labels, cls).nonzero().flatten()[: samples or 1]
    elif samples is not None:
        idx = torch.arange(min(samples, len(test)))
    elif default_per_class:
        idx = torch.stack([_holding(test.labels, k).nonzero().flatten()[0] for k in range(n_classes)
                           if _holding(test.labels, k).any()])
    else:
        idx = torch.arange(1)
    return t.inputs(test.images[idx]), test.labels[idx], [f"test #{i}" for i in idx.tolist()]


# --------------------------------------------------------------------------------------------- perturb


def run_perturb(t: Trained, *, dims: list[int] | None, value_range: tuple[float, float], steps: int,
                cls: int | None, samples: int | None, image: list[Path] | None, class_mean: bool) -> None:
    """The paper's Fig. 4: decode the winning capsule with one dimension tweaked at a time."""
    model = capsules.require_decoder(t.model, "perturb")
    deltas = capsules.perturbation_values(*value_range, steps)
    D = model.class_caps.weight.shape[2]
    all_dims = dims is None
    dims = list(range(D)) if dims is None else dims
    if class_mean:
        if t.objects > 1:
            raise CapsxError(f"--class-mean: not available for a {t.recipe.data.name} run (two digits per image)")
        test = t.test_set()
        caps, preds = capsules.class_capsules(model, t.inputs(test.images))
        wanted = [cls] if cls is not None else list(range(len(t.classes)))
        vectors = [capsules.class_mean_capsule(caps, preds, test.labels.to(preds.device), k) for k in wanted]
        sources = list(zip(wanted, vectors, [f"class {t.classes[k]} mean" for k in wanted], strict=True))
        stem, key_kind = "mean", "_mean"
    else:
        xs, labels, names = _sources(t, image, cls, samples, default_per_class=not all_dims or cls is None)
        out = model(xs)
        sources = [(int(k), v[int(k)], name) for k, v, name in zip(out.prediction, out.capsules, names, strict=True)]
        stem, key_kind = "sample", ""
    cols = len(deltas)
    col_labels = _digits(deltas)
    if len(dims) == 1:  # one grid: a row per source
        rows = [capsules.perturb_capsule(model, v, k, dims, deltas)[0] for k, v, _ in sources]
        tiles = canvas.to_uint8(torch.cat(rows))
        img = canvas.grid(list(tiles), cols, scale=2)
        img = canvas.label_grid(img, len(rows), cols, [f"{n} ({t.classes[k]})" for k, _, n in sources], col_labels)
        img = canvas.caption_above(img, [f"dimension {dims[0]} of the winning class capsule, shifted by each value"])
        name = f"perturb_dim{dims[0]}{'_mean' if class_mean else ''}.png"
        t.publish(img, name, key=f"perturb/dim{dims[0]}{key_kind}")
    else:  # one grid per source: a row per dimension
        per_class_count: dict[int, int] = {}
        for k, v, name in sources:
            pics = capsules.perturb_capsule(model, v, k, dims, deltas)  # (dims, cols, C, H, W)
            img = canvas.grid(list(canvas.to_uint8(pics.flatten(0, 1))), cols, scale=2)
            img = canvas.label_grid(img, len(dims), cols, [f"dim {d}" for d in dims], col_labels)
            img = canvas.caption_above(img, [f"{name}: class {t.classes[k]} capsule, one dimension per row"])
            step = per_class_count.get(k, 0)
            per_class_count[k] = step + 1
            t.publish(img, f"perturb_{stem}_class{k}_{step}.png", key=f"perturb/class{k}{key_kind}", step=step)
    t.report()


# ----------------------------------------------------------------------------------------- reconstruct


def run_reconstruct(t: Trained, *, count: int, misclassified: int, force_class: int | None,
                    image: list[Path] | None, error_images: int) -> float:
    """The paper's Fig. 3: inputs above their reconstructions; a strip of mistakes; the mean error."""
    model = capsules.require_decoder(t.model, "reconstruct")
    if t.objects > 1:
        if force_class is not None:
            raise CapsxError(f"--force-class: not available for a {t.recipe.data.name} run "
                             "(its images hold two digits; both predicted ones are decoded)")
        return _reconstruct_pairs(t, model, count=count, misclassified=misclassified, image=image,
                                  error_images=error_images)
    n_classes = len(t.classes)
    if force_class is not None and not 0 <= force_class < n_classes:
        raise CapsxError(f"--force-class {force_class}: out of range; this model has {n_classes} classes")

    def panel(xs: Tensor, labels: Tensor | None, title: str, name: str, key: str, as_label: bool = False) -> None:
        forced = None
        if force_class is not None:
            forced = torch.full((len(xs),), force_class, device=xs.device)
        elif as_label and labels is not None:
            forced = labels.to(xs.device)
        recon, preds, _ = capsules.reconstruct_as(model, xs, forced)
        cols = len(xs)
        tiles = list(canvas.to_uint8(xs)) + list(canvas.to_uint8(recon))
        wrong = [labels is not None and int(p) != int(lb) for p, lb in
                 zip(preds, labels if labels is not None else preds, strict=True)]
        img = canvas.grid(tiles, cols, scale=2, marked=wrong + wrong)
        cells, colors = [], []
        decoded_as = []
        for j in range(cols):
            p = t.classes[int(preds[j])]
            lab = t.classes[int(labels[j])] if labels is not None else "?"
            cells.append(f"L:{lab} P:{p}" + ("*" if wrong[j] else ""))
            colors.append(canvas.RED if wrong[j] else (0, 0, 0))
            decoded_as.append(t.classes[force_class] if force_class is not None else (lab if as_label else p))
        cells += [("P:" if force_class is not None else "R:") + r for r in decoded_as]
        colors += [(0, 0, 0)] * cols
        img = canvas.label_grid(img, 2, cols, ["input", "decoded"], None, cell_labels=cells, label_colors=colors)
        t.publish(canvas.caption_above(img, [title]), name, key=key)

    suffix = f"_as{force_class}" if force_class is not None else ""
    if image:
        xs = torch.cat([t.user_image(p) for p in image])
        panel(xs, None, "your images and their reconstructions (R: decoded class)", f"recon_images{suffix}.png",
              "recon/images")
        t.report()
        return float("nan")
    test = t.test_set()
    n = min(count, len(test))
    panel(t.inputs(test.images[:n]), test.labels[:n],
          "test images (L: label, P: prediction, * wrong) above their reconstructions"
          + (f" from the class-{t.classes[force_class]} capsule" if force_class is not None else ""),
          f"recon_test{suffix}.png", "recon/test" + suffix)
    # The error over the first `error_images` test images, and the mistakes among them.
    m = min(error_images, len(test))
    xs_all, labels_all = t.inputs(test.images[:m]), test.labels[:m]
    sse_sum, wrong_idx = 0.0, []
    for i in range(0, m, 500):
        _, preds, sse = capsules.reconstruct_as(model, xs_all[i:i + 500])
        sse_sum += float(sse.sum())
        wrong_idx += (i + (preds.cpu() != labels_all[i:i + 500]).nonzero().flatten()).tolist()
    mean_sse = sse_sum / max(1, m)
    if misclassified > 0 and wrong_idx and force_class is None:
        idx = torch.tensor(wrong_idx[:misclassified])
        panel(xs_all[idx], labels_all[idx], "misclassified: decoded as predicted (top) ...", "recon_wrong_pred.png",
              "recon/misclassified")
        panel(xs_all[idx], labels_all[idx], "... and decoded from the true label's capsule",
              "recon_wrong_label.png", "recon/misclassified_as_label", as_label=True)
    if t.tracker is not None:
        t.tracker.log_metrics({"recon/mean_sse": mean_sse, "recon/errors_in_sample": float(len(wrong_idx))},
                              step=t.epoch)
    console.print(f"mean reconstruction error (sum of squared pixel errors per image) over {m} test images: "
                  f"{mean_sse:.3f}; {len(wrong_idx)} of them misclassified", soft_wrap=True)
    t.report()
    return mean_sse


def _pair(classes: list[str], pair: Tensor) -> str:
    return "(" + ",".join(classes[int(k)] for k in pair) + ")"


@torch.no_grad()
def _reconstruct_pairs(t: Trained, model: CapsNet, *, count: int, misclassified: int, image: list[Path] | None,
                       error_images: int) -> float:
    """The paper's Fig. 5: each of an image's two digits decoded from its own capsule, drawn in its own
    colour over the input in grey, captioned R:(reconstructed = predicted pair) L:(label pair)."""
    k = t.objects

    def panel(xs: Tensor, labels: Tensor | None, title: str, name: str, key: str, as_label: bool = False) -> None:
        out = model(xs)
        preds = out.top(k).sort(dim=1).values  # (n, k) ascending: the caption's order is the colours' order
        decoded = labels.to(xs.device).sort(dim=1).values if as_label and labels is not None else preds
        recon = model.reconstruct(out.capsules, decoded)  # (n, k, C, H, W)
        wrong = [False] * len(xs) if labels is None else (~all_right(labels.to(preds.device), preds)).tolist()
        tiles = list(canvas.to_uint8(xs)) + list(canvas.colour_overlay(xs, recon, PAIR_COLOURS[:k]))
        img = canvas.grid(tiles, len(xs), scale=2, marked=wrong + wrong)
        cells = ["L:" + _pair(t.classes, lab.sort().values) for lab in labels] if labels is not None \
            else ["L:?"] * len(xs)
        cells += [("L:" if as_label else "R:") + _pair(t.classes, d) + ("*" if w else "")
                  for d, w in zip(decoded, wrong, strict=True)]
        colors = [(0, 0, 0)] * len(xs) + [canvas.RED if w else (0, 0, 0) for w in wrong]
        img = canvas.label_grid(img, 2, len(xs), ["input", "decoded"], None, cell_labels=cells, label_colors=colors)
        lines = [title, "decoded: the pair's first digit in red, its second in green, input in grey"]
        t.publish(canvas.caption_above(img, lines), name, key=key)

    if image:
        xs = torch.cat([t.user_image(p) for p in image])
        panel(xs, None, "your images; R: the two longest capsules, decoded",
              "recon_pairs_images.png", "recon/pairs_images")
        t.report()
        return float("nan")
    test = t.test_set(max(count, error_images))
    n = min(count, len(test))
    panel(t.inputs(test.images[:n]), test.labels[:n],
          "test pairs; L: labels, R: the two longest capsules (* not both right)",
          "recon_pairs.png", "recon/pairs")
    # The error over the first `error_images` pairs, each digit against its own unmerged image, and the mistakes.
    m = min(error_images, len(test))
    sources = test.extras["sources"][:m]
    sse_sum, wrong_idx = 0.0, []
    for i in range(0, m, 500):
        xs = t.inputs(test.images[i:i + 500])
        out = model(xs)
        recon = out.reconstruction  # decoded from the top-k capsules
        assert recon is not None and recon.shape[1] == k
        sse_sum += float(reconstruction_loss(recon, t.inputs(sources[i:i + 500])).sum())
        right = all_right(test.labels[i:i + 500].to(xs.device), out.top(k))
        wrong_idx += (i + (~right).nonzero().flatten().cpu()).tolist()
    mean_sse = sse_sum / max(1, m)
    if misclassified > 0 and wrong_idx:
        idx = torch.tensor(wrong_idx[:misclassified])
        xs_wrong = t.inputs(test.images[idx])
        panel(xs_wrong, test.labels[idx], "not both right: decoded as predicted (top) ...",
              "recon_pairs_wrong_pred.png", "recon/pairs_misclassified")
        panel(xs_wrong, test.labels[idx], "... and decoded from the true labels' capsules",
              "recon_pairs_wrong_label.png", "recon/pairs_misclassified_as_label", as_label=True)
    if t.tracker is not None:
        t.tracker.log_metrics({"recon/mean_sse": mean_sse, "recon/errors_in_sample": float(len(wrong_idx))},
                              step=t.epoch)
    console.print(f"mean reconstruction error (sum of squared pixel errors of both digits, each against its own "
                  f"image) over {m} test pairs: {mean_sse:.3f}; {len(wrong_idx)} of them not both right",
                  soft_wrap=True)
    t.report()
    return mean_sse


# ------------------------------------------------------------------------------------------- visualize


def run_filters(t: Trained, *, layer: str | None, in_channel: int | None) -> None:
    name, conv = inside.get_layer(t.model, layer, "conv layer", convs_only=True)
    assert isinstance(conv, nn.Conv2d)
    kernels = inside.filter_images(conv, in_channel)
    tiles = canvas.to_uint8(kernels, per_image=True)
    cols = int(np.ceil(np.sqrt(len(tiles))))
    scale = max(1, 48 // max(kernels.shape[-1], 1))
    img = canvas.grid(list(tiles), cols, scale=scale)
    how = (f"input channel {in_channel}" if in_channel is not None else
           "mean |w| over input channels" if conv.in_channels not in (1, 3) else "each filter normalised")
    img = canvas.caption_above(img, [f"{name}: {conv.out_channels} filters of {conv.kernel_size[0]}x"
                                     f"{conv.kernel_size[1]} ({how})"])
    t.publish(img, f"filters_{name}.png", key=f"filters/{name}")
    t.report()


def _one_input(t: Trained, index: int, image: Path | None) -> tuple[Tensor, str, int | None]:
    if image is not None:
        return t.user_image(image), image.name, None
    test = t.test_set()
    if not 0 <= index < len(test):
        raise CapsxError(f"--index {index}: out of range; the test split has {len(test)} images")
    label = int(test.labels[index]) if test.labels.dim() == 1 else None  # a pair has no single label
    return t.inputs(test.images[index:index + 1]), f"test #{index}", label


def run_activations(t: Trained, *, layer: str | None, index: int, image: Path | None) -> None:
    x, what, _ = _one_input(t, index, image)
    name, module = inside.get_layer(t.model, layer)
    out = inside.layer_output(t.model, module, x)[0]
    if out.dim() == 3:
        fmap = out / out.max().clamp(min=1e-12)  # one scale for the layer: dead channels stay black
        tiles = canvas.to_uint8(fmap)
        cols = int(np.ceil(np.sqrt(len(tiles))))
        img = canvas.grid(list(tiles), cols, scale=max(1, 56 // max(out.shape[-1], 1)))
        dead = int((out.flatten(1).amax(dim=1) <= 0).sum())
        img = canvas.caption_above(img, [f"{name} on {what}: {out.shape[0]} channels "
                                         f"({dead} dead: black), one scale for all"])
        t.publish(img, f"activations_{name}.png", key=f"activations/{name}")
    else:
        console.print(f"[dim]{name} outputs {tuple(out.shape)}, not feature maps; see the capsule lengths[/]")
    if hasattr(t.model, "primary_grid"):
        lengths = inside.primary_capsule_lengths(t.model, x)  # (types, gh, gw), already in [0, 1)
        img = canvas.grid([canvas.heat(m) for m in lengths.cpu().numpy()], int(np.ceil(np.sqrt(len(lengths)))),
                          scale=8)
        img = canvas.caption_above(img, [f"primary capsule lengths on {what}: {lengths.shape[0]} types over "
                                         f"the {lengths.shape[1]}x{lengths.shape[2]} grid (black 0, white 1)"])
        t.publish(img, "activations_primary_lengths.png", key="activations/primary_lengths")
    t.report()


def run_routing(t: Trained, *, index: int, image: Path | None) -> list[float]:
    x, what, _ = _one_input(t, index, image)
    maps, delta_b = inside.routing_maps(t.model, x)  # (iters, J, types, gh, gw)
    # Weight each primary capsule type by its length: short (inactive) capsules keep c near 1/J
    # and would wash the picture out.
    lengths = inside.primary_capsule_lengths(t.model, x)  # (types, gh, gw)
    weighted = (maps * lengths).sum(dim=2) / lengths.sum(dim=0).clamp(min=1e-12)  # (iters, J, gh, gw)
    iters, J = weighted.shape[:2]
    lo, hi = float(weighted.min()), float(weighted.max())  # stretched: couplings often stay near 1/J
    tiles = [canvas.heat(((m - lo) / max(hi - lo, 1e-12)).cpu().numpy()) for m in weighted.flatten(0, 1)]
    img = canvas.grid(tiles, J, scale=10)
    columns = t.classes + ["none of the above"] * (J - len(t.classes))  # the extra routed capsule, if any
    img = canvas.label_grid(img, iters, J, [f"iteration {r + 1}" for r in range(iters)], columns)
    pred = int(t.model(x).prediction[0])
    img = canvas.caption_above(img, [f"coupling coefficients c_ij on {what} (predicted {t.classes[pred]}): at each "
                                     "grid position, the mean over capsule types weighted by |u_i|",
                                     f"colour scale {lo:.3f} (black) .. {hi:.3f} (white); uniform is {1 / J:.3f}",
                                     "mean |delta b_ij| per iteration: " + ", ".join(f"{d:.4f}" for d in delta_b)])
    t.publish(img, "routing_couplings.png", key="routing/couplings")
    if t.tracker is not None:
        t.tracker.log_metrics({f"routing/inspect_delta_b_iter{r + 1}": d for r, d in enumerate(delta_b)},
                              step=t.epoch)
    console.print("mean |delta b_ij| per routing iteration: " + ", ".join(f"{d:.5f}" for d in delta_b))
    t.report()
    return delta_b


def run_saliency(t: Trained, *, index: int, image: Path | None, cls: int | None, method: str,
                 layer: str | None, steps: int) -> None:
    x, what, label = _one_input(t, index, image)
    with torch.no_grad():
        pred = int(t.model(x).prediction[0])
    target = pred if cls is None else cls
    if not 0 <= target < len(t.classes):
        raise CapsxError(f"--class {target}: out of range; this model has {len(t.classes)} classes")
    if method == "integrated-gradients":
        attr = inside.integrated_gradients(t.model, x, target, steps=steps).sum(dim=0)  # (H, W)
        pos = attr.clamp(min=0)
        heat = pos / pos.max().clamp(min=1e-12)
        note = f"integrated gradients ({steps} steps, black baseline), positive part"
    else:
        name, module = inside.get_layer(t.model, layer)
        heat = inside.grad_cam(t.model, module, x, target)
        note = f"Grad-CAM at {name}"
    base = canvas.to_uint8(x)[0]
    base_rgb = np.repeat(base[..., None], 3, -1) if base.ndim == 2 else base
    overlay = (0.5 * base_rgb + 0.5 * canvas.heat(heat.cpu().numpy())).astype(np.uint8)
    img = canvas.grid([base_rgb, canvas.heat(heat.cpu().numpy()), overlay], 3, scale=6)
    img = canvas.label_grid(img, 1, 3, None, ["input", "saliency", "overlay"])
    score = "capsule length" if hasattr(t.model, "primary_grid") else "logit"
    img = canvas.caption_above(img, [f"what drives class {t.classes[target]} ({score}) on {what}"
                                     + (f", label {t.classes[label]}" if label is not None else "")
                                     + f", predicted {t.classes[pred]}", note])
    t.publish(img, f"saliency_{method}_class{target}.png", key=f"saliency/class{target}")
    t.report()


def run_top_activating(t: Trained, *, layer: str | None, channel: int, k: int, limit: int) -> None:
    name, module = inside.get_layer(t.model, layer)
    test = t.test_set(limit)
    scores = inside.unit_scores(t.model, module, t.inputs(test.images), channel)
    top = scores.topk(min(k, len(scores)))
    idx = top.indices.cpu()
    tiles = canvas.to_uint8(t.inputs(test.images[idx]))
    cols = min(len(idx), 8)
    img = canvas.grid(list(tiles), cols, scale=2)
    rows = -(-len(idx) // cols)
    img = canvas.label_grid(img, rows, cols, None, None,
                            cell_labels=[f"#{i} {v:.2f}" for i, v in zip(idx.tolist(), top.values.tolist(),
                                                                          strict=True)])
    img = canvas.caption_above(img, [f"the {len(idx)} of {len(test)} test images that drive {name} "
                                     f"unit {channel} most (score under each)"])
    t.publish(img, f"top_{name}_{channel}.png", key=f"top_activating/{name}_{channel}")
    t.report()
