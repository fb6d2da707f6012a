"""Transfer learning: start from trained weights, freeze the first layers, replace the head.

The three usual cases are one mechanism: fine-tune everything at a low
learning rate (`pretrained_lr_factor`), freeze the first k layers and retrain
the rest (`freeze: k`), or keep the whole network as a fixed feature extractor
and train only a new classifier (`freeze: -1`, `head: replace`).

A *layer*, for `freeze: N`, is one entry of `freeze_layers(model)`: the
model's parameterised child modules in order, looking inside plain
`nn.Sequential` containers, with a normalisation layer counted as part of the
layer before it (a conv and its batch norm are one layer). So VGG-16 has its
16 weight layers, AlexNet its 8, ResNet-18 10 (the stem, the 8 residual blocks,
fc), DenseNet-121 9 (stem, 4 dense blocks, 3 transitions, classifier).
`capsx summary` lists them.

The *head* is every parameter whose shape depends on the number of classes
(found by building the model for one more class on the meta device), so it
needs no per-model declaration: VGG's last linear layer, ResNet's fc,
CapsNet's class capsules and the decoder's first layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from capsx.errors import CapsxError, RunError
from capsx.models.config import ModelConfig
from capsx.train.checkpoint import is_checkpoint, read_weights_file

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def freeze_layers(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """The layers `freeze: N` counts, in order: (name, modules) per layer."""
    layers: list[tuple[str, list[nn.Module]]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if type(child) is nn.Sequential:  # a plain container, not a block that subclasses it
                visit(f"{full}.", child)
            elif not any(True for _ in child.parameters()):
                continue
            elif isinstance(child, _NORMS) and layers:
                layers[-1][1].append(child)
            else:
                layers.append((full, [child]))

    visit("", model)
    return layers


def head_parameter_names(cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> set[str]:
    """Names of the parameters whose shapes change with the number of classes."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        a = dict(cfg.build(input_shape, num_classes).named_parameters())
        b = dict(cfg.build(input_shape, num_classes + 1).named_parameters())
    return {k for k in a if k not in b or a[k].shape != b[k].shape}


@dataclass
class TransferSetup:
    """What `prepare_transfer` did: the optimizer's parameter groups and the counts to log."""

    param_groups: list[dict[str, Any]]
    trainable: int  # parameters (elements) the optimizer updates
    frozen: int
    loaded: list[str] = field(default_factory=list)  # tensors taken from the pretrained file
    unused: list[str] = field(default_factory=list)  # tensors in the file the model has no use for

    def facts(self) -> dict[str, Any]:
        """MLflow tags: facts of the model, not settings."""
        out: dict[str, Any] = {"model.trainable_params": self.trainable, "model.frozen_params": self.frozen}
        if self.loaded:
            out.update({"model.pretrained_tensors": len(self.loaded), "model.pretrained_unused": len(self.unused)})
        return out


def prepare_transfer(model: nn.Module, cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int,
                     *, load: bool = True) -> TransferSetup:
    """Load `cfg.pretrained` (unless `load` is False: a resumed run has its own weights), freeze
    `cfg.freeze`, and split the rest into the optimizer's parameter groups."""
    class_dependent = head_parameter_names(cfg, input_shape, num_classes) if cfg.pretrained else set()
    head = class_dependent if cfg.head == "replace" else set()
    loaded: list[str] = []
    unused: list[str] = []
    if cfg.pretrained is not None and load:
        loaded, unused = load_pretrained(model, Path(cfg.pretrained), skip=head, head=class_dependent)
    frozen = _freeze(model, cfg.freeze)
    if head & frozen:
        raise CapsxError(f"model.freeze: {cfg.freeze} would freeze the new head ({', '.join(sorted(head & frozen))}), "
                         "which then could never learn; freeze fewer layers")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise CapsxError(f"model.freeze: {cfg.freeze} freezes every parameter; nothing would train")
    pretrained = cfg.pretrained is not None
    factor = cfg.pretrained_lr_factor
    groups = [
        {"params": [p for n, p in named if pretrained and n not in head], "lr_factor": factor},
        {"params": [p for n, p in named if not pretrained or n in head], "lr_factor": 1.0},
    ]
    groups = [g for g in groups if g["params"]]
    trainable = sum(p.numel() for _, p in named)
    total = sum(p.numel() for p in model.parameters())
    return TransferSetup(groups, trainable, total - trainable, loaded, unused)


