"""Looking inside a trained model: filters, feature maps, routing, saliency, and the
images that excite a unit most. Functions return tensors; `capsx.inspection` draws them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capsx.errors import CapsxError
from capsx.models.capsnet import CapsNet
from capsx.models.routing import RoutingTrace


def named_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every named submodule (the names `--layer` takes)."""
    return {name: m for name, m in model.named_modules() if name}


def conv_layers(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def get_layer(model: nn.Module, name: str | None, kind: str = "layer",
              convs_only: bool = False) -> tuple[str, nn.Module]:
    layers: dict[str, nn.Module] = dict(conv_layers(model)) if convs_only else named_layers(model)
    if name is None:
        first = next(iter(conv_layers(model).items()), None)
        if first is None:
            raise CapsxError(f"this model has no conv layer; --layer: expected one of: {', '.join(layers)}")
        return first
    if name not in layers:
        raise CapsxError(f"--layer {name!r}: no such {kind}; expected one of: {', '.join(layers)}")
    return name, layers[name]


def filter_images(conv: nn.Conv2d, in_channel: int | None = None) -> Tensor:
    """A conv layer's kernels as images: (O, kh, kw) for one input channel (or grey input),
    (O, 3, kh, kw) for RGB input, and for many input channels the mean |w| over them."""
    w = conv.weight.detach().float().cpu()  # (O, I, kh, kw)
    if in_channel is not None:
        if not 0 <= in_channel < w.shape[1]:
            raise CapsxError(f"--in-channel {in_channel}: out of range; this layer has {w.shape[1]} input channels")
        return w[:, in_channel]
    if w.shape[1] == 1:
        return w[:, 0]
    if w.shape[1] == 3:
        return w
    return w.abs().mean(dim=1)


@contextmanager
def _capture(module: nn.Module) -> Iterator[list[Tensor]]:
    seen: list[Tensor] = []

    def hook(mod: nn.Module, inputs: object, output: object) -> None:
        seen.append(output[0] if isinstance(output, tuple) else output)  # type: ignore[arg-type]

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


LAYER_CHUNK = 256  # images per forward in `layer_output`, or fewer where the model encodes fewer at once


class _Reached(Exception):
    """Raised by `layer_output`'s hook: the layer asked for has run, the rest of the forward is not needed."""


@torch.no_grad()
def layer_output(model: nn.Module, layer: nn.Module, x: Tensor) -> Tensor:
    """The output of `layer` for input batch x. The forward stops there (for Conv1 of the paper's CapsNet
    the routing and the decoder, nearly all of its cost, never run). Taken as many images at a time as
    the model encodes at once (`inference_chunk`), so that the layer's output for all of them comes
    before any of the rest of the forward; the hook stops it once every image has passed the layer."""
    chunk = min(LAYER_CHUNK, getattr(model, "inference_chunk", LAYER_CHUNK))
    if len(x) > chunk:
        return torch.cat([layer_output(model, layer, part) for part in x.split(chunk)])
    seen: list[Tensor] = []

    def hook(mod: nn.Module, inputs: object, output: object) -> None:
        seen.append(output[0] if isinstance(output, tuple) else output)  # type: ignore[arg-type]
        if sum(len(t) for t in seen) >= len(x):
            raise _Reached

    handle = layer.register_forward_hook(hook)
    try:
        model(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    assert seen, "the layer did not run"
    return torch.cat(seen) if len(seen) > 1 else seen[0]


def _capsnet(model: nn.Module, what: str) -> CapsNet:
    if not isinstance(model, CapsNet):
        raise CapsxError(f"{what} needs a CapsNet (its primary-capsule grid); this run's model is "
                         f"{type(model).__name__}")
    return model


@torch.no_grad()
def primary_capsule_lengths(model: nn.Module, x: Tensor) -> Tensor:
    """|u_i| of every primary capsule of one input, as (types, grid_h, grid_w)."""
    caps = _capsnet(model, "primary capsule lengths")
    u = caps.primary_caps(F.relu(caps.conv1(x[:1])))  # (1, I, d)
    return u.norm(dim=-1).view(*caps.primary_grid)


def routing_of(model: nn.Module) -> str:
    """The routing algorithm of a CapsNet's class capsules (`model.routing`)."""
    return str(_capsnet(model, "routing").class_caps.routing)


@torch.no_grad()
def routing_maps(model: nn.Module, x: Tensor) -> tuple[Tensor, list[float]]:
    """Coupling coefficients of one input per routing iteration, (iters, J, types, gh, gw),
    and the mean |change| of the routing logits b_ij at each iteration."""
    caps = _capsnet(model, "routing")
    trace = RoutingTrace()
    caps.encode(x[:1], trace=trace)
    c = torch.stack([t[0] for t in trace.couplings])  # (iters, I, J)
    iters, _, J = c.shape
    return c.permute(0, 2, 1).reshape(iters, J, *caps.primary_grid), trace.mean_abs_delta_b


def integrated_gradients(model: nn.Module, x: Tensor, cls: int, steps: int = 32,
                         baseline: Tensor | None = None) -> Tensor:
    """Integrated gradients of class score `cls` for one input (1, C, H, W), against a black
    baseline; returns (C, H, W). The attributions sum to score(x) - score(baseline) up to
    the Riemann error of `steps` midpoints."""
    base = torch.zeros_like(x[:1]) if baseline is None else baseline
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    path = (base + alphas.view(-1, 1, 1, 1) * (x[:1] - base)).requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        scores = model(path).scores[:, cls]
        (grads,) = torch.autograd.grad(scores.sum(), path)
    finally:
        model.train(was_training)
    return ((x[:1] - base) * grads.mean(dim=0, keepdim=True))[0].detach()


def grad_cam(model: nn.Module, layer: nn.Module, x: Tensor, cls: int) -> Tensor:
    """Grad-CAM of class score `cls` at a conv layer, upsampled to the input's size: (H, W) in [0, 1]."""
    was_training = model.training
    model.eval()
    try:
        with _capture(layer) as seen:
            out = model(x[:1])
        fmap = seen[0]
        if fmap.dim() != 4:
            raise CapsxError("--layer for Grad-CAM must be a conv layer (its output a feature map)")
        (grads,) = torch.autograd.grad(out.scores[0, cls], fmap)
    finally:
        model.train(was_training)
    weights = grads.mean(dim=(2, 3), keepdim=True)  # (1, C, 1, 1): channel importance
    cam = F.relu((weights * fmap).sum(dim=1, keepdim=True))  # (1, 1, h, w)
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    return (cam / cam.max().clamp(min=1e-12)).detach()


@torch.no_grad()
def unit_scores(model: nn.Module, layer: nn.Module, images: Tensor, channel: int, batch: int = 500) -> Tensor:
    """How strongly each image drives one unit: the spatial max of a feature-map channel,
    or, for a capsule layer's (B, N, D) output, the length of capsule `channel`
    (for PrimaryCaps, the longest capsule of type `channel` over the grid)."""
    scores = []
    for i in range(0, len(images), batch):
        out = layer_output(model, layer, images[i:i + batch])
        if out.dim() == 4:
            if not 0 <= channel < out.shape[1]:
                raise CapsxError(f"--channel {channel}: out of range; this layer has {out.shape[1]} channels")
            scores.append(out[:, channel].amax(dim=(1, 2)))
        elif out.dim() == 3:  # capsules (B, N, D)
            lengths = out.norm(dim=-1)
            grid = model.primary_grid if isinstance(model, CapsNet) else None
            if grid is not None and out.shape[1] == grid[0] * grid[1] * grid[2]:
                lengths = lengths.view(len(out), grid[0], -1).amax(dim=2)  # per capsule type
            if not 0 <= channel < lengths.shape[1]:
                raise CapsxError(f"--channel {channel}: out of range; this layer has {lengths.shape[1]} capsule "
                                 "types" if grid else "capsules")
            scores.append(lengths[:, channel])
        else:
            scores.append(out.reshape(len(out), -1)[:, channel])
    return torch.cat(scores)
