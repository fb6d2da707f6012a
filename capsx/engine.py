"""The training loop. `fit` reads top to bottom: build, then per epoch
`train_one_epoch`, `evaluate`, log, checkpoint.

Everything the loop carries from step to step lives in `TrainState`, which
goes into every checkpoint; with the data order and shifts seeded by
(seed, epoch, step) and the RNG state saved, a run resumed from any step
continues exactly as if it had not stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from capsx import memory
from capsx.checkpoint import save_checkpoint
from capsx.data import Batches, DataSplits
from capsx.device import autocast, eval_mode
from capsx.errors import CapsxError, RunError
from capsx.interrupt import StopRequest
from capsx.losses import LossTerms
from capsx.metrics import EvalResult, confusion_matrix
from capsx.models import ModelOutput, build_model
from capsx.models.transfer import prepare_transfer
from capsx.optim import build_optimizer, lr_factor, set_lr
from capsx.recipe import Recipe


class Tracker(Protocol):
    run_id: str

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...


class Reporter(Protocol):
    """What the loop tells the user; the CLI's is a Rich progress bar."""

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None: ...
    def step(self, totals: EpochTotals, lr: float) -> None: ...
    def epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...


class QuietReporter:
    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None: ...
    def step(self, totals: EpochTotals, lr: float) -> None: ...
    def epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...


class Criterion(Protocol):
    def __call__(self, out: ModelOutput, images: torch.Tensor, labels: torch.Tensor) -> LossTerms: ...


@dataclass
class EpochTotals:
    """Running sums over the training steps of one epoch."""

    steps: int = 0
    images: int = 0
    correct: int = 0
    sums: dict[str, float] = field(default_factory=dict)  # per-image loss terms, summed
    seconds: float = 0.0
    data_seconds: float = 0.0  # time spent waiting for batches

    def add(self, terms: LossTerms, out: ModelOutput, labels: torch.Tensor) -> float:
        """Accumulate one step; returns the step's mean loss."""
        n = len(labels)
        loss = terms.total.item()
        self.sums["loss"] = self.sums.get("loss", 0.0) + loss * n
        for name, per_sample in terms.parts.items():
            self.sums[name] = self.sums.get(name, 0.0) + per_sample.detach().float().sum().item()
        self.correct += int((out.prediction == labels).sum())
        self.images += n
        self.steps += 1
        return loss

    def mean(self, name: str) -> float:
        return self.sums.get(name, 0.0) / max(1, self.images)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.images)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress (0-based)
    epoch_step: int = 0  # steps of `epoch` already taken
    global_step: int = 0
    best_error: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0  # epochs since the best test error (early stopping)
    totals: EpochTotals = field(default_factory=EpochTotals)
    history: list[dict[str, float]] = field(default_factory=list)  # one row of metrics per epoch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**{**d, "totals": EpochTotals(**d["totals"])})


@dataclass
class FitResult:
    state: TrainState
    final: EvalResult | None
    seconds: float
    stopped_early: bool
    last_checkpoint: Path | None
    best_checkpoint: Path | None


class Interrupted(Exception):
    """Training stopped on a signal after writing `checkpoint`."""

    def __init__(self, signum: int, checkpoint: Path, state: TrainState) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum, self.checkpoint, self.state = signum, checkpoint, state


@dataclass
class Run:
    """What a training run needs beyond the recipe: where, on what, logged how."""

    device: torch.device
    data_root: Path
    run_dir: Path
    tracker: Tracker
    reporter: Reporter = field(default_factory=QuietReporter)


