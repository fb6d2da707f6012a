"""Everything the CLI shows: the progress bar, every table and the one-line errors (Rich)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from capsx.paper import CheckRow
from capsx.train.metrics import EvalResult
from capsx.train.state import EpochTotals

if TYPE_CHECKING:
    from capsx.jobs.bench import BenchResult
    from capsx.jobs.ensemble import EnsembleResult
    from capsx.jobs.pose import PoseReadout
    from capsx.jobs.predict import Prediction
    from capsx.recipe import Recipe
    from capsx.summary import ModelSummary
    from capsx.train.loop import FitResult

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def print_error(message: str) -> None:
    """One red line; the message is plain text (no Rich markup is interpreted)."""
    err_console.print(Text(f"error: {message}", style="bold red"), soft_wrap=True)


class ProgressReporter:
    """A Rich progress bar per epoch: loss, accuracy, images/s and ETA; a line of test metrics after it."""

    LOG_LINES_PER_EPOCH = 10  # without a terminal (CI, nohup), a plain line every tenth of an epoch

    def __init__(self, out: Console = console) -> None:
        self.console = out
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.plain_every = 0
        self.plain_done = 0
        self.plain_label = ""

    def warn(self, message: str) -> None:
        """One yellow line before the bars (plain text: no Rich markup is interpreted)."""
        self.console.print(Text(f"warning: {message}", style="yellow"), soft_wrap=True)

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        if not self.console.is_terminal:  # a live bar would only print at the end
            self.plain_every = max(1, steps // self.LOG_LINES_PER_EPOCH)
            self.plain_done, self.plain_label = done, f"epoch {epoch + 1}/{epochs} step {{}}/{steps}"
            return
        self.progress = Progress(
            TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(bar_width=20), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=steps, completed=done, stats="")

    def step(self, totals: EpochTotals, lr: float, steps: int = 1) -> None:
        """`steps` more steps were taken (and read off the device: `totals` includes them)."""
        if steps == 0:
            return
        stats = f"loss {totals.mean('loss'):.4f} acc {100 * totals.accuracy:.2f}% {totals.images_per_s:.0f} img/s"
        if self.progress is None:
            before, self.plain_done = self.plain_done, self.plain_done + steps
            if self.plain_done // self.plain_every > before // self.plain_every:
                self.console.print(f"  {self.plain_label.format(self.plain_done)}  {stats}  lr {lr:.2e}")
            return
        assert self.task is not None
        self.progress.update(self.task, advance=steps, stats=stats)

    def epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.close()
        self.console.print(
            f"  test error {100 * metrics['test/error']:.2f}%  test loss {metrics['test/loss']:.4f}  "
            f"train acc {100 * metrics['train/acc']:.2f}%  {metrics['time/images_per_s']:.0f} img/s  "
            f"{metrics['time/epoch_s']:.0f} s"
        )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def key_value_table(title: str, rows: Sequence[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    return table


def per_class_table(result: EvalResult) -> Table:
    per_object = result.whole is not None  # several digits per image: the rows count digits
    table = Table(title="per-class accuracy" + (" (of the digits, each found or not)" if per_object else ""),
                  title_justify="left")
    table.add_column("class")
    table.add_column("digits" if per_object else "images", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("errors", justify="right")
    totals = result.confusion.sum(dim=1)
    for k, name in enumerate(result.classes):
        acc = result.per_class_accuracy[k].item()
        wrong = int(totals[k] - result.confusion[k, k])
        table.add_row(name, str(int(totals[k])), "-" if totals[k] == 0 else f"{100 * acc:.2f}%", str(wrong))
    return table


def confusion_table(result: EvalResult) -> Table:
    table = Table(title="confusion matrix (rows: true class, columns: prediction)", title_justify="left")
    table.add_column("true \\ pred", style="bold")
    for name in result.classes:
        table.add_column(name, justify="right")
    for k, name in enumerate(result.classes):
        cells = []
        for j in range(len(result.classes)):
            n = int(result.confusion[k, j])
            cells.append(f"[green]{n}[/]" if j == k else (f"[red]{n}[/]" if n else "[dim]0[/]"))
        table.add_row(name, *cells)
    return table


def paper_check_table(title: str, rows: Sequence[CheckRow]) -> Table:
    """Measured against the paper: one row per number, green inside the band, red outside."""
    table = Table(title=title, title_justify="left")
    for col in ("metric", "paper", "band", "measured", "", "source"):
        table.add_column(col, justify="right" if col in ("paper", "band", "measured") else "left")
    for r in rows:
        n = r.number
        verdict = "[green]within[/]" if r.within else "[red]outside[/]"
        table.add_row(n.metric, f"{n.value:g}%", f"{n.band[0]:g}-{n.band[1]:g}%", f"{r.measured:.2f}%", verdict,
                      n.source)
    return table


def fit_summary_table(recipe: Recipe, result: FitResult, run_id: str, run_dir: Path) -> Table:
    """How a training ended: epochs and steps, final and best test error, speed, wall time, where it is."""
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
    return key_value_table(f"{recipe.name}: done", rows)


def evaluation_table(title: str, checkpoint: Path, run_id: str | None, epoch: int, result: EvalResult) -> Table:
    return key_value_table(title, [
        ("checkpoint", str(checkpoint)), ("run", str(run_id)), ("epochs trained", str(epoch)),
        ("test images", f"{result.images:,}"), ("test error", f"{100 * result.error:.2f}%"),
        ("test accuracy", f"{100 * result.accuracy:.2f}%"), ("test loss", f"{result.loss:.4f}"),
        *([("objects found", f"{100 * result.object_accuracy:.2f}% (an image is right only if all are)")]
          if result.whole is not None else []),
    ])


def ensemble_table(title: str, labels: Sequence[str], result: EnsembleResult) -> Table:
    """Each member alone, the members' mean, and the ensemble (mean class probabilities)."""
    table = Table(title=title, title_justify="left")
    for col in ("model", "test error", "test accuracy"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for label, alone in zip(labels, result.members, strict=True):
        table.add_row(label, f"{100 * alone.error:.2f}%", f"{100 * alone.accuracy:.2f}%")
    errors = [alone.error for alone in result.members]
    mean = sum(errors) / len(errors)
    table.add_row("[dim]members' mean[/]", f"[dim]{100 * mean:.2f}%[/]", f"[dim]{100 * (1 - mean):.2f}%[/]")
    table.add_row("[bold]ensemble[/] (mean class probabilities)", f"[bold]{100 * result.ensemble.error:.2f}%[/]",
                  f"[bold]{100 * result.ensemble.accuracy:.2f}%[/]")
    return table


def sweep_table(title: str, name: str, values: Sequence[float], results: dict[str, Sequence[float]]) -> Table:
    """A row per value of the sweep, a column of accuracies per run."""
    table = Table(title=title, title_justify="left")
    table.add_column(name, justify="right")
    for label in results:
        table.add_column(label, justify="right")
    for i, value in enumerate(values):
        table.add_row(f"{value:g}", *(f"{100 * accs[i]:.2f}%" for accs in results.values()))
    return table


def summary_tables(title: str, s: ModelSummary, layers: Sequence[str]) -> list[Table]:
    """`capsx summary`: a row per layer (type, output shape, parameters), then the totals."""
    table = Table(title=title, title_justify="left")
    for col in ("layer", "type", "output shape", "params"):
        table.add_column(col, justify="right" if col in ("output shape", "params") else "left")
    for row in s.layers:
        table.add_row(row.name, row.kind, "(" + ", ".join(map(str, row.output_shape)) + ")", f"{row.params:,}")
    rows = [("total parameters", f"{s.total_params:,} ({s.total_params / 1e6:.1f}M)"),
            ("trainable", f"{s.trainable_params:,}" + (f" ({s.total_params - s.trainable_params:,} frozen by "
                                                        "model.freeze)" if s.trainable_params < s.total_params
                                                        else ""))]
    if s.decoder_params:
        without = s.total_params - s.decoder_params
        rows.append(("without the decoder", f"{without:,} ({without / 1e6:.1f}M)"))
    rows.append(("forward cost", f"{s.forward_flops / 1e9:.2f} GFLOP per image "
                                 f"(training about 3x: {3 * s.forward_flops / 1e9:.2f})"))
    rows.append(("layers (model.freeze)", f"{len(layers)}: {', '.join(layers)}"))
    return [table, key_value_table("totals", rows)]


def bench_tables(title: str, res: BenchResult, rounds: int, gpu: bool) -> list[Table]:
    """`capsx bench`: capsx against the reference (images/s, peak memory), then the arithmetic."""
    out = res.as_json()

    def mb(v: object) -> str:
        return "-" if v is None else f"{v:,.0f} MB"

    t = Table(title=f"{title}, {out['device']}, medians of {rounds} rounds", title_justify="left")
    for col in ("", "capsx", "reference", "capsx / reference"):
        t.add_column(col, justify="right" if col else "left")
    t.add_row(f"train images/s (batch {res.batch})", f"{out['train_images_per_s']:.1f}",
              f"{out['reference_train_images_per_s']:.1f}", f"{out['train_speedup']:.2f}x")
    t.add_row(f"inference images/s (batch {res.infer_batch})", f"{out['infer_images_per_s']:.1f}",
              f"{out['reference_infer_images_per_s']:.1f}", f"{out['infer_speedup']:.2f}x")
    t.add_row(f"peak {'GPU memory (allocated)' if gpu else 'memory (RSS)'}, inference (batch {res.infer_batch})",
              mb(out["peak_gpu_mb" if gpu else "peak_rss_mb"]),
              mb(out["reference_peak_gpu_mb" if gpu else "reference_peak_rss_mb"]), "")
    compute = key_value_table("compute", [
        ("training cost (direct convolutions)", f"{res.train_flops_per_image / 1e9:.2f} GFLOP per image"),
        ("achieved (capsx, training)", f"{out['gflops_achieved']:.0f} GFLOP/s effective: the direct "
                                       "computation's FLOPs per second"),
        ("matrix-product peak (same run)", f"{out['matmul_peak_gflops']:.0f} GFLOP/s ({out['matmul_peak_note']})"),
        ("share of the peak", f"{out['percent_of_matmul_peak']:.0f}%"),
        ("arithmetic capsx performs", f"{res.train_flops_computed_per_image / 1e9:.2f} GFLOP per image, "
                                      f"{out['gflops_computed']:.0f} GFLOP/s"),
        *([("torch.compile (first calls)", f"{res.compile_seconds:.1f} s")] if res.compile_seconds else []),
        *[(f"path taken: conv {problem}", why) for problem, why in res.paths.items()],
    ])
    return [t, compute]


MAX_POSE_DIMS = 32  # rows of the per-dimension table


def pose_tables(title: str, readout: PoseReadout, caption: str) -> list[Table]:
    """`eval --pose`: R^2 per class and pose quantity (with their mean), and what each feature dimension
    follows most."""
    r2 = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    r2.add_column("class")
    for q in readout.quantities:
        r2.add_column(f"R² {q}", justify="right")

    def cell(v: float) -> str:
        if v != v:
            return "[dim]-[/]"
        colour = "green" if v >= 0.9 else "yellow" if v >= 0.5 else "red"
        return f"[{colour}]{v:.3f}[/]"

    for name, row in zip(readout.classes, readout.r2, strict=True):
        r2.add_row(name, *(cell(v) for v in row))
    mean = readout.mean
    r2.add_row("[bold]mean over classes[/]", *(cell(mean[q]) for q in readout.quantities), end_section=True)
    shown = list(enumerate(readout.dims))
    if len(shown) > MAX_POSE_DIMS:  # a CNN's wide layer: the dimensions that follow a quantity most
        shown = sorted(shown, key=lambda d: -d[1][1])[:MAX_POSE_DIMS]
    what = "each dimension" if len(shown) == len(readout.dims) else \
        f"the {len(shown)} of its {len(readout.dims)} dimensions that follow a pose quantity most"
    dims = Table(title=f"what {what} follows most", title_justify="left",
                 caption="|r|: the mean over classes of its correlation with the quantity", caption_justify="left")
    dims.add_column("dim", justify="right")
    dims.add_column("quantity")
    dims.add_column("|r|", justify="right")
    for i, (q, r) in shown:
        dims.add_row(str(i), q, f"{r:.2f}")
    return [r2, dims]


def prediction_table(title: str, classes: Sequence[str], predictions: Sequence[Prediction], k: int) -> Table:
    """`capsx predict`: a row per image, its top-k classes with their scores."""
    table = Table(title=title, title_justify="left")
    table.add_column("file", overflow="fold")
    for i in range(k):
        table.add_column(f"#{i + 1}", justify="left")
    for p in predictions:
        table.add_row(p.file, *(f"{c} {v:.3f}" for c, v in p.top(list(classes), k)))
    return table
