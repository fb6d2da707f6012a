"""`capsx summary`: a per-layer table (name, type, output shape, parameters) like Keras'
`model.summary()`, plus the forward cost per image."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int


@dataclass
class ModelSummary:
    layers: list[LayerRow]
    total_params: int
    trainable_params: int
    decoder_params: int  # parameters of a `decoder` submodule (0 if none)
    forward_flops: int  # per image


def _is_layer(module: nn.Module) -> bool:
    """A row of the table: a leaf module, or a block that marks itself as one layer."""
    return not any(True for _ in module.children()) or getattr(module, "summary_as_layer", False)


def summarize(model: nn.Module, input_shape: tuple[int, int, int]) -> ModelSummary:
    rows: list[LayerRow] = []
    hooks = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if _is_layer(child):
                hooks.append(child.register_forward_hook(_recorder(full, child, rows)))
            else:
                visit(full, child)

    visit("", model)
    x = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as flops:
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    params = list(model.parameters())
    decoder = getattr(model, "decoder", None)
    return ModelSummary(
        layers=rows,
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        decoder_params=sum(p.numel() for p in decoder.parameters()) if isinstance(decoder, nn.Module) else 0,
        forward_flops=int(flops.get_total_flops()),
    )


def _recorder(name: str, module: nn.Module, rows: list[LayerRow]):  # type: ignore[no-untyped-def]
    def hook(mod: nn.Module, inputs: object, output: object) -> None:
        out = output[0] if isinstance(output, tuple) else output
        shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else ()
        rows.append(LayerRow(name, type(mod).__name__, shape, sum(p.numel() for p in mod.parameters())))

    return hook
