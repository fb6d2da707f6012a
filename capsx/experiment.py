"""A command's whole job, from a resolved recipe (or run) to tables on screen:
resolve device, data and tracking; make the run directory; call the loop;
log and report. The CLI calls these; tests and notebooks can too."""

from __future__ import annotations

import getpass
import math
import platform
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from capsx import __version__
from capsx.console import (
    ProgressReporter,
    confusion_table,
    console,
    key_value_table,
    paper_check_table,
    per_class_table,
)
from capsx.data import Batches, ImageSet, resolve_data_root
from capsx.data.affnist import CANVAS as EVAL_CANVAS
from capsx.data.affnist import load_eval_set
from capsx.data.imageset import Examples
from capsx.ensemble import EnsembleResult, Member, evaluate_ensemble
from capsx.errors import CapsxError, RunError
from capsx.models.transfer import check_transfer
from capsx.paper import EVAL_SETS, CheckFailed, CheckRow, check_rows
from capsx.recipe import Recipe
from capsx.sweep import SweepSpec
from capsx.track.runs import (
    RunInfo,
    ensure_writable,
    find_run_dir,
    is_run_id,
    make_run_dir,
    read_run_info,
    resolve_checkpoint,
    run_tracking_uri,
)
from capsx.track.tracker import NullTracker, Tracker, child_run_ids, parent_run_id, resolve_tracking_uri
from capsx.train import distributed
from capsx.train.checkpoint import load_checkpoint
from capsx.train.device import autocast, describe_device, resolve_device
from capsx.train.distributed import Group
from capsx.train.loop import FitResult, Interrupted, QuietReporter, Run, evaluate, fit, load_model
from capsx.train.metrics import EvalResult


@dataclass
class TrainingOutcome:
    """How one training ended: its exit code (0, or 130/143 when interrupted), its run and results."""

    code: int
    run_id: str
    result: FitResult | None = None


def run_training(recipe: Recipe, *, recipe_path: str, data_root: Path | None, tracking_uri: str | None,
                 track: bool, runs_dir: Path, resume: dict[str, Any] | None = None,
                 resume_dir: Path | None = None, parent_run_id: str | None = None) -> TrainingOutcome:
    """Train with tracking and reporting. `parent_run_id`: the MLflow run this one is nested under
    (one seed of `train --seeds`). Under torchrun every process calls this; rank 0 alone tracks,
    prints and writes checkpoints."""
    group, device = distributed.join(resolve_device(recipe.device))
    if not group.is_main:
        console.quiet = True
    try:
        return _train(recipe, group, device, recipe_path=recipe_path, data_root=data_root,
                      tracking_uri=tracking_uri, track=track, runs_dir=runs_dir, resume=resume, resume_dir=resume_dir,
                      parent_run_id=parent_run_id)
    finally:
        distributed.leave()


