"""What the training loop carries from step to step (`TrainState`, with the running sums of the epoch
in progress), saved in every checkpoint so a resumed run continues exactly."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from capsx.models import ModelOutput
from capsx.train.distributed import Group
from capsx.train.losses import LossTerms
from capsx.train.metrics import EvalResult, all_right, predict

MISTAKES_KEPT = 100  # test mistakes a checkpoint names (its count is in the metrics)


@dataclass
class EpochTotals:
    """Running sums over the training steps of one epoch."""

    steps: int = 0
    images: int = 0
    correct: int = 0
    sums: dict[str, float] = field(default_factory=dict)  # per-image loss terms, summed
    seconds: float = 0.0
    data_seconds: float = 0.0  # time spent waiting for batches

    def add(self, images: int, loss: float, parts: dict[str, float], correct: int, seconds: float,
            data_seconds: float) -> None:
        """One step's readings: its mean loss, each loss part summed over its images, its right answers."""
        self.sums["loss"] = self.sums.get("loss", 0.0) + loss * images
        for name, total in parts.items():
            self.sums[name] = self.sums.get(name, 0.0) + total
        self.correct += correct
        self.images += images
        self.steps += 1
        self.seconds += seconds
        self.data_seconds += data_seconds

    def reduced(self, group: Group) -> EpochTotals:
        """The sums over every process (time is this process's: they run in step)."""
        names = sorted(self.sums)
        values = group.sum_floats([self.images, self.correct, *(self.sums[k] for k in names)])
        return EpochTotals(self.steps, int(values[0]), int(values[1]), dict(zip(names, values[2:], strict=True)),
                           self.seconds, self.data_seconds)

    def mean(self, name: str) -> float:
        return self.sums.get(name, 0.0) / max(1, self.images)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.images)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class PendingSteps:
    """Training steps whose loss and right answers are still on the device, read all at once.

    Reading a number off a GPU waits for every kernel queued before it (a sync), and the CPU then has
    nothing queued for the GPU to work on while it prepares the next step; reading four numbers a step
    (the loss, each loss part, the right answers) would stall a GPU four times a step. So each step
    leaves one small vector on the device and `read` copies every step's vector in one transfer, then
    adds them to the totals one step at a time, exactly as reading each step would (the sums are the
    same to the bit, however many steps a read covers)."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []
        self.host: list[tuple[int, int, float, float]] = []  # per step: images, global step, seconds, data wait
        self.names: list[str] = []
        self.reads = 0  # how many times the device was waited for

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, terms: LossTerms, out: ModelOutput, labels: torch.Tensor, global_step: int,
            seconds: float, data_seconds: float) -> None:
        """Keep one step's readings on the device."""
        self.names = list(terms.parts)
        right = all_right(labels, predict(out, labels)).sum()
        row = [terms.total.detach().float(), *(p.detach().float().sum() for p in terms.parts.values()),
               right.float()]  # fp32 holds every count a batch can have exactly
        self.rows.append(torch.stack(row))
        self.host.append((len(labels), global_step, seconds, data_seconds))

    def read(self, totals: EpochTotals) -> tuple[float, int] | None:
        """Add the pending steps to `totals`; (the last step's mean loss, its global step), or None if
        none was pending. A step whose loss is not finite stops the read there and is returned."""
        if not self.rows:
            return None
        values = torch.stack(self.rows).tolist()  # the one wait for the device
        self.reads += 1
        rows, host, self.rows, self.host = values, self.host, [], []
        last = (0.0, 0)
        for (loss, *parts, right), (images, step, seconds, data_seconds) in zip(rows, host, strict=True):
            last = (loss, step)
            if not math.isfinite(loss):
                break
            totals.add(images, loss, dict(zip(self.names, parts, strict=True)), int(right), seconds, data_seconds)
        return last


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress (0-based)
    epoch_step: int = 0  # steps of `epoch` already taken
    global_step: int = 0
    best_error: float | None = None
    best_epoch: int | None = None
    best_loss: float | None = None  # the test loss at the best epoch: breaks ties of the error
    bad_epochs: int = 0  # epochs since the best test error (early stopping)
    totals: EpochTotals = field(default_factory=EpochTotals)
    history: list[dict[str, float]] = field(default_factory=list)  # one row of metrics per epoch
    # The first test examples the last evaluation got wrong (indices in the test split): what `reconstruct`
    # draws, and how a checkpoint shows its mistakes without evaluating again. None: not recorded.
    test_mistakes: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def end_epoch(self, metrics: dict[str, float], final: EvalResult) -> bool:
        """Close the epoch in progress: its metrics into the history, its first mistakes, the best test
        error and the epochs since it (early stopping). True if the error improved, or stayed and the test
        loss fell (a model at 0 errors keeps improving: its reconstructions and poses sharpen)."""
        epoch, error, loss = self.epoch + 1, final.error, final.loss
        self.history.append({"epoch": epoch, **metrics})
        if final.mistakes is not None:
            self.test_mistakes = final.mistakes[:MISTAKES_KEPT].tolist()
        improved = self.best_error is None or error < self.best_error or (
            error == self.best_error and (self.best_loss is None or loss < self.best_loss))
        if improved:
            self.best_error, self.best_epoch, self.best_loss, self.bad_epochs = error, epoch, loss, 0
        else:
            self.bad_epochs += 1
        self.epoch, self.epoch_step, self.totals = epoch, 0, EpochTotals()
        return improved

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        """Keys a checkpoint lacks keep their defaults (a weights-only file may hold just the epoch)."""
        return cls(**{**d, "totals": EpochTotals(**d.get("totals", {}))})
