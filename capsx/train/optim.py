"""Optimisers (a registry) and learning-rate schedules (pure functions of the step).

A schedule is a function of the global step rather than a stateful scheduler
object, so a resumed run needs nothing but its step count to continue exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from capsx.registry import Registry
from capsx.schema import Section

OptimizerName = Literal["sgd", "adam", "adadelta", "adagrad", "rmsprop"]


class OptimizerConfig(Section):
    name: OptimizerName = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)  # sgd and rmsprop
    nesterov: bool = False  # sgd
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2)  # adam
    eps: float = Field(1e-8, gt=0)  # adam, adadelta, adagrad, rmsprop


Params = Iterable[nn.Parameter] | list[dict[str, Any]]  # parameters, or torch's parameter groups
Builder = Callable[[Params, OptimizerConfig], torch.optim.Optimizer]
OPTIMIZERS: Registry[Builder] = Registry("optimizer")


@OPTIMIZERS.register("sgd")
def _sgd(params: Params, c: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay)


FUSED_DEVICES = ("cpu", "cuda")  # where torch has a fused (one kernel per tensor) Adam


def _fusable(params: list[Any]) -> bool:
    """Every parameter a floating-point tensor on a device with a fused Adam."""
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    return bool(tensors) and all(t.is_floating_point() and t.device.type in FUSED_DEVICES for t in tensors)


@OPTIMIZERS.register("adam")
def _adam(params: Params, c: OptimizerConfig) -> torch.optim.Optimizer:
    """Fused where torch has it: on the CPU its default is a Python loop of small ops per tensor, several
    times slower for a model of many parameters (the baseline CNN's 57M)."""
    b1, b2 = c.betas
    listed: list[Any] = list(params)
    return torch.optim.Adam(listed, lr=c.lr, betas=(b1, b2), eps=c.eps, weight_decay=c.weight_decay,
                            fused=_fusable(listed) or None)


@OPTIMIZERS.register("adadelta")
def _adadelta(params: Params, c: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.Adadelta(params, lr=c.lr, eps=c.eps, weight_decay=c.weight_decay)


@OPTIMIZERS.register("adagrad")
def _adagrad(params: Params, c: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(params, lr=c.lr, eps=c.eps, weight_decay=c.weight_decay)


@OPTIMIZERS.register("rmsprop")
def _rmsprop(params: Params, c: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(params, lr=c.lr, momentum=c.momentum, eps=c.eps, weight_decay=c.weight_decay)


def build_optimizer(params: Params, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(cfg.name)(params, cfg)


class ScheduleConfig(Section):
    """The learning rate as a multiple of `optimizer.lr`, a function of the global step.

    exponential: lr * gamma ** (step / decay_steps), after a linear warm-up (the
    paper's code: gamma 0.96 every 2000 steps). cosine: warm-up, then half a cosine
    down to `final_fraction` at the last step. constant: lr throughout.
    """

    name: Literal["constant", "exponential", "cosine"] = "exponential"
    gamma: float = Field(0.96, gt=0, le=1)
    decay_steps: int = Field(2000, ge=1)
    warmup_steps: int = Field(0, ge=0)
    final_fraction: float = Field(0.0, ge=0, le=1)


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """The multiplier of the base learning rate at 0-based `step` of `total_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "exponential":
        return cfg.gamma ** (step / cfg.decay_steps)
    if cfg.name == "cosine":
        span = max(1, total_steps - cfg.warmup_steps - 1)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.final_fraction + (1 - cfg.final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate, times each parameter group's `lr_factor` (pretrained layers' lower rate)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_factor", 1.0)
