"""`capsx reconstruct`: the paper's Fig. 3 (inputs above their reconstructions, a strip of mistakes, the mean
reconstruction error) and, for two-digit images, Fig. 5 (each digit decoded from its own capsule)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from capsx.errors import CapsxError
from capsx.jobs.pictures import Gallery
from capsx.jobs.trained import TrainedRun
from capsx.models.capsule_classifier import CapsuleClassifier
from capsx.pictures import canvas, capsules
from capsx.train.losses import reconstruction_loss
from capsx.train.metrics import all_right

PAIR_COLOURS = (canvas.RED, canvas.GREEN)  # Fig. 5: each of the two decoded digits in its own colour
ERROR_CHUNK = 500  # images per forward pass of the error over the test images
DEFAULT_ERROR_IMAGES = 1000  # without a recorded evaluation


def run_reconstruct(t: TrainedRun, out: Gallery, *, count: int, misclassified: int, force_class: int | None,
                    image: list[Path] | None, error_images: int | None) -> float:
    """Fig. 3 for a one-object run, Fig. 5 for a two-digit one; returns the mean reconstruction error.
    `error_images`: how many test images it is measured over; None: the whole split as the run's own
    evaluation measured it (kept in the checkpoint), 0: not measured (the panel only), else the first
    DEFAULT_ERROR_IMAGES."""
    model = capsules.require_decoder(t.model, "reconstruct")
    if t.objects > 1:
        if force_class is not None:
            raise CapsxError(f"--force-class: not available for a {t.recipe.data.name} run "
                             "(its images hold two digits; both predicted ones are decoded)")
        return _reconstruct_pairs(t, out, model, count=count, misclassified=misclassified, image=image,
                                  error_images=error_images or DEFAULT_ERROR_IMAGES)
    n_classes = len(t.classes)
    if force_class is not None and not 0 <= force_class < n_classes:
        raise CapsxError(f"--force-class {force_class}: out of range; this model has {n_classes} classes")
    suffix = f"_as{force_class}" if force_class is not None else ""
    if image:
        xs = torch.cat([t.user_image(p) for p in image])
        _panel(t, out, model, xs, None, "your images and their reconstructions (R: decoded class)",
               f"recon_images{suffix}.png", "recon/images", force_class)
        out.report()
        return float("nan")
    test = t.test_set()
    n = min(count, len(test))
    _panel(t, out, model, t.inputs(test.images[:n]), test.labels[:n],
           "test images (L: label, P: prediction, * wrong) above their reconstructions"
           + (f" from the class-{t.classes[force_class]} capsule" if force_class is not None else ""),
           f"recon_test{suffix}.png", "recon/test" + suffix, force_class)
    if error_images == 0:
        out.report()
        return float("nan")
    recorded = _recorded(t, len(test)) if error_images is None else None
    if recorded is not None:  # the run's own evaluation of the whole split, kept in its checkpoint
        mean_sse, wrong_idx, wrong_count = recorded
        wrong_idx = [i for i in wrong_idx if i < len(test)]
        m, where = len(test), f", from the evaluation at epoch {t.epoch}"
    else:  # the error over the first `error_images` test images, and the mistakes among them
        m, where = min(error_images or DEFAULT_ERROR_IMAGES, len(test)), ""
        mean_sse, wrong_idx = reconstruction_error(t, model, test.images[:m], test.labels[:m])
        wrong_count = len(wrong_idx)
    if misclassified > 0 and wrong_idx and force_class is None:
        idx = torch.tensor(wrong_idx[:misclassified])
        xs, labels = t.inputs(test.images[idx]), test.labels[idx]
        _panel(t, out, model, xs, labels, "misclassified test images (L: label, P: prediction) above their "
               "reconstructions from the predicted class's capsule (R)",
               "recon_wrong_pred.png", "recon/misclassified", None)
        _panel(t, out, model, xs, labels, "the same misclassified test images above their reconstructions from "
               "the true label's capsule (R)",
               "recon_wrong_label.png", "recon/misclassified_as_label", None, as_label=True)
    if recorded is None:  # (the recorded one is the run's test/recon_loss already)
        out.log_metrics({"recon/mean_sse": mean_sse, "recon/errors_in_sample": float(wrong_count)})
    out.say(f"mean reconstruction error (sum of squared pixel errors per image) over {m} test images{where}: "
            f"{mean_sse:.3f}; {wrong_count} of them misclassified", soft_wrap=True)
    out.report()
    return mean_sse


def _recorded(t: TrainedRun, images: int) -> tuple[float, list[int], int] | None:
    """The mean reconstruction error, first mistakes and their count from the evaluation that wrote the
    checkpoint (decoded by the prediction, as here), or None if it kept none (recon_weight 0, older files)."""
    state = t.checkpoint.state
    row = state.history[-1] if state.history else {}
    if "test/recon_loss" not in row or "test/error" not in row or state.test_mistakes is None:
        return None
    return float(row["test/recon_loss"]), list(state.test_mistakes), round(row["test/error"] * images)


def reconstruction_error(t: TrainedRun, model: CapsuleClassifier, images: Tensor,
                         labels: Tensor) -> tuple[float, list[int]]:
    """Mean reconstruction error over `images` (decoded by the prediction) and the indices of the mistakes."""
    sse_sum, wrong = 0.0, []
    for i in range(0, len(images), ERROR_CHUNK):
        _, preds, sse = capsules.reconstruct_as(model, t.inputs(images[i:i + ERROR_CHUNK]))
        sse_sum += float(sse.sum())
        wrong += (i + (preds.cpu() != labels[i:i + ERROR_CHUNK]).nonzero().flatten()).tolist()
    return sse_sum / max(1, len(images)), wrong


def _panel(t: TrainedRun, out: Gallery, model: CapsuleClassifier, xs: Tensor, labels: Tensor | None, title: str,
           name: str, key: str, force_class: int | None, as_label: bool = False) -> None:
    """Inputs (captioned L: label, P: prediction) above their reconstructions (R: the class decoded)."""
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
        cells.append(f"L:{lab}\nP:{p}" + ("*" if wrong[j] else ""))  # a line each: neighbours never touch
        colors.append(canvas.RED if wrong[j] else (0, 0, 0))
        decoded_as.append(t.classes[force_class] if force_class is not None else (lab if as_label else p))
    cells += [("P:" if force_class is not None else "R:") + r for r in decoded_as]
    colors += [(0, 0, 0)] * cols
    pic = canvas.label_grid(img, 2, cols, ["input", "decoded"], None, cell_labels=cells, label_colors=colors)
    out.publish(canvas.caption_above(pic, [title]), name, key=key)


def _pair(classes: list[str], pair: Tensor) -> str:
    return "(" + ",".join(classes[int(k)] for k in pair) + ")"


@torch.no_grad()
def _reconstruct_pairs(t: TrainedRun, out: Gallery, model: CapsuleClassifier, *, count: int, misclassified: int,
                       image: list[Path] | None, error_images: int) -> float:
    """The paper's Fig. 5: each of an image's two digits decoded from its own capsule, drawn in its own
    colour over the input in grey, captioned R:(reconstructed = predicted pair) L:(label pair)."""
    if image:
        xs = torch.cat([t.user_image(p) for p in image])
        _pair_panel(t, out, model, xs, None, "your images; R: the two longest capsules, decoded",
                    "recon_pairs_images.png", "recon/pairs_images")
        out.report()
        return float("nan")
    test = t.test_set(max(count, error_images))
    n = min(count, len(test))
    _pair_panel(t, out, model, t.inputs(test.images[:n]), test.labels[:n],
                "test pairs; L: labels, R: the two longest capsules (* not both right)",
                "recon_pairs.png", "recon/pairs")
    # The error over the first `error_images` pairs, each digit against its own unmerged image, and the mistakes.
    m = min(error_images, len(test))
    sources = test.extras["sources"][:m]
    sse_sum, wrong_idx = 0.0, []
    for i in range(0, m, ERROR_CHUNK):
        xs = t.inputs(test.images[i:i + ERROR_CHUNK])
        found = model(xs)
        recon = found.reconstruction  # decoded from the top-k capsules
        assert recon is not None and recon.shape[1] == t.objects
        sse_sum += float(reconstruction_loss(recon, t.inputs(sources[i:i + ERROR_CHUNK])).sum())
        right = all_right(test.labels[i:i + ERROR_CHUNK].to(xs.device), found.top(t.objects))
        wrong_idx += (i + (~right).nonzero().flatten().cpu()).tolist()
    mean_sse = sse_sum / max(1, m)
    if misclassified > 0 and wrong_idx:
        idx = torch.tensor(wrong_idx[:misclassified])
        xs_wrong = t.inputs(test.images[idx])
        _pair_panel(t, out, model, xs_wrong, test.labels[idx], "test pairs not both right (L: labels) above "
                    "both digits decoded from the predicted pair's capsules (R)",
                    "recon_pairs_wrong_pred.png", "recon/pairs_misclassified")
        _pair_panel(t, out, model, xs_wrong, test.labels[idx], "the same pairs above both digits decoded from "
                    "the true labels' capsules",
                    "recon_pairs_wrong_label.png", "recon/pairs_misclassified_as_label", as_label=True)
    out.log_metrics({"recon/mean_sse": mean_sse, "recon/errors_in_sample": float(len(wrong_idx))})
    out.say(f"mean reconstruction error (sum of squared pixel errors of both digits, each against its own "
                  f"image) over {m} test pairs: {mean_sse:.3f}; {len(wrong_idx)} of them not both right",
                  soft_wrap=True)
    out.report()
    return mean_sse


def _pair_panel(t: TrainedRun, out: Gallery, model: CapsuleClassifier, xs: Tensor, labels: Tensor | None, title: str,
                name: str, key: str, as_label: bool = False) -> None:
    """Two-digit inputs above both decoded digits, each in its colour (decoded as predicted, or as labelled)."""
    k = t.objects
    found = model(xs)
    preds = found.top(k).sort(dim=1).values  # (n, k) ascending: the caption's order is the colours' order
    decoded = labels.to(xs.device).sort(dim=1).values if as_label and labels is not None else preds
    recon = model.reconstruct(found.capsules, decoded)  # (n, k, C, H, W)
    wrong = [False] * len(xs) if labels is None else (~all_right(labels.to(preds.device), preds)).tolist()
    tiles = list(canvas.to_uint8(xs)) + list(canvas.colour_overlay(xs, recon, PAIR_COLOURS[:k]))
    img = canvas.grid(tiles, len(xs), scale=2, marked=wrong + wrong)
    cells = ["L:" + _pair(t.classes, lab.sort().values) for lab in labels] if labels is not None \
        else ["L:?"] * len(xs)
    cells += [("L:" if as_label else "R:") + _pair(t.classes, d) + ("*" if w else "")
              for d, w in zip(decoded, wrong, strict=True)]
    colors = [(0, 0, 0)] * len(xs) + [canvas.RED if w else (0, 0, 0) for w in wrong]
    pic = canvas.label_grid(img, 2, len(xs), ["input", "decoded"], None, cell_labels=cells, label_colors=colors)
    lines = [title, "decoded: the pair's first digit in red, its second in green, input in grey"]
    out.publish(canvas.caption_above(pic, lines), name, key=key)
