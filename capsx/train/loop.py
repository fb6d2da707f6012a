"""The training loop. `fit` reads top to bottom: build, then per epoch
`train_one_epoch`, `evaluate`, log, checkpoint.

Everything the loop carries from step to step lives in `TrainState`, which
goes into every checkpoint; with the data order and shifts seeded by
(seed, epoch, step) and the RNG state saved, a run resumed from any step
continues exactly as if it had not stopped.
"""

from __future__ import annotations

import copy
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from capsx.data import Batches, DataSplits
from capsx.data.imageset import unit_float
from capsx.errors import CapsxError, RunError
from capsx.models import ModelOutput, build_model
from capsx.models.transfer import prepare_transfer
from capsx.recipe import Recipe
from capsx.train.checkpoint import Checkpoint
from capsx.train.device import autocast, eval_mode
from capsx.train.distributed import SINGLE, Group, per_process_batch
from capsx.train.interrupt import StopRequest
from capsx.train.losses import LossTerms
from capsx.train.metrics import EvalResult, predict
from capsx.train.optim import build_optimizer, lr_factor, set_lr
from capsx.train.preflight import LONG_EPOCH_SECONDS, bf16_advice, check_memory, long_epoch_advice
from capsx.train.state import EpochTotals, PendingSteps, TrainState


class RunLog(Protocol):
    """What the loop logs to: an MLflow run (`track.tracker.Tracker`), or none (`NullTracker`)."""

    run_id: str

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...


class Reporter(Protocol):
    """What the loop tells the user; the CLI's is a Rich progress bar."""

    def warn(self, message: str) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None: ...
    def step(self, totals: EpochTotals, lr: float, steps: int = 1) -> None: ...
    def epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...


class QuietReporter:
    def warn(self, message: str) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None: ...
    def step(self, totals: EpochTotals, lr: float, steps: int = 1) -> None: ...
    def epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class Criterion(Protocol):
    def __call__(self, out: ModelOutput, targets: torch.Tensor, labels: torch.Tensor,
                 progress: float = 1.0) -> LossTerms: ...


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
    tracker: RunLog
    reporter: Reporter = field(default_factory=QuietReporter)
    group: Group = SINGLE  # the processes training together (one, unless under torchrun)
    # called by the main process before the first epoch and after each epoch's evaluation and checkpoints
    # (the epoch's pictures)
    after_epoch: Callable[[nn.Module, TrainState], None] | None = None


def fit(recipe: Recipe, run: Run, resume: Checkpoint | None = None,
        splits: DataSplits | None = None) -> FitResult:
    """Train `recipe` to the end (or early stop); resume from a checkpoint if given.
    `splits`: the recipe's data, if the caller loaded it already."""
    t_start = time.perf_counter()
    t = _build(recipe, run, resume, splits)
    cfg, state, group = recipe.train, t.state, run.group
    last_path: Path | None = None
    best_path: Path | None = None
    final: EvalResult | None = None
    stopped_early = False
    with StopRequest() as stop:
        if run.after_epoch is not None and group.is_main and state.global_step == 0:
            run.after_epoch(t.model, state)  # step 0: the untrained model's pictures
        while state.epoch < cfg.epochs:
            run.reporter.epoch_start(state.epoch, cfg.epochs, len(t.train_batches), state.epoch_step)
            if not train_one_epoch(t.net, t.train_batches, t.step, state, run, log_every=cfg.log_every,
                                   should_stop=lambda: group.any(stop.requested), last_good=last_path):
                # every process stops after the same step; one that got no signal was told by another
                raise Interrupted(stop.signal or signal.SIGTERM, t.checkpoint("last.pt"), state)
            final = evaluate(t.model, t.test_batches, t.step.criterion, precision=cfg.precision, device=run.device,
                             classes=t.classes, group=group)
            metrics = t.epoch_metrics(final)
            epoch = state.epoch + 1  # metrics of epoch k are logged at step k
            run.tracker.log_metrics(metrics, step=epoch)
            improved = state.end_epoch(metrics, final)
            if improved and cfg.checkpoint.best:
                best_path = t.checkpoint("best.pt", resumable=False)
            if epoch % cfg.checkpoint.every == 0 or epoch == cfg.epochs:
                last_path = t.checkpoint("last.pt")
            if run.after_epoch is not None and group.is_main:
                run.after_epoch(t.model, state)
            run.reporter.epoch_end(epoch, metrics)
            patience = cfg.early_stopping_patience
            if patience is not None and state.bad_epochs >= patience and state.epoch < cfg.epochs:
                stopped_early = True
                last_path = t.checkpoint("last.pt")
                break
    if best_path is None and (run.run_dir / "checkpoints" / "best.pt").is_file():
        best_path = run.run_dir / "checkpoints" / "best.pt"  # written before a resume
    return FitResult(state, final, time.perf_counter() - t_start, stopped_early, last_path, best_path)


