"""A command's whole job, from a resolved recipe (or run) to tables on screen:
resolve device, data and tracking; make the run directory; call the loop;
log and report. The CLI calls these; tests and notebooks can too."""

from __future__ import annotations

import getpass
import platform
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from capsx import __version__
from capsx.checkpoint import load_checkpoint
from capsx.console import ProgressReporter, confusion_table, console, key_value_table, per_class_table
from capsx.data import Batches, resolve_data_root
from capsx.device import autocast, describe_device, resolve_device
from capsx.engine import FitResult, Interrupted, Run, evaluate, fit, load_model
from capsx.errors import CapsxError, RunError
from capsx.metrics import EvalResult
from capsx.models.transfer import check_transfer
from capsx.recipe import Recipe
from capsx.runs import RunInfo, ensure_writable, make_run_dir, read_run_info, resolve_checkpoint, run_tracking_uri
from capsx.tracking import NullTracker, Tracker, resolve_tracking_uri


def run_training(recipe: Recipe, *, recipe_path: str, data_root: Path | None, tracking_uri: str | None,
                 track: bool, runs_dir: Path, resume: dict[str, Any] | None = None,
                 resume_dir: Path | None = None) -> int:
    """Train with tracking and reporting; returns the exit code (0, or 130/143 when interrupted)."""
    device = resolve_device(recipe.device)
    autocast(device, recipe.train.precision)  # an impossible precision is an error now, not after set-up
    root = resolve_data_root(str(data_root) if data_root else None, getattr(recipe.data, "root", None))
    splits = recipe.data.load_splits(root)  # a missing or broken data set too: before any run exists
    if resume is None:  # and a pretrained file or freeze that cannot work
        check_transfer(recipe.model, recipe.data.input_shape, len(recipe.data.classes))
    experiment = recipe.tracking.experiment or recipe.name
    tracker: Tracker | NullTracker
    if resume is not None:
        assert resume_dir is not None
        run_dir = resume_dir
        info = read_run_info(run_dir) if (run_dir / "run.json").is_file() else None
        uri = tracking_uri or (info.tracking_uri if info else None)
        tracker = (Tracker.attach(uri, resume["run_id"], reopen=True, buffer_dir=run_dir) if (uri and track)
                   else NullTracker(resume["run_id"]))
    else:
        uri = resolve_tracking_uri(tracking_uri, recipe.tracking.uri, runs_dir)
        ensure_writable(runs_dir)  # before an MLflow run exists that could not be finished
        if track:
            tracker = Tracker.start(uri, experiment, run_name=recipe.tracking.run_name, tags=_run_tags(recipe, device))
        else:
            tracker = NullTracker(uuid.uuid4().hex)
        run_dir = make_run_dir(runs_dir, experiment, tracker.run_id)
        if isinstance(tracker, Tracker):
            tracker.buffer_dir = run_dir  # from here on, an unreachable store buffers instead of failing
        RunInfo(tracker.run_id, experiment, recipe_path, uri if track else None, time.time()).save(run_dir)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
        tracker.set_tags({"capsx.run_dir": str(run_dir.resolve())})
        tracker.log_params(recipe.to_dict())
        tracker.log_text(recipe.to_yaml(), "recipe.yaml")

    if isinstance(tracker, Tracker):
        tracker.notify = lambda message: console.print(f"[yellow]{message}[/]", soft_wrap=True)
    verb = "resuming" if resume is not None else "training"
    console.print(f"[bold]{verb}[/] {recipe.name}: {recipe.model.name} on {recipe.data.name}, "
                  f"{describe_device(device)}", soft_wrap=True)
    console.print(f"  run {tracker.run_id}  dir {run_dir}", soft_wrap=True)
    console.print(f"  tracking {tracker.uri}" if tracker.active else "  tracking off", soft_wrap=True)
    reporter = ProgressReporter()
    try:
        result = fit(recipe, Run(device=device, data_root=root, run_dir=run_dir, tracker=tracker,
                                 reporter=reporter), resume=resume, splits=splits)
    except Interrupted as stop:
        reporter.close()
        name = signal.Signals(stop.signum).name
        _end(tracker, run_dir, "KILLED", note=f"interrupted by {name} at step {stop.state.global_step}; "
                                              f"checkpoint {stop.checkpoint}")
        console.print(f"[yellow]interrupted[/] by {name} at epoch {stop.state.epoch + 1}, step "
                      f"{stop.state.global_step}; saved {stop.checkpoint}")
        console.print(f"  continue with: capsx train --resume {tracker.run_id}")
        return 128 + stop.signum
    except RunError as e:
        reporter.close()
        _end(tracker, run_dir, "FAILED", note=str(e))
        raise
    except BaseException:
        reporter.close()
        _end(tracker, run_dir, "FAILED")
        raise
    if result.best_checkpoint is not None:
        tracker.log_artifact(result.best_checkpoint, "checkpoints")
    if result.final is not None:
        tracker.log_dict(_confusion_dict(result.final), "test/confusion_matrix.json")
    _end(tracker, run_dir, "FINISHED")
    _print_fit_summary(recipe, result, tracker.run_id, run_dir)
    return 0