def fit(recipe: Recipe, run: Run, resume: dict[str, Any] | None = None,
        splits: DataSplits | None = None) -> FitResult:
    """Train `recipe` to the end (or early stop); resume from a checkpoint payload if given.
    `splits`: the recipe's data, if the caller loaded it already."""
    t_start = time.perf_counter()
    cfg = recipe.train
    torch.manual_seed(cfg.seed)
    data_cfg = recipe.data
    splits = splits if splits is not None else data_cfg.load_splits(run.data_root)
    model = build_model(recipe.model, data_cfg.input_shape, len(data_cfg.classes))
    # pretrained weights (not on a resume: the checkpoint has newer ones), frozen layers, lr groups
    transfer = prepare_transfer(model, recipe.model, data_cfg.input_shape, len(data_cfg.classes),
                                load=resume is None)
    model.to(run.device)  # parameters keep their identity, so the groups still hold them
    criterion: Criterion = recipe.loss_config
    optimizer = build_optimizer(transfer.param_groups, recipe.optimizer)
    scaler = torch.amp.GradScaler(run.device.type, enabled=cfg.precision == "fp16")
    state = TrainState()
    if resume is None:
        run.tracker.log_params({"model.num_params": sum(p.numel() for p in model.parameters()),
                                **transfer.params()})
    else:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        state = TrainState.from_dict(resume["state"])
        _set_rng_state(resume["rng"])

    check_memory(model, criterion, data_cfg.input_shape, recipe.optimizer.name, run.device,
                  min(data_cfg.batch_size, len(splits.train)))
    train_batches = Batches(splits.train.to(run.device), data_cfg.batch_size, shuffle=True, seed=cfg.seed,
                            shift=data_cfg.augment.shift, max_steps=cfg.max_steps_per_epoch)
    test_batches = Batches(splits.test.to(run.device), data_cfg.eval_batch_size)
    total_steps = len(train_batches) * cfg.epochs

    def lr_at(step: int) -> float:
        return recipe.optimizer.lr * lr_factor(recipe.schedule, step, total_steps)

    def checkpoint(name: str, resumable: bool = True) -> Path:
        """last.pt holds all a resume needs; best.pt only the weights (for eval, pictures, MLflow)."""
        payload = {"recipe": recipe.to_dict(), "run_id": run.tracker.run_id, "model": model.state_dict(),
                   "state": state.to_dict()}
        if resumable:
            payload.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=_get_rng_state())
        return save_checkpoint(run.run_dir / "checkpoints" / name, payload)

    last_path: Path | None = None
    best_path: Path | None = None
    final: EvalResult | None = None
    stopped_early = False
    with StopRequest() as stop:
        while state.epoch < cfg.epochs:
            run.reporter.epoch_start(state.epoch, cfg.epochs, len(train_batches), state.epoch_step)
            done = train_one_epoch(model, train_batches, criterion, optimizer, scaler, state, lr_at,
                                   precision=cfg.precision, device=run.device, stop=stop,
                                   reporter=run.reporter, tracker=run.tracker, log_every=cfg.log_every,
                                   last_good=last_path)
            if not done:
                assert stop.signal is not None
                raise Interrupted(stop.signal, checkpoint("last.pt"), state)

            final = evaluate(model, test_batches, criterion, precision=cfg.precision, device=run.device,
                             classes=splits.classes)
            totals = state.totals
            metrics = {
                "train/loss": totals.mean("loss"),
                **{f"train/{k}": totals.mean(k) for k in totals.sums if k != "loss"},
                "train/acc": totals.accuracy,
                **final.as_metrics("test"),
                "lr": lr_at(max(0, state.global_step - 1)),
                "time/epoch_s": totals.seconds,
                "time/images_per_s": totals.images_per_s,
                "time/data_wait_frac": totals.data_seconds / max(1e-9, totals.seconds),
                **model_diagnostics(model, test_batches.data.images[:DIAGNOSTIC_IMAGES]),
            }
            epoch = state.epoch + 1  # metrics of epoch k are logged at step k
            run.tracker.log_metrics(metrics, step=epoch)
            state.history.append({"epoch": epoch, **metrics})
            improved = state.best_error is None or final.error < state.best_error
            if improved:
                state.best_error, state.best_epoch, state.bad_epochs = final.error, epoch, 0
            else:
                state.bad_epochs += 1
            state.epoch, state.epoch_step, state.totals = epoch, 0, EpochTotals()
            if improved and cfg.checkpoint.best:
                best_path = checkpoint("best.pt", resumable=False)
            if epoch % cfg.checkpoint.every == 0 or epoch == cfg.epochs:
                last_path = checkpoint("last.pt")
            run.reporter.epoch_end(epoch, metrics)
            patience = cfg.early_stopping_patience
            if patience is not None and state.bad_epochs >= patience and state.epoch < cfg.epochs:
                stopped_early = True
                last_path = checkpoint("last.pt")
                break
    if best_path is None and (run.run_dir / "checkpoints" / "best.pt").is_file():
        best_path = run.run_dir / "checkpoints" / "best.pt"  # written before a resume
    return FitResult(state, final, time.perf_counter() - t_start, stopped_early, last_path, best_path)