@dataclass
class Step:
    """How one training step updates the model: loss, optimizer, gradient scaler, precision, learning rate."""

    criterion: Criterion
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: str
    lr_at: Callable[[int], float]  # the learning rate at a global step
    progress_at: Callable[[int], float] = lambda step: 1.0  # the fraction of the run done at a global step


@dataclass
class Training:
    """One training's parts, built once by `_build` and used by every epoch."""

    recipe: Recipe
    run: Run
    model: nn.Module
    net: nn.Module  # what the training step calls: the model, or DDP / torch.compile around it
    step: Step
    state: TrainState
    train_batches: Batches
    test_batches: Batches
    classes: list[str]

    def checkpoint(self, name: str, resumable: bool = True) -> Path:
        """last.pt holds all a resume needs; best.pt only the weights (for eval, pictures, MLflow).
        Every process calls it (the RNG states are gathered); rank 0 writes."""
        group = self.run.group
        weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}  # a plain torch.load anywhere
        ckpt = Checkpoint(self.recipe.to_dict(), weights, self.state, self.run.tracker.run_id)
        if resumable:
            rng = group.gather(_get_rng_state(self.run.device))
            ckpt.optimizer, ckpt.scaler = self.step.optimizer.state_dict(), self.step.scaler.state_dict()
            ckpt.rng = rng[0]
            ckpt.rng_ranks = rng if group.active else None
        path = self.run.run_dir / "checkpoints" / name
        return ckpt.write(path) if group.is_main else path

    def epoch_metrics(self, final: EvalResult) -> dict[str, float]:
        """What an epoch logs: training sums over every process, the test evaluation, time, diagnostics."""
        totals = self.state.totals.reduced(self.run.group)
        diagnostics = (model_diagnostics(self.model, self.test_batches.data.head(DIAGNOSTIC_IMAGES).images)
                       if self.run.group.is_main else {})
        return {
            "train/loss": totals.mean("loss"),
            **{f"train/{k}": totals.mean(k) for k in totals.sums if k != "loss"},
            "train/acc": totals.accuracy,
            **final.as_metrics("test"),
            "lr": self.step.lr_at(max(0, self.state.global_step - 1)),
            "time/epoch_s": totals.seconds,
            "time/images_per_s": totals.images_per_s,
            "time/data_wait_frac": totals.data_seconds / max(1e-9, totals.seconds),
            **diagnostics,
        }


def _build(recipe: Recipe, run: Run, resume: Checkpoint | None, splits: DataSplits | None) -> Training:
    """The model (pretrained weights, frozen layers, lr groups; or the checkpoint's state), optimizer and
    batches; the memory pre-flight, and a word first if an epoch will be long or bf16 slow."""
    cfg, data_cfg, group = recipe.train, recipe.data, run.group
    torch.manual_seed(cfg.seed)
    splits = splits if splits is not None else data_cfg.load_splits(run.data_root)
    model = build_model(recipe.model, data_cfg.input_shape, len(data_cfg.classes), data_cfg.objects)
    # pretrained weights (not on a resume: the checkpoint has newer ones), frozen layers, lr groups
    transfer = prepare_transfer(model, recipe.model, data_cfg.input_shape, len(data_cfg.classes),
                                load=resume is None)
    model.to(run.device)  # parameters keep their identity, so the groups still hold them
    loss = recipe.loss_config
    decoder = getattr(model, "decoder", None)
    if isinstance(decoder, nn.Module) and getattr(loss, "recon_weight", None) == 0:
        # a decoder no loss trains (Table 1's "no reconstruction" cell with the decoder kept for the
        # pictures) gets no gradient: marked so, or data-parallel training waits for it ("Expected to
        # have finished reduction") and the optimizer carries it for nothing
        decoder.requires_grad_(False)
    optimizer = build_optimizer(transfer.param_groups, recipe.optimizer)
    scaler = torch.amp.GradScaler(run.device.type, enabled=cfg.precision == "fp16")
    state = TrainState()
    if resume is None:
        run.tracker.set_tags({"model.num_params": sum(p.numel() for p in model.parameters()),
                              "data.train_examples": len(splits.train), "data.test_examples": len(splits.test),
                              **transfer.facts()})
    else:
        state = _restore(resume, model, optimizer, scaler, group, run.device)
    slow_bf16 = bf16_advice(run.device, cfg.precision)
    if group.is_main and slow_bf16:
        run.reporter.warn(slow_bf16)
    # the data goes to the device first, so that the probe sees the memory the data leaves free
    train_batches = Batches(splits.train.to(run.device), data_cfg.batch_size, shuffle=True, seed=cfg.seed,
                            shift=data_cfg.train_shift, crop=data_cfg.augment.crop,
                            max_steps=cfg.max_steps_per_epoch, rank=group.rank, world=group.world)
    test_batches = Batches(splits.test.to(run.device), data_cfg.eval_batch_size, rank=group.rank,
                           world=group.world)
    step_batch = min(per_process_batch(data_cfg.batch_size, group.world), len(splits.train))
    # data-parallel training also holds its gradient buckets (a copy of the trained gradients)
    buckets = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) if group.active else 0
    probe = check_memory(model, recipe.loss_config, data_cfg.input_shape, recipe.optimizer.name, run.device,
                         step_batch, data_cfg.objects, cfg.precision, buckets)
    net: nn.Module = model
    if group.active:
        net = DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)  # type: ignore[assignment]
    epoch_seconds = probe.step_seconds(step_batch) * len(train_batches)
    if group.is_main and epoch_seconds > LONG_EPOCH_SECONDS and state.epoch < cfg.epochs:
        run.reporter.warn(long_epoch_advice(epoch_seconds, len(train_batches), data_cfg.batch_size,
                                            run.device, cfg.precision))
    total_steps = len(train_batches) * cfg.epochs

    def lr_at(step: int) -> float:
        return recipe.optimizer.lr * lr_factor(recipe.schedule, step, total_steps)

    step = Step(recipe.loss_config, optimizer, scaler, cfg.precision, lr_at, lambda s: s / max(1, total_steps))
    return Training(recipe, run, model, net, step, state, train_batches, test_batches, splits.classes)