def _end(tracker: Tracker | NullTracker, run_dir: Path, status: str, note: str | None = None) -> None:
    left = tracker.end(status, note=note)
    if left:
        console.print(f"[yellow]the tracking store did not take {left} call(s); they are kept in {run_dir}; "
                      f"send them when it is back with: capsx sync {run_dir}[/]", soft_wrap=True)


def sync_run(run_dir: Path, tracking_uri: str | None) -> int:
    """Send a run's buffered tracking calls; returns how many are still left."""
    if not (run_dir / "run.json").is_file():
        raise CapsxError(f"{run_dir}: not a run directory (expected run.json in it)")
    info = read_run_info(run_dir)
    uri = tracking_uri or info.tracking_uri
    if uri is None:
        raise CapsxError(f"{run_dir}: the run was trained with tracking off; give --tracking-uri to send it")
    tracker = Tracker(uri, info.run_id, buffer_dir=run_dir)
    waiting = tracker.pending()
    if not waiting:
        console.print(f"nothing to send: {run_dir} has no buffered tracking calls")
        return 0
    left = tracker.flush()
    console.print(f"sent {waiting - left} of {waiting} buffered call(s) to {uri} (run {info.run_id})")
    return left


def run_evaluation(ref: str, *, data_root: Path | None, tracking_uri: str | None, runs_dir: Path, log: bool,
                   device_name: str) -> EvalResult:
    """Evaluate a run's best checkpoint on its test split; print and (optionally) log the results."""
    ckpt = resolve_checkpoint(ref, runs_dir, tracking_uri, which="best")
    payload = load_checkpoint(ckpt)
    device = resolve_device(device_name)
    recipe, model = load_model(payload, device)
    root = resolve_data_root(str(data_root) if data_root else None, getattr(recipe.data, "root", None))
    test = recipe.data.load_splits(root).test
    batches = Batches(test.to(device), recipe.data.eval_batch_size)
    result = evaluate(model, batches, recipe.loss_config, precision=recipe.train.precision, device=device,
                      classes=recipe.data.classes)
    epoch = int(payload.get("state", {}).get("epoch", 0))
    run_id = payload.get("run_id")
    console.print(key_value_table(f"{recipe.name}: {recipe.model.name} on {recipe.data.name} (test split)", [
        ("checkpoint", str(ckpt)), ("run", str(run_id)), ("epochs trained", str(epoch)),
        ("test images", f"{result.images:,}"), ("test error", f"{100 * result.error:.2f}%"),
        ("test accuracy", f"{100 * result.accuracy:.2f}%"), ("test loss", f"{result.loss:.4f}"),
    ]))
    console.print(per_class_table(result))
    console.print(confusion_table(result))
    if log and run_id:
        uri = run_tracking_uri(ckpt, tracking_uri, runs_dir)
        if uri is None:
            console.print("[dim]not logged: the run was trained without tracking[/]")
        else:
            tracker = Tracker.attach(uri, run_id)
            metrics = result.as_metrics("eval")
            metrics.update({f"eval/acc_class/{name}": float(a) for name, a in
                            zip(result.classes, result.per_class_accuracy.tolist(), strict=True) if a == a})
            tracker.log_metrics(metrics, step=epoch)
            tracker.log_dict(_confusion_dict(result), "eval/confusion_matrix.json")
            console.print(f"[dim]logged to run {run_id} at {uri}[/]")
    return result


def _confusion_dict(result: EvalResult) -> dict[str, Any]:
    return {"classes": result.classes, "rows_true_columns_predicted": result.confusion.tolist(),
            "error": result.error, "per_class_accuracy": result.per_class_accuracy.tolist()}


def _run_tags(recipe: Recipe, device: torch.device) -> dict[str, str]:
    tags = {
        "capsx.version": __version__, "capsx.recipe": recipe.name, "capsx.model": recipe.model.name,
        "capsx.data": recipe.data.name, "capsx.seed": str(recipe.train.seed), "capsx.device": describe_device(device),
        "capsx.torch": torch.__version__, "capsx.host": platform.node(), "mlflow.user": _user(),
    }
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


def _print_fit_summary(recipe: Recipe, result: FitResult, run_id: str, run_dir: Path) -> None:
    s = result.state
    rows = [("run", run_id), ("epochs", f"{s.epoch}/{recipe.train.epochs}" +
                              (" (early stop)" if result.stopped_early else "")), ("steps", f"{s.global_step:,}")]
    if result.final is not None:
        rows += [("final test error", f"{100 * result.final.error:.2f}%"),
                 ("final test accuracy", f"{100 * result.final.accuracy:.2f}%")]
    if s.best_error is not None:
        rows.append(("best test error", f"{100 * s.best_error:.2f}% (epoch {s.best_epoch})"))
    if s.history:
        last = s.history[-1]
        rows.append(("train images/s", f"{last['time/images_per_s']:.1f} (last epoch)"))
    rows += [("wall time", f"{result.seconds:.1f} s"), ("run dir", str(run_dir))]
    console.print(key_value_table(f"{recipe.name}: done", rows))
