"""`capsx train`: one training from a resolved recipe: device, data and tracking resolved, the run
directory made, the loop run, the end logged and reported. Under torchrun every process calls it."""

from __future__ import annotations

import getpass
import platform
import secrets
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from capsx import __version__
from capsx.atomic import write_text
from capsx.console import ProgressReporter, fit_summary_table
from capsx.errors import RunError
from capsx.jobs.context import Context, silent
from capsx.jobs.epoch_pictures import epoch_pictures
from capsx.jobs.evaluation import confusion_dict
from capsx.models.transfer import check_transfer
from capsx.recipe import Recipe
from capsx.track.runs import RunInfo, ensure_writable, make_run_dir, read_run_info
from capsx.track.tracker import NOTE, NullTracker, Tracker
from capsx.train import distributed
from capsx.train.checkpoint import Checkpoint
from capsx.train.device import autocast, describe_device, kernel_choices, resolve_device
from capsx.train.distributed import Group
from capsx.train.loop import FitResult, Interrupted, QuietReporter, Run, fit


@dataclass
class TrainingOutcome:
    """How one training ended: its exit code (0, or 130/143 when interrupted), its run and results."""

    code: int
    run_id: str
    result: FitResult | None = None


def run_training(recipe: Recipe, ctx: Context, *, recipe_path: str, resume: Checkpoint | None = None,
                 parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None) -> TrainingOutcome:
    """Train with tracking and reporting. `resume`: a run's last.pt, continued exactly in its own run
    directory. `parent_run_id`: the MLflow run this one is nested under (one seed of `train --seeds`).
    `extra_tags`: more tags for a new run (a `--grid` cell's).
    Under torchrun every process calls this; rank 0 alone tracks, prints and writes checkpoints."""
    group, device = distributed.join(resolve_device(recipe.device))
    try:
        outcome = _train(recipe, ctx, group, device, recipe_path, resume, parent_run_id, extra_tags or {})
    except BaseException:
        distributed.leave()  # alone: the others may have failed too, or be gone
        raise
    distributed.leave(together=True)
    return outcome


def _train(recipe: Recipe, ctx: Context, group: Group, device: torch.device, recipe_path: str,
           resume: Checkpoint | None, parent_run_id: str | None, extra_tags: dict[str, str]) -> TrainingOutcome:
    say = ctx.say if group.is_main else silent
    autocast(device, recipe.train.precision)  # an impossible precision is an error now, not after set-up
    root = ctx.data_root_for(recipe.data)
    splits = recipe.data.load_splits(root)  # a missing or broken data set too: before any run exists
    recipe = recipe.model_copy(update={"data": recipe.data.resolved(splits)})  # e.g. a folder's class names
    for note in splits.notes:
        say(f"[yellow]{note}[/]", soft_wrap=True)
    if resume is None:  # and a pretrained file or freeze that cannot work
        check_transfer(recipe.model, recipe.data.input_shape, len(recipe.data.classes))
    tracker, run_dir = _open_tracking(recipe, ctx, group, device, recipe_path, resume, parent_run_id, extra_tags)
    if isinstance(tracker, Tracker):
        tracker.notify = lambda message: say(f"[yellow]{message}[/]", soft_wrap=True)
    verb = "resuming" if resume is not None else "training"
    say(f"[bold]{verb}[/] {recipe.name}: {recipe.model.name} on {recipe.data.name}, {describe_device(device)}",
        soft_wrap=True)
    say(f"  run {tracker.run_id}  dir {run_dir}", soft_wrap=True)
    say(f"  tracking {tracker.uri}" if tracker.active else "  tracking off", soft_wrap=True)
    reporter = ProgressReporter() if group.is_main and ctx.progress else QuietReporter()
    try:
        run = Run(device=device, data_root=root, run_dir=run_dir, tracker=tracker, reporter=reporter, group=group)
        run.after_epoch = epoch_pictures(recipe, run, tracker, splits.test, tracker.uri)
        with kernel_choices(device, deterministic=recipe.train.deterministic, tf32=recipe.train.tf32) as kernels:
            tracker.set_tags(kernels)
            result = fit(recipe, run, resume=resume, splits=splits)
    except Interrupted as stop:
        reporter.close()
        return _interrupted(stop, tracker, run_dir, group, say)
    except BaseException as e:
        reporter.close()
        if is_out_of_memory(e):  # one line saying what to try, not torch's traceback
            error = out_of_memory_error(recipe, device, run_dir)
            _end(tracker, run_dir, "FAILED", say, note=str(error))
            raise error from None
        _end(tracker, run_dir, "FAILED", say, note=str(e) if isinstance(e, RunError) else None)
        raise
    if result.best_checkpoint is not None:
        tracker.log_artifact(result.best_checkpoint, "checkpoints")
    if result.final is not None:
        tracker.log_dict(confusion_dict(result.final), "test/confusion_matrix.json")
    _end(tracker, run_dir, "FINISHED", say)
    say(fit_summary_table(recipe, result, tracker.run_id, run_dir))
    return TrainingOutcome(0, tracker.run_id, result)


