"""Options several commands share, declared once, and the `Context` built from them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from capsx.jobs.context import Context

DataRootOpt = Annotated[Path | None, typer.Option(
    "--data-root", help="Folder holding the data sets (e.g. MNIST/raw/). Default: the recipe's data.root, "
                        "else $CAPSX_DATA, else ./data.")]
TrackingOpt = Annotated[str | None, typer.Option(
    "--tracking-uri", help="MLflow tracking URI. Default: the recipe's tracking.uri, else "
                           "$MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db.")]
RunsDirOpt = Annotated[Path, typer.Option("--runs-dir", help="Where run directories (checkpoints) go.")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="Override a recipe value: key.path=value (repeatable; the value is YAML).")]
OverridesArg = Annotated[list[str] | None, typer.Argument(
    help="More key.path=value overrides, e.g. train.epochs=1 data.subset=2000.", show_default=False)]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")]
RunOpt = Annotated[str | None, typer.Option("--run", help="A run id or 'latest' (default: latest).")]
CheckpointOpt = Annotated[Path | None, typer.Option("--checkpoint", help="A checkpoint file instead of a run.")]
LogOpt = Annotated[bool, typer.Option("--log/--no-log", help="Log the pictures to the run in MLflow.")]
ImageOpt = Annotated[list[Path] | None, typer.Option(
    "--image", help="Your own image file (repeatable), prepared as the run's images were: a digit made grey, "
                    "inverted if dark-on-light, scaled and centred; a photo resized and centre-cropped.")]


def context(runs_dir: Path, tracking_uri: str | None, data_root: Path | None = None, track: bool = True,
            device: str = "auto") -> Context:
    """The command's options as one `Context` that prints to the console (imported late: `--help` loads
    nothing more than Typer)."""
    from capsx.console import console
    from capsx.jobs.context import Context

    return Context(runs_dir, tracking_uri, data_root, track, device, say=console.print, progress=True)