def _restore(resume: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler, group: Group, device: torch.device) -> TrainState:
    """Weights, optimizer, scaler and this process's RNG from a resumable checkpoint; its loop state."""
    if not resume.resumable:
        raise CapsxError(f"{resume.path}: holds weights only; --resume needs a run's last.pt")
    assert resume.optimizer is not None and resume.scaler is not None and resume.rng is not None
    model.load_state_dict(resume.model)
    optimizer.load_state_dict(resume.optimizer)
    scaler.load_state_dict(resume.scaler)
    per_rank = resume.rng_ranks
    _set_rng_state(per_rank[group.rank] if per_rank and len(per_rank) == group.world else resume.rng, device)
    return copy.deepcopy(resume.state)


def steps_between_reads(device: torch.device, log_every: int) -> int:
    """Training steps between two reads of the loss off the device (see `PendingSteps`): every step on
    the CPU, where a read costs nothing, and on a GPU often enough for a live progress bar and for
    every `train/step_loss` point."""
    return 1 if device.type == "cpu" else math.gcd(log_every, READ_EVERY_ON_ACCELERATORS)


READ_EVERY_ON_ACCELERATORS = 16


def train_one_epoch(net: nn.Module, batches: Batches, step: Step, state: TrainState, run: Run, *,
                    log_every: int, should_stop: Callable[[], bool], last_good: Path | None) -> bool:
    """Train from `state.epoch_step` to the end of `state.epoch`. False if a stop was requested
    (`should_stop()` is asked whenever the losses are read: by every process after the same steps)."""
    net.train()
    totals = state.totals
    pending = PendingSteps()
    read_every = steps_between_reads(run.device, log_every)
    batch_iter = batches.epoch(state.epoch, start_step=state.epoch_step)
    while True:
        t0 = time.perf_counter()
        batch = next(batch_iter, None)
        t1 = time.perf_counter()
        if batch is None:
            run.reporter.step(totals, step.lr_at(state.global_step - 1),
                              steps=_read(pending, totals, state, run, step, log_every, last_good))
            return True
        images, labels, targets = batch
        lr = step.lr_at(state.global_step)
        set_lr(step.optimizer, lr)
        with autocast(run.device, step.precision):
            out = net(images, labels)
            terms = step.criterion(out, targets, labels, step.progress_at(state.global_step))
        step.optimizer.zero_grad(set_to_none=True)
        step.scaler.scale(terms.total).backward()
        step.scaler.step(step.optimizer)
        step.scaler.update()
        state.epoch_step += 1
        state.global_step += 1
        pending.add(terms, out, labels, state.global_step, time.perf_counter() - t0, t1 - t0)
        if state.global_step % read_every == 0:
            run.reporter.step(totals, lr, steps=_read(pending, totals, state, run, step, log_every, last_good))
            if should_stop():
                return False