def _open_tracking(recipe: Recipe, ctx: Context, group: Group, device: torch.device, recipe_path: str,
                   resume: Checkpoint | None, parent_run_id: str | None,
                   extra_tags: dict[str, str]) -> tuple[Tracker | NullTracker, Path]:
    """The run's tracker and directory: a new MLflow run and runs/<experiment>/<run id>/, the resumed
    run's own, or (in the other processes of a data-parallel run) rank 0's run id, tracking nothing."""
    experiment = recipe.tracking.experiment or recipe.name
    tracker: Tracker | NullTracker
    if not group.is_main:  # the other processes only need to know which run they are part of
        run_id, run_dir = group.broadcast(None)
        return NullTracker(run_id), run_dir
    if resume is not None:
        assert resume.path is not None and resume.run_id is not None
        run_dir = resume.path.parent.parent
        info = read_run_info(run_dir) if (run_dir / "run.json").is_file() else None
        uri = ctx.tracking_uri or (info.tracking_uri if info else None)
        tracker = (Tracker.attach(uri, resume.run_id, reopen=True, buffer_dir=run_dir) if (uri and ctx.track)
                   else NullTracker(resume.run_id))
        if isinstance(tracker, Tracker) and recipe.tracking.system_metrics:
            tracker.monitor_system(resume=True)
    else:
        uri = ctx.store(recipe.tracking.uri)
        ensure_writable(ctx.runs_dir)  # before an MLflow run exists that could not be finished
        if ctx.track:
            tags = {**run_tags(recipe, device), **extra_tags}
            if parent_run_id is not None:
                tags["mlflow.parentRunId"] = parent_run_id  # what makes MLflow show it nested
            tracker = Tracker.start(uri, experiment, run_name=recipe.tracking.run_name or default_run_name(recipe),
                                    tags=tags)
            if recipe.tracking.system_metrics:
                tracker.monitor_system()
        else:
            tracker = NullTracker(uuid.uuid4().hex)
        run_dir = make_run_dir(ctx.runs_dir, experiment, tracker.run_id)
        if isinstance(tracker, Tracker):
            tracker.buffer_dir = run_dir  # from here on, an unreachable store buffers instead of failing
        RunInfo(tracker.run_id, experiment, recipe_path, uri if ctx.track else None, time.time()).save(run_dir)
        write_text(run_dir / "recipe.yaml", recipe.to_yaml())
        tracker.set_tags({"capsx.run_dir": str(run_dir.resolve())})
        tracker.log_params(recipe.params())
        tracker.log_text(recipe.to_yaml(), "recipe.yaml")
    group.broadcast((tracker.run_id, run_dir))
    if group.active:
        tracker.log_params({"distributed.processes": group.world})
        tracker.set_tags({"distributed.batch_per_process": str(recipe.data.batch_size // group.world)})
    return tracker, run_dir


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's and MPS's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError)."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e)))


def out_of_memory_error(recipe: Recipe, device: torch.device, run_dir: Path) -> RunError:
    """One line: where memory ran out, at which batch, what is kept, and what to try."""
    last = run_dir / "checkpoints" / "last.pt"
    kept = f"the last checkpoint is {last} (--resume continues from it)" if last.is_file() else \
        "no checkpoint was written yet"
    cheaper = "train.precision=bf16 or fp16" if device.type == "cuda" else "train.precision=bf16"
    return RunError(f"out of memory on {describe_device(device)} at data.batch_size={recipe.data.batch_size}; "
                    f"{kept}; try a smaller data.batch_size (e.g. {max(1, recipe.data.batch_size // 2)}) or "
                    f"{cheaper}")


def _interrupted(stop: Interrupted, tracker: Tracker | NullTracker, run_dir: Path, group: Group,
                 say: Callable[..., None]) -> TrainingOutcome:
    """End the run as KILLED, say where its checkpoint is and how to continue; exit code 128 + signal."""
    name = signal.Signals(stop.signum).name
    _end(tracker, run_dir, "KILLED", say, note=f"interrupted by {name} at step {stop.state.global_step}; "
                                          f"checkpoint {stop.checkpoint}")
    say(f"[yellow]interrupted[/] by {name} at epoch {stop.state.epoch + 1}, step "
        f"{stop.state.global_step}; saved {stop.checkpoint}")
    nproc = f" --nproc {group.world}" if group.active else ""
    say(f"  continue with: capsx train --resume {tracker.run_id}{nproc}")
    return TrainingOutcome(128 + stop.signum, tracker.run_id)


def _end(tracker: Tracker | NullTracker, run_dir: Path, status: str, say: Callable[..., None],
         note: str | None = None) -> None:
    left = tracker.end(status, note=note)
    if left:
        say(f"[yellow]the tracking store did not take {left} call(s); they are kept in {run_dir}; "
            f"send them when it is back with: capsx sync {run_dir}[/]", soft_wrap=True)


def default_run_name(recipe: Recipe) -> str:
    """<recipe>-s<seed>-<4 random hex digits>: what it is, and enough to tell two of it apart."""
    return f"{recipe.name}-s{recipe.train.seed}-{secrets.token_hex(2)}"


def run_tags(recipe: Recipe, device: torch.device) -> dict[str, str]:
    """What the MLflow run is tagged with: capsx's and torch's versions, recipe, model, data, seed, device,
    host, user and (inside a git checkout) the commit."""
    tags = {
        "capsx.version": __version__, "capsx.recipe": recipe.name, "capsx.model": recipe.model.name,
        "capsx.data": recipe.data.name, "capsx.seed": str(recipe.train.seed), "capsx.device": describe_device(device),
        "capsx.torch": torch.__version__, "capsx.host": platform.node(), "mlflow.user": _user(),
    }
    tags.update(recipe.tags())
    if recipe.description:
        tags[NOTE] = recipe.description
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