def _train(recipe: Recipe, group: Group, device: torch.device, *, recipe_path: str, data_root: Path | None,
           tracking_uri: str | None, track: bool, runs_dir: Path, resume: dict[str, Any] | None,
           resume_dir: Path | None, parent_run_id: str | None) -> TrainingOutcome:
    autocast(device, recipe.train.precision)  # an impossible precision is an error now, not after set-up
    root = resolve_data_root(str(data_root) if data_root else None, getattr(recipe.data, "root", None))
    splits = recipe.data.load_splits(root)  # a missing or broken data set too: before any run exists
    if resume is None:  # and a pretrained file or freeze that cannot work
        check_transfer(recipe.model, recipe.data.input_shape, len(recipe.data.classes))
    experiment = recipe.tracking.experiment or recipe.name
    tracker: Tracker | NullTracker
    if not group.is_main:  # the other processes only need to know which run they are part of
        run_id, run_dir = group.broadcast(None)
        tracker = NullTracker(run_id)
    elif resume is not None:
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
            tags = _run_tags(recipe, device)
            if parent_run_id is not None:
                tags["mlflow.parentRunId"] = parent_run_id  # what makes MLflow show it nested
            tracker = Tracker.start(uri, experiment, run_name=recipe.tracking.run_name, tags=tags)
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
    if group.is_main:
        group.broadcast((tracker.run_id, run_dir))
        if group.active:
            tracker.log_params({"distributed.processes": group.world,
                                "distributed.batch_per_process": recipe.data.batch_size // group.world})

    if isinstance(tracker, Tracker):
        tracker.notify = lambda message: console.print(f"[yellow]{message}[/]", soft_wrap=True)
    verb = "resuming" if resume is not None else "training"
    console.print(f"[bold]{verb}[/] {recipe.name}: {recipe.model.name} on {recipe.data.name}, "
                  f"{describe_device(device)}", soft_wrap=True)
    console.print(f"  run {tracker.run_id}  dir {run_dir}", soft_wrap=True)
    console.print(f"  tracking {tracker.uri}" if tracker.active else "  tracking off", soft_wrap=True)
    reporter: ProgressReporter | QuietReporter = ProgressReporter() if group.is_main else QuietReporter()
    try:
        result = fit(recipe, Run(device=device, data_root=root, run_dir=run_dir, tracker=tracker,
                                 reporter=reporter, group=group), resume=resume, splits=splits)
    except Interrupted as stop:
        reporter.close()
        name = signal.Signals(stop.signum).name
        _end(tracker, run_dir, "KILLED", note=f"interrupted by {name} at step {stop.state.global_step}; "
                                              f"checkpoint {stop.checkpoint}")
        console.print(f"[yellow]interrupted[/] by {name} at epoch {stop.state.epoch + 1}, step "
                      f"{stop.state.global_step}; saved {stop.checkpoint}")
        nproc = f" --nproc {group.world}" if group.active else ""
        console.print(f"  continue with: capsx train --resume {tracker.run_id}{nproc}")
        return TrainingOutcome(128 + stop.signum, tracker.run_id)
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
    return TrainingOutcome(0, tracker.run_id, result)


@dataclass
class SeedSummary:
    seeds: list[int]
    run_ids: list[str]
    final_errors: list[float]  # fractions, one per seed
    best_errors: list[float]

    def stats(self) -> dict[str, float]:
        """Mean and sample standard deviation (n - 1; 0 for one seed) of the test errors."""
        out: dict[str, float] = {"seeds/count": float(len(self.seeds))}
        for key, xs in (("test_error", self.final_errors), ("best_test_error", self.best_errors)):
            mean = sum(xs) / len(xs)
            var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
            out[f"seeds/{key}_mean"], out[f"seeds/{key}_std"] = mean, math.sqrt(var)
        return out


def run_seeds(recipe: Recipe, seeds: list[int], *, recipe_path: str, data_root: Path | None,
              tracking_uri: str | None, track: bool, runs_dir: Path) -> tuple[int, SeedSummary]:
    """One training per seed, each a child of one parent MLflow run that gets the mean and std of
    the test error (the paper's "mean of 3 trials"). Returns the exit code and the summary."""
    from capsx.recipe import recipe_from_dict

    device = resolve_device(recipe.device)
    autocast(device, recipe.train.precision)
    root = resolve_data_root(str(data_root) if data_root else None, getattr(recipe.data, "root", None))
    recipe.data.load_splits(root)  # a missing or broken data set: an error before the parent run exists
    experiment = recipe.tracking.experiment or recipe.name
    uri = resolve_tracking_uri(tracking_uri, recipe.tracking.uri, runs_dir)
    parent: Tracker | NullTracker
    if track:
        ensure_writable(runs_dir)
        tags = {**_run_tags(recipe, device), "capsx.seeds": ",".join(map(str, seeds))}
        del tags["capsx.seed"]  # each child has its own
        parent = Tracker.start(uri, experiment, run_name=f"{recipe.name} seeds {','.join(map(str, seeds))}",
                               tags=tags)
        params = recipe.to_dict()
        params["train"]["seed"] = ",".join(map(str, seeds))
        parent.log_params(params)
    else:
        parent = NullTracker(uuid.uuid4().hex)
    summary = SeedSummary(seeds, [], [], [])
    console.print(f"[bold]seeds[/] {', '.join(map(str, seeds))}" + (f": parent run {parent.run_id}" if track else ""),
                  soft_wrap=True)
    try:
        for seed in seeds:
            raw = recipe.to_dict()
            raw["train"]["seed"] = seed
            raw["tracking"]["run_name"] = f"{recipe.tracking.run_name or recipe.name} seed {seed}"
            child = recipe_from_dict(raw, source=recipe_path)
            done = run_training(child, recipe_path=recipe_path, data_root=data_root, tracking_uri=uri,
                                track=track, runs_dir=runs_dir, parent_run_id=parent.run_id if track else None)
            if done.code:
                parent.end("KILLED", note=f"stopped during seed {seed} (run {done.run_id})")
                return done.code, summary
            assert done.result is not None and done.result.final is not None
            summary.run_ids.append(done.run_id)
            summary.final_errors.append(done.result.final.error)
            best = done.result.state.best_error
            summary.best_errors.append(best if best is not None else done.result.final.error)
    except BaseException:
        parent.end("FAILED")
        raise
    stats = summary.stats()
    parent.log_metrics(stats, step=0)
    parent.end("FINISHED")
    rows = [(f"seed {s}", f"{100 * e:.2f}% final, {100 * b:.2f}% best  (run {r})")
            for s, e, b, r in zip(seeds, summary.final_errors, summary.best_errors, summary.run_ids, strict=True)]
    rows += [("test error", f"{100 * stats['seeds/test_error_mean']:.2f}% +- {100 * stats['seeds/test_error_std']:.2f}"
                            f" (mean +- std over {len(seeds)} seeds)"),
             ("best test error", f"{100 * stats['seeds/best_test_error_mean']:.2f}% +- "
                                 f"{100 * stats['seeds/best_test_error_std']:.2f}"),
             *([("parent run", parent.run_id)] if track else [])]
    console.print(key_value_table(f"{recipe.name}: {len(seeds)} seeds", rows))
    if len(seeds) > 1:  # the seeds as one classifier (the paper's CIFAR-10 protocol), logged to the parent
        run_ensemble(summary.run_ids, data_root=data_root, tracking_uri=uri if track else None, runs_dir=runs_dir,
                     log=track, device_name=recipe.device)
    return 0, summary


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
                   device_name: str, dataset: str = "test", check: bool = False,
                   images: int | None = None) -> EvalResult:
    """Evaluate a run's best checkpoint on its test split (or an affNIST-style set); print and
    (optionally) log the results; with `check`, compare with the recipe's paper numbers."""
    ckpt = resolve_checkpoint(ref, runs_dir, tracking_uri, which="best")
    payload = load_checkpoint(ckpt)
    device = resolve_device(device_name)
    recipe, model = load_model(payload, device)
    root = resolve_data_root(str(data_root) if data_root else None, getattr(recipe.data, "root", None))
    if check:
        check_rows(recipe.paper, dataset, 0.0)  # no paper number for it: say so before evaluating
    test = eval_set(recipe, dataset, root, run_label=str(payload.get("run_id") or ckpt))
    if images is not None:
        test = test.subset(images)  # seeded: the same images every time
    batches = Batches(test.to(device), recipe.data.eval_batch_size)
    result = evaluate(model, batches, recipe.loss_config, precision=recipe.train.precision, device=device,
                      classes=recipe.data.classes)
    epoch = int(payload.get("state", {}).get("epoch", 0))
    run_id = payload.get("run_id")
    split = "test split" if dataset == "test" else dataset
    console.print(key_value_table(f"{recipe.name}: {recipe.model.name} on {recipe.data.name} ({split})", [
        ("checkpoint", str(ckpt)), ("run", str(run_id)), ("epochs trained", str(epoch)),
        ("test images", f"{result.images:,}"), ("test error", f"{100 * result.error:.2f}%"),
        ("test accuracy", f"{100 * result.accuracy:.2f}%"), ("test loss", f"{result.loss:.4f}"),
        *([("objects found", f"{100 * result.object_accuracy:.2f}% (an image is right only if all are)")]
          if result.whole is not None else []),
    ]))
    console.print(per_class_table(result))
    console.print(confusion_table(result))
    prefix = "eval" if dataset == "test" else f"eval/{dataset}"
    rows = check_rows(recipe.paper, dataset, result.error) if check else []
    if log and run_id:
        uri = run_tracking_uri(ckpt, tracking_uri, runs_dir)
        if uri is None:
            console.print("[dim]not logged: the run was trained without tracking[/]")
        else:
            tracker = Tracker.attach(uri, run_id)
            metrics = result.as_metrics(prefix)
            metrics.update({f"{prefix}/acc_class/{name}": float(a) for name, a in
                            zip(result.classes, result.per_class_accuracy.tolist(), strict=True) if a == a})
            metrics.update({f"{prefix}/paper_check/{r.number.metric}": float(r.within) for r in rows})
            tracker.log_metrics(metrics, step=epoch)
            tracker.log_dict(_confusion_dict(result), f"{prefix}/confusion_matrix.json")
            console.print(f"[dim]logged to run {run_id} at {uri}[/]")
    _report_check(f"{recipe.name} against the paper ({split})", rows, "")
    return result


def _report_check(title: str, rows: list[CheckRow], what: str) -> None:
    """The paper-check table; CheckFailed (exit 1) naming the first number outside its band."""
    if not rows:
        return
    console.print(paper_check_table(title, rows))
    outside = [r for r in rows if not r.within]
    if outside:
        r = outside[0]
        raise CheckFailed(f"--check: {what}{r.number.metric} {r.measured:.2f}% is outside the paper's band "
                          f"[{r.number.band[0]}, {r.number.band[1]}]% (paper: {r.number.value}%, {r.number.source})")


def eval_set(recipe: Recipe, dataset: str, root: Path, run_label: str) -> Examples:
    """The images `capsx eval --dataset` means, refused if the run's model takes another size."""
    if dataset == "test":
        return recipe.data.load_test_split(root)
    if dataset not in EVAL_SETS:
        raise CapsxError(f"--dataset {dataset!r}: expected one of: {', '.join(EVAL_SETS)}")
    if recipe.data.classes != [str(d) for d in range(10)]:
        raise CapsxError(f"--dataset {dataset} holds digits 0-9 but run {run_label} was trained on "
                         f"{recipe.data.name} ({', '.join(recipe.data.classes)})")
    have, want = (1, EVAL_CANVAS, EVAL_CANVAS), recipe.data.input_shape
    if have != want:  # before reading anything: a model takes one input size
        raise CapsxError(f"--dataset {dataset} holds {'x'.join(map(str, have[1:]))} images but run {run_label}'s "
                         f"model takes {'x'.join(map(str, want[1:]))}; evaluate a run trained on a 40x40 canvas "
                         "(e.g. recipes/mnist-translated.yaml)")
    images = load_eval_set(dataset, root)
    assert tuple(images.images.shape[1:]) == have, images.images.shape
    return images


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


def run_sweep(refs: list[str], spec: SweepSpec, *, images: int | None, data_root: Path | None,
              tracking_uri: str | None, runs_dir: Path, log: bool, device_name: str) -> dict[str, Sequence[float]]:
    """Accuracy of each run over the sweep's values, on its own test split; a Rich table, an MLflow
    metric series per run (`sweep/<name>/acc` and `sweep/<name>/value`, step = the value's index)
    and one plot of every run's curve, saved beside each run and logged to it."""
    from capsx.inspection import open_trained
    from capsx.pictures import canvas, curves
    from capsx.sweep import apply_transform

    trained = [open_trained(ref, None, runs_dir=runs_dir, tracking_uri=tracking_uri, data_root=data_root,
                            device_name=device_name, log=log) for ref in refs]
    results: dict[str, Sequence[float]] = {}
    for t in trained:
        label = f"{t.recipe.name} ({t.recipe.model.name}, {str(t.run_id or t.checkpoint.stem)[:8]})"
        test = t.test_set()
        if images is not None:
            test = test.subset(images)
        device = next(t.model.parameters()).device
        accuracies = []
        for i, value in enumerate(spec.values):
            moved = ImageSet(apply_transform(test.images, spec.name, value), test.labels)
            result = evaluate(t.model, Batches(moved.to(device), t.recipe.data.eval_batch_size), t.recipe.loss_config,
                              precision=t.recipe.train.precision, device=device, classes=t.classes)
            accuracies.append(result.accuracy)
            if t.tracker is not None:
                t.tracker.log_metrics({f"sweep/{spec.name}/acc": result.accuracy,
                                       f"sweep/{spec.name}/value": value}, step=i)
            console.print(f"  {label}: {spec.name} {value:g} -> {100 * result.accuracy:.2f}%", style="dim")
        results[label] = accuracies
    table = Table(title=f"test accuracy under {spec.name} ({spec.transform.unit})", title_justify="left")
    table.add_column(spec.name, justify="right")
    for label in results:
        table.add_column(label, justify="right")
    for i, value in enumerate(spec.values):
        table.add_row(f"{value:g}", *(f"{100 * accs[i]:.2f}%" for accs in results.values()))
    console.print(table)
    picture = curves.accuracy_curves(f"accuracy under {spec.name}", f"{spec.name} ({spec.transform.unit})",
                                     spec.values, results)
    for t in trained:
        path = canvas.save_png(picture, t.out_dir / f"sweep-{spec.name}.png")
        console.print(f"  wrote {path}", soft_wrap=True)
        if t.tracker is not None:
            assert isinstance(t.tracker, Tracker)  # opened in this process (log_in_background off)
            t.tracker.log_artifact(path, "sweep")
            console.print(f"[dim]logged to run {t.run_id}[/]")
    return results


def ensemble_members(refs: Sequence[str], *, runs_dir: Path, tracking_uri: str | None) -> list[str]:
    """The runs an ensemble is made of: each ref itself, or, for a `train --seeds` parent run,
    its seeds' runs."""
    out: list[str] = []
    for ref in refs:
        local = Path(ref).is_file() or find_run_dir(runs_dir, ref) is not None
        maybe_parent = not local and is_run_id(ref)
        children = child_run_ids(resolve_tracking_uri(tracking_uri, None, runs_dir), ref) if maybe_parent else []
        out.extend(children or [ref])
    if len(out) < 2:
        raise CapsxError(f"--ensemble: {', '.join(refs)} is one model; give two runs or more, or a "
                         "`train --seeds` parent run")
    return out


def run_ensemble(refs: Sequence[str], *, data_root: Path | None, tracking_uri: str | None, runs_dir: Path,
                 log: bool, device_name: str, dataset: str = "test", check: bool = False,
                 images: int | None = None) -> EnsembleResult:
    """Evaluate several runs as one classifier (mean class probabilities, the paper's CIFAR-10
    protocol); print each member and the ensemble; log to the runs' common parent if they have one."""
    device = resolve_device(device_name)
    members: list[Member] = []
    ckpts = [resolve_checkpoint(ref, runs_dir, tracking_uri, which="best")
             for ref in ensemble_members(refs, runs_dir=runs_dir, tracking_uri=tracking_uri)]
    for ckpt in ckpts:
        payload = load_checkpoint(ckpt)
        recipe, model = load_model(payload, device)
        members.append(Member(str(payload.get("run_id") or ckpt), recipe, model))
    first = members[0].recipe
    for m in members[1:]:
        data = m.recipe.data
        for what, a, b in (("data set", first.data.name, data.name),
                           ("input shape", first.data.input_shape, data.input_shape),
                           ("classes", first.data.classes, data.classes),
                           ("objects per image", first.data.objects, data.objects)):
            if a != b:
                raise CapsxError(f"--ensemble: run {m.label} was trained with {what} {b} but run "
                                 f"{members[0].label} with {a}; an ensemble's models must answer the same question")
    if check:
        check_rows(first.paper, dataset, 0.0, len(members))  # no paper number for it: say so before evaluating
    root = resolve_data_root(str(data_root) if data_root else None, getattr(first.data, "root", None))
    test = eval_set(first, dataset, root, run_label=members[0].label)
    if images is not None:
        test = test.subset(images)
    batches = Batches(test.to(device), first.data.eval_batch_size)
    result = evaluate_ensemble(members, batches, device, first.data.classes)
    split = "test split" if dataset == "test" else dataset
    table = Table(title=f"{first.name}: ensemble of {len(members)} on {first.data.name} ({split}, "
                        f"{result.ensemble.images:,} images)", title_justify="left")
    for col in ("model", "test error", "test accuracy"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for m, alone in zip(members, result.members, strict=True):
        table.add_row(f"{m.recipe.model.name} {m.label}", f"{100 * alone.error:.2f}%",
                      f"{100 * alone.accuracy:.2f}%")
    errors = [alone.error for alone in result.members]
    mean = sum(errors) / len(errors)
    table.add_row("[dim]members' mean[/]", f"[dim]{100 * mean:.2f}%[/]", f"[dim]{100 * (1 - mean):.2f}%[/]")
    table.add_row("[bold]ensemble[/] (mean class probabilities)", f"[bold]{100 * result.ensemble.error:.2f}%[/]",
                  f"[bold]{100 * result.ensemble.accuracy:.2f}%[/]")
    console.print(table)
    rows = check_rows(first.paper, dataset, result.ensemble.error, len(members)) if check else []
    if log:
        uri = run_tracking_uri(ckpts[0], tracking_uri, runs_dir)
        parents = {parent_run_id(uri, m.label) for m in members} if uri else {None}
        parent = parents.pop() if len(parents) == 1 else None
        if uri is None or parent is None:
            console.print("[dim]not logged: the runs are not the seeds of one parent run[/]")
        else:
            prefix = "ensemble" if dataset == "test" else f"ensemble/{dataset}"
            Tracker.attach(uri, parent).log_metrics(
                {f"{prefix}/error": result.ensemble.error, f"{prefix}/acc": result.ensemble.accuracy,
                 f"{prefix}/members": float(len(members)),
                 **{f"{prefix}/paper_check/{r.number.metric}": float(r.within) for r in rows}}, step=0)
            console.print(f"[dim]logged to parent run {parent} at {uri}[/]")
    _report_check(f"{first.name} ensemble against the paper ({split})", rows, "the ensemble's ")
    return result