def _read(pending: PendingSteps, totals: EpochTotals, state: TrainState, run: Run, step: Step, log_every: int,
          last_good: Path | None) -> int:
    """The pending steps into the epoch's totals (how many: the return); a loss that is not finite
    stops the training, and every `log_every`-th step's loss (the mean over the processes) is logged."""
    count = len(pending)
    last = pending.read(totals)
    if last is None:
        return 0
    loss, at = last
    if not math.isfinite(loss):
        kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
        raise RunError(f"the loss became {loss} at step {at - 1} (epoch {state.epoch + 1}); "
                       f"{kept}; try a lower optimizer.lr")
    if at % log_every == 0:
        mean_loss = run.group.sum_floats([loss])[0] / run.group.world  # the global batch's loss
        run.tracker.log_metrics({"train/step_loss": mean_loss, "train/step_lr": step.lr_at(at - 1)}, step=at)
    return count


def evaluate(model: nn.Module, batches: Batches, criterion: Criterion, *, precision: str,
             device: torch.device, classes: list[str], group: Group = SINGLE) -> EvalResult:
    """Loss, error and confusion matrix over every batch (no augmentation, decoder masked by the prediction).
    With several processes each evaluates its share and the sums are gathered."""
    sums: dict[str, float] = {}
    labels_all, preds_all, indices_all = [], [], []
    rows, names = [], []  # each batch's loss terms, left on the device and read once at the end
    with eval_mode(model):
        for indices, (images, labels, targets) in batches.indexed(0):
            with autocast(device, precision):
                out = model(images)
                terms = criterion(out, targets, labels)
            names = list(terms.parts)
            rows.append(torch.stack([terms.total.float(), *(p.float().sum() for p in terms.parts.values())]))
            labels_all.append(labels)
            preds_all.append(predict(out, labels))
            indices_all.append(indices)
    for (total, *parts), labels in zip(torch.stack(rows).tolist() if rows else [], labels_all, strict=True):
        sums["loss"] = sums.get("loss", 0.0) + total * len(labels)
        for name, part in zip(names, parts, strict=True):
            sums[name] = sums.get(name, 0.0) + part
    if group.active:  # every process's predictions (small: one or k labels per image)
        labels_all = [t for part in group.gather([t.cpu() for t in labels_all]) for t in part]
        preds_all = [t for part in group.gather([t.cpu() for t in preds_all]) for t in part]
        indices_all = [t for part in group.gather([t.cpu() for t in indices_all]) for t in part]
        names = sorted(sums)
        sums = dict(zip(names, group.sum_floats([sums[k] for k in names]), strict=True))
    n = sum(len(x) for x in labels_all)
    parts = {k: v / max(1, n) for k, v in sums.items() if k != "loss"}
    return EvalResult.from_predictions(sums.get("loss", 0.0) / max(1, n), parts, torch.cat(labels_all),
                                       torch.cat(preds_all), classes, torch.cat(indices_all).to(preds_all[0].device))


DIAGNOSTIC_IMAGES = 100  # test images a model's own diagnostics (e.g. routing) look at each epoch


def model_diagnostics(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Metrics a model reports about itself (`diagnostics(x)`, e.g. CapsNet's routing logit changes)."""
    diagnose = getattr(model, "diagnostics", None)
    if not callable(diagnose):
        return {}
    with eval_mode(model):
        return dict(diagnose(unit_float(images)))


def _get_rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generators: the CPU's, and its own device's (one GPU's, not every GPU of the
    machine: a run resumed on fewer GPUs restores what each process drew from; a CPU run starts no CUDA)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if device.type == "cuda" and cuda is not None:
        if isinstance(cuda, list):  # written by an older capsx: every GPU's state; this device's is its own
            index = device.index or 0
            if index >= len(cuda):
                return
            cuda = cuda[index]
        torch.cuda.set_rng_state(cuda, device)
    elif device.type == "mps" and state.get("mps") is not None:
        torch.mps.set_rng_state(state["mps"])


def load_model(ckpt: Checkpoint, device: torch.device) -> tuple[Recipe, nn.Module]:
    """Rebuild the model a checkpoint was trained as, with its weights."""
    from capsx.recipe import recipe_from_dict

    recipe = recipe_from_dict(ckpt.recipe, source=f"{ckpt.path or 'checkpoint'}: its recipe")
    model = build_model(recipe.model, recipe.data.input_shape, len(recipe.data.classes), recipe.data.objects)
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as e:
        raise RunError(f"checkpoint weights do not fit model {recipe.model.name!r}: "
                       f"{str(e).splitlines()[0]}") from None
    return recipe, model.to(device)