def check_transfer(cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> None:
    """Refuse now what `prepare_transfer` would refuse at the start of training (an unreadable or
    ill-fitting file, a bad freeze), on a shapes-only (meta device) model: before a run exists."""
    if cfg.pretrained is None and cfg.freeze == 0:
        return
    with torch.device("meta"):
        model = cfg.build(input_shape, num_classes)
    prepare_transfer(model, cfg, input_shape, num_classes)


def _freeze(model: nn.Module, freeze: int | list[str]) -> set[str]:
    """Set requires_grad False on the frozen parameters; returns their names."""
    layers = freeze_layers(model)
    names = [n for n, _ in layers]
    if isinstance(freeze, int):
        if abs(freeze) > len(layers):
            raise CapsxError(f"model.freeze: {freeze}, but this model has {len(layers)} layers: "
                             f"{', '.join(names)}")
        modules = [m for _, ms in layers[:freeze] for m in ms]
    else:
        by_name = dict(model.named_modules())
        valid = list(dict.fromkeys([n for n, m in model.named_children() if any(True for _ in m.parameters())]
                                   + names))
        modules = []
        for name in freeze:
            module = by_name.get(name)
            if module is None or not any(True for _ in module.parameters()):
                raise CapsxError(f"model.freeze: {name!r} is not a module with parameters; expected one of: "
                                 f"{', '.join(valid)} (or a module inside them, as `capsx summary` names it)")
            modules.append(module)
    frozen = {id(p) for m in modules for p in m.parameters()}
    out = set()
    for n, p in model.named_parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
            out.add(n)
    return out


def read_state_dict(path: Path) -> tuple[dict[str, Tensor], str]:
    """The weights in a capsx checkpoint or a plain state dict (torchvision's .pth files), and
    what the file was (for messages)."""
    payload = read_weights_file(path, what="weights file")
    if is_checkpoint(payload):
        state = payload.get("model")
        model = payload.get("recipe", {}).get("model", {}).get("name", "?")
        what = f"a capsx checkpoint of {model}"
    else:
        state, what = payload, "a state dict"
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise RunError(f"model.pretrained: {path}: expected a capsx checkpoint or a state dict "
                       "(parameter names -> tensors, as torch.save(model.state_dict()) writes)")
    return state, what


def load_pretrained(model: nn.Module, path: Path, skip: set[str], head: set[str]) -> tuple[list[str], list[str]]:
    """Copy the file's tensors into `model`, all of them but `skip` (a replaced head). Any tensor of
    the model the file lacks, or has in another shape, is an error naming them (`head`: the
    class-dependent names, for advice). Returns the names loaded and the file's names the model
    has no use for."""
    try:
        state, what = read_state_dict(path)
    except RunError as e:
        msg = str(e)
        raise RunError(msg if msg.startswith("model.pretrained") else f"model.pretrained: {msg}") from None
    own = model.state_dict()
    wanted = [k for k in own if k not in skip]
    missing = [k for k in wanted if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here"
             for k in wanted if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        problems = ([f"missing {_some(missing)}"] if missing else []) + ([f"shape {_some(wrong)}"] if wrong else [])
        advice = ("; to train a new classifier for this data set's classes set model.head: replace"
                  if any(k.split(" ")[0] in head for k in missing + wrong) else "")
        raise RunError(f"model.pretrained: {path} ({what}) does not fit this model: "
                       f"{'; '.join(problems)}{advice}")
    with torch.no_grad():
        for k in wanted:
            own[k].copy_(state[k])  # state_dict() tensors share storage with the model's
    unused = [k for k in state if k not in own]
    return wanted, unused


def _some(items: list[str], shown: int = 4) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more
