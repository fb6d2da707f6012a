"""`capsx eval`: a run's test error, per-class accuracy and confusion matrix on its test split (or an
affNIST-style set), logged to its MLflow run; with --check, measured against the paper's number."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from capsx.console import confusion_table, evaluation_table, paper_check_table, per_class_table
from capsx.data import Batches
from capsx.data.affnist import CANVAS as EVAL_CANVAS
from capsx.data.affnist import load_eval_set
from capsx.data.imageset import Examples
from capsx.errors import CapsxError
from capsx.jobs.context import Context
from capsx.jobs.trained import open_run
from capsx.paper import EVAL_SETS, CheckFailed, CheckRow, check_rows
from capsx.recipe import Recipe
from capsx.train.device import eval_precision
from capsx.train.loop import evaluate
from capsx.train.metrics import EvalResult


def run_evaluation(ref: str, ctx: Context, *, dataset: str = "test", check: bool = False,
                   images: int | None = None) -> EvalResult:
    """Evaluate a run's best checkpoint; print and (with ctx.track) log the results; with `check`, compare
    with the recipe's paper numbers (CheckFailed outside the band)."""
    t = open_run(ref, ctx)
    if check:
        check_rows(t.recipe.paper, dataset, 0.0)  # no paper number for it: say so before evaluating
    test = eval_set(t.recipe, dataset, t.data_root, run_label=t.label)
    if images is not None:
        test = test.subset(images)  # seeded: the same images every time
    batches = Batches(test.to(t.device), t.recipe.data.eval_batch_size)
    precision = eval_precision(t.recipe.train.precision, t.device)  # an fp16 (GPU) run evaluated on a CPU: fp32
    result = evaluate(t.model, batches, t.recipe.loss_config, precision=precision, device=t.device,
                      classes=t.classes)
    split = "test split" if dataset == "test" else dataset
    ctx.say(evaluation_table(f"{t.recipe.name}: {t.recipe.model.name} on {t.recipe.data.name} ({split})",
                                   t.path, t.run_id, t.epoch, result))
    ctx.say(per_class_table(result))
    ctx.say(confusion_table(result))
    prefix = "eval" if dataset == "test" else f"eval/{dataset}"
    rows = check_rows(t.recipe.paper, dataset, result.error) if check else []
    if ctx.track and t.run_id:
        tracker = t.tracker()
        if tracker is None:
            ctx.say("[dim]not logged: the run was trained without tracking[/]")
        else:
            metrics = result.as_metrics(prefix)
            metrics.update({f"{prefix}/acc_class/{name}": float(a) for name, a in
                            zip(result.classes, result.per_class_accuracy.tolist(), strict=True) if a == a})
            metrics.update({f"{prefix}/paper_check/{r.number.metric}": float(r.within) for r in rows})
            tracker.log_metrics(metrics, step=t.epoch)
            tracker.log_dict(confusion_dict(result), f"{prefix}/confusion_matrix.json")
            ctx.say(f"[dim]logged to run {t.run_id} at {t.tracking_uri}[/]")
    report_check(f"{t.recipe.name} against the paper ({split})", rows, "", ctx.say)
    return result


def report_check(title: str, rows: list[CheckRow], what: str, say: Callable[..., None]) -> None:
    """The paper-check table; CheckFailed (exit 1) naming the first number outside its band."""
    if not rows:
        return
    say(paper_check_table(title, rows))
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


def confusion_dict(result: EvalResult) -> dict[str, Any]:
    """The confusion matrix as the JSON artifact an MLflow run keeps."""
    return {"classes": result.classes, "rows_true_columns_predicted": result.confusion.tolist(),
            "error": result.error, "per_class_accuracy": result.per_class_accuracy.tolist()}
