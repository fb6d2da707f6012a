"""`capsx visualize`: inside a trained model: a conv layer's filters, a layer's activations, the routing's
coupling coefficients, saliency maps, and the test images that drive a unit most."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from capsx.errors import CapsxError
from capsx.jobs.pictures import Gallery, one_input
from capsx.jobs.trained import TrainedRun
from capsx.models.capsnet import CapsNet
from capsx.models.capsule_classifier import CapsuleClassifier
from capsx.pictures import canvas, inside


def run_filters(t: TrainedRun, out: Gallery, *, layer: str | None, in_channel: int | None) -> None:
    name, conv = inside.get_layer(t.model, layer, "conv layer", convs_only=True)
    assert isinstance(conv, nn.Conv2d)
    kernels = inside.filter_images(conv, in_channel)
    tiles = canvas.to_uint8(kernels, per_image=True)
    cols = canvas.grid_columns(len(tiles))
    scale = max(1, 48 // max(kernels.shape[-1], 1))
    img = canvas.grid(list(tiles), cols, scale=scale)
    how = (f"input channel {in_channel}" if in_channel is not None else
           "mean |w| over input channels" if conv.in_channels not in (1, 3) else "each filter normalised")
    pic = canvas.caption_above(img, [f"{name}: {conv.out_channels} filters of {conv.kernel_size[0]}x"
                                     f"{conv.kernel_size[1]} ({how})"])
    out.publish(pic, f"filters_{name}.png", key=f"filters/{name}")
    out.report()


def run_activations(t: TrainedRun, out: Gallery, *, layer: str | None, index: int, image: Path | None) -> None:
    x, what, _ = one_input(t, index, image)
    name, module = inside.get_layer(t.model, layer)
    maps = inside.layer_output(t.model, module, x)[0]
    if maps.dim() == 3:
        top = float(maps.max().clamp(min=0))
        fmap = maps / max(top, 1e-12)  # one scale for the layer: dead channels stay black
        tiles = canvas.to_uint8(fmap)
        img = canvas.grid(list(tiles), canvas.grid_columns(len(tiles)), scale=max(1, 56 // max(maps.shape[-1], 1)))
        dead = int((maps.flatten(1).amax(dim=1) <= 0).sum())
        pic = canvas.with_colour_bar(img, 0.0, top, f"{name} output, one scale for all channels (negative: black)",
                                     kind="grey")
        pic = canvas.caption_above(pic, [f"{name} on {what}: {maps.shape[0]} channels ({dead} dead: black)"])
        out.publish(pic, f"activations_{name}.png", key=f"activations/{name}")
    else:
        out.say(f"[dim]{name} outputs {tuple(maps.shape)}, not feature maps; see the capsule lengths[/]")
    if isinstance(t.model, CapsNet):
        lengths = inside.primary_capsule_lengths(t.model, x).cpu()  # (types, gh, gw), in [0, 1)
        # one scale for all types, from the shortest capsule to the longest: squashed lengths often sit close
        # together near 1, which on a 0..1 scale would all read white
        lo, hi = float(lengths.min()), float(lengths.max())
        types = len(lengths)
        cols = canvas.grid_columns(types)
        img = canvas.grid([canvas.heat(m) for m in ((lengths - lo) / max(hi - lo, 1e-12)).numpy()], cols, scale=8)
        pic = canvas.label_grid(img, -(-types // cols), cols, cell_labels=[f"type {k}" for k in range(types)])
        pic = canvas.with_colour_bar(pic, lo, hi, "capsule length |u_i|, one scale for all types")
        pic = canvas.caption_above(pic, [f"primary capsule lengths on {what}: {types} capsule types, each over "
                                         f"the {lengths.shape[1]}x{lengths.shape[2]} grid"])
        out.publish(pic, "activations_primary_lengths.png", key="activations/primary_lengths")
    out.report()


def run_routing(t: TrainedRun, out: Gallery, *, index: int, image: Path | None) -> list[float]:
    x, what, _ = one_input(t, index, image)
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
    routing = inside.routing_of(t.model)
    rows = ([f"iteration {r + 1}" for r in range(iters)] if routing in ("dynamic", "leaky")
            else [{"none": "no routing", "attention": "self-attention"}.get(routing, routing)])
    start = 1 / (J + 1) if routing == "leaky" else 1 / J  # the couplings before any agreement
    pic = canvas.label_grid(img, iters, J, rows, columns)
    pic = canvas.with_colour_bar(pic, lo, hi, f"coupling c_ij, one scale for all maps (uniform: {start:.3f})",
                                 spec=".3f")
    pred = int(t.model(x).prediction[0])
    lines = [f"{routing} routing: coupling coefficients c_ij on {what} (predicted {t.classes[pred]}): at each "
             "grid position, the mean over capsule types weighted by |u_i|"]
    if routing in ("dynamic", "leaky"):
        lines.append("mean |delta b_ij| per iteration: " + ", ".join(f"{d:.4f}" for d in delta_b))
    pic = canvas.caption_above(pic, lines)
    out.publish(pic, "routing_couplings.png", key="routing/couplings")
    if routing in ("dynamic", "leaky"):
        out.log_metrics({f"routing/inspect_delta_b_iter{r + 1}": d for r, d in enumerate(delta_b)})
        out.say("mean |delta b_ij| per routing iteration: " + ", ".join(f"{d:.5f}" for d in delta_b))
    out.report()
    return delta_b


def run_saliency(t: TrainedRun, out: Gallery, *, index: int, image: Path | None, cls: int | None, method: str,
                 layer: str | None, steps: int) -> None:
    x, what, label = one_input(t, index, image)
    with torch.no_grad():
        pred = int(t.model(x).prediction[0])
    target = pred if cls is None else cls
    if not 0 <= target < len(t.classes):
        raise CapsxError(f"--class {target}: out of range; this model has {len(t.classes)} classes")
    if method == "integrated-gradients":
        attr = inside.integrated_gradients(t.model, x, target, steps=steps).sum(dim=0)  # (H, W)
        pos = attr.clamp(min=0)
        top = float(pos.max())
        heat = pos / max(top, 1e-12)
        note = f"integrated gradients ({steps} steps, black baseline), positive part"
        scale = "attribution per pixel (saliency and overlay)"
    else:
        name, module = inside.get_layer(t.model, layer)
        heat = inside.grad_cam(t.model, module, x, target)
        top = 1.0
        note = f"Grad-CAM at {name}"
        scale = "Grad-CAM over its largest value (saliency and overlay)"
    base = canvas.to_uint8(x)[0]
    base_rgb = np.repeat(base[..., None], 3, -1) if base.ndim == 2 else base
    overlay = (0.5 * base_rgb + 0.5 * canvas.heat(heat.cpu().numpy())).astype(np.uint8)
    img = canvas.grid([base_rgb, canvas.heat(heat.cpu().numpy()), overlay], 3, scale=6)
    pic = canvas.label_grid(img, 1, 3, None, ["input", "saliency", "overlay"])
    pic = canvas.with_colour_bar(pic, 0.0, top, scale)
    score = "capsule length" if isinstance(t.model, CapsuleClassifier) else "logit"
    pic = canvas.caption_above(pic, [f"what drives class {t.classes[target]} ({score}) on {what}"
                                     + (f", label {t.classes[label]}" if label is not None else "")
                                     + f", predicted {t.classes[pred]}", note])
    out.publish(pic, f"saliency_{method}_class{target}.png", key=f"saliency/class{target}")
    out.report()


def run_top_activating(t: TrainedRun, out: Gallery, *, layer: str | None, channel: int, k: int, limit: int) -> None:
    name, module = inside.get_layer(t.model, layer)
    test = t.test_set(limit)
    scores = inside.unit_scores(t.model, module, t.inputs(test.images), channel)
    top = scores.topk(min(k, len(scores)))
    idx = top.indices.cpu()
    tiles = canvas.to_uint8(t.inputs(test.images[idx]))
    cols = min(len(idx), 8)
    img = canvas.grid(list(tiles), cols, scale=2)
    rows = -(-len(idx) // cols)
    pic = canvas.label_grid(img, rows, cols, None, None,
                            cell_labels=[f"#{i}\n{v:.2f}" for i, v in zip(idx.tolist(), top.values.tolist(),
                                                                           strict=True)])
    pic = canvas.caption_above(pic, [f"the {len(idx)} of {len(test)} test images that drive {name} "
                                     f"unit {channel} most (test index and score under each)"])
    out.say(f"{name} unit {channel}, its top {len(idx)} of the first {len(test)} test images (index: score): "
            + ", ".join(f"{i}: {v:.3f}" for i, v in zip(idx.tolist(), top.values.tolist(), strict=True)),
            soft_wrap=True)
    out.publish(pic, f"top_{name}_{channel}.png", key=f"top_activating/{name}_{channel}")
    out.report()


Job = Callable[[TrainedRun, Gallery], object]  # one picture command's call, its options fixed


def first_layer_jobs() -> list[Job]:
    """The first conv layer's filters, and its activations on test #0 (a CapsNet's primary-capsule lengths too)."""
    return [lambda t, out: run_filters(t, out, layer=None, in_channel=None),
            lambda t, out: run_activations(t, out, layer=None, index=0, image=None)]


def every_visualization(model: nn.Module) -> list[Job]:
    """`capsx visualize` with no subcommand: each of its pictures with the defaults (routing for a CapsNet)."""
    jobs = first_layer_jobs()
    if isinstance(model, CapsNet):
        jobs.append(lambda t, out: run_routing(t, out, index=0, image=None))
    return [*jobs, lambda t, out: run_saliency(t, out, index=0, image=None, cls=None, method="integrated-gradients",
                                               layer=None, steps=32),
            lambda t, out: run_top_activating(t, out, layer=None, channel=0, k=16, limit=2000)]
