"""Everything the CLI shows: the progress bar, tables and the one-line errors (Rich)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from capsx.paper import CheckRow
from capsx.train.loop import EpochTotals
from capsx.train.metrics import EvalResult

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

    def step(self, totals: EpochTotals, lr: float) -> None:
        stats = f"loss {totals.mean('loss'):.4f} acc {100 * totals.accuracy:.2f}% {totals.images_per_s:.0f} img/s"
        if self.progress is None:
            self.plain_done += 1
            if self.plain_done % self.plain_every == 0:
                self.console.print(f"  {self.plain_label.format(self.plain_done)}  {stats}  lr {lr:.2e}")
            return
        assert self.task is not None
        self.progress.update(self.task, advance=1, stats=stats)

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