def train_one_epoch(
    model: nn.Module,
    batches: Batches,
    criterion: Criterion,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    lr_at: Any,
    *,
    precision: str,
    device: torch.device,
    stop: StopRequest,
    reporter: Reporter,
    tracker: Tracker,
    log_every: int,
    last_good: Path | None,
) -> bool:
    """Train from `state.epoch_step` to the end of `state.epoch`. False if a stop was requested."""
    model.train()
    totals = state.totals
    batch_iter = batches.epoch(state.epoch, start_step=state.epoch_step)
    while True:
        t0 = time.perf_counter()
        batch = next(batch_iter, None)
        t1 = time.perf_counter()
        if batch is None:
            return True
        images, labels = batch
        lr = lr_at(state.global_step)
        set_lr(optimizer, lr)
        with autocast(device, precision):
            out = model(images, labels)
            terms = criterion(out, images, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms.total).backward()
        scaler.step(optimizer)
        scaler.update()
        loss = totals.add(terms, out, labels)
        if not math.isfinite(loss):
            kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
            raise RunError(f"the loss became {loss} at step {state.global_step} (epoch {state.epoch + 1}); "
                           f"{kept}; try a lower optimizer.lr")
        state.epoch_step += 1
        state.global_step += 1
        t2 = time.perf_counter()
        totals.seconds += t2 - t0
        totals.data_seconds += t1 - t0
        if state.global_step % log_every == 0:
            tracker.log_metrics({"train/step_loss": loss, "train/step_lr": lr}, step=state.global_step)
        reporter.step(totals, lr)
        if stop.requested:
            return False


def evaluate(model: nn.Module, batches: Batches, criterion: Criterion, *, precision: str,
             device: torch.device, classes: list[str]) -> EvalResult:
    """Loss, error and confusion matrix over every batch (no augmentation, decoder masked by the prediction)."""
    sums: dict[str, float] = {}
    labels_all, preds_all = [], []
    with eval_mode(model):
        for images, labels in batches.epoch(0):
            with autocast(device, precision):
                out = model(images)
                terms = criterion(out, images, labels)
            sums["loss"] = sums.get("loss", 0.0) + terms.total.item() * len(labels)
            for name, per_sample in terms.parts.items():
                sums[name] = sums.get(name, 0.0) + per_sample.float().sum().item()
            labels_all.append(labels)
            preds_all.append(out.prediction)
    n = sum(len(x) for x in labels_all)
    confusion = confusion_matrix(torch.cat(labels_all), torch.cat(preds_all), len(classes))
    parts = {k: v / max(1, n) for k, v in sums.items() if k != "loss"}
    return EvalResult(loss=sums.get("loss", 0.0) / max(1, n), parts=parts, confusion=confusion, classes=classes)


def check_memory(model: nn.Module, criterion: Criterion, input_shape: tuple[int, int, int], optimizer: str,
                 device: torch.device, batch: int) -> None:
    """Stop before training if a step at `batch` will not fit the device, saying what would."""
    est = memory.estimate(model, criterion, input_shape, optimizer, device)
    if est is None or est.peak(batch) <= est.available:
        return
    fits = est.largest_batch()
    advice = f"the largest batch that fits is about {fits}" if fits else "not even a batch of 1 fits"
    raise CapsxError(f"data.batch_size {batch}: a training step needs about {memory.gib(est.peak(batch))} "
                     f"({memory.gib(100 * est.per_image)} per 100 images) but {device.type} has "
                     f"{memory.gib(est.available)} free; {advice}")


DIAGNOSTIC_IMAGES = 100  # test images a model's own diagnostics (e.g. routing) look at each epoch


def model_diagnostics(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Metrics a model reports about itself (`diagnostics(x)`, e.g. CapsNet's routing logit changes)."""
    diagnose = getattr(model, "diagnostics", None)
    if not callable(diagnose):
        return {}
    with eval_mode(model):
        return dict(diagnose(images.float() / 255))


def _get_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_model(payload: dict[str, Any], device: torch.device) -> tuple[Recipe, nn.Module]:
    """Rebuild the model a checkpoint was trained as, with its weights."""
    from capsx.recipe import recipe_from_dict

    recipe = recipe_from_dict(payload["recipe"], source="checkpoint recipe")
    model = build_model(recipe.model, recipe.data.input_shape, len(recipe.data.classes))
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise RunError(f"checkpoint weights do not fit model {recipe.model.name!r}: "
                       f"{str(e).splitlines()[0]}") from None
    return recipe, model.to(device)
