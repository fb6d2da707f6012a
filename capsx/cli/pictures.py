"""The picture commands: `perturb` (Fig. 4), `reconstruct` (Figs. 3 and 5) and `visualize` (filters,
activations, routing, saliency, top-activating images). Each opens a trained run, draws, saves PNGs in
its pictures/ folder and logs the same images to its MLflow run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from capsx.cli.app import app, handles_errors, logs_pictures, take_background
from capsx.cli.options import (
    CheckpointOpt,
    DataRootOpt,
    DeviceOpt,
    ImageOpt,
    LogOpt,
    RunOpt,
    RunsDirOpt,
    TrackingOpt,
    context,
)
from capsx.errors import CapsxError

if TYPE_CHECKING:
    from capsx.jobs.context import Context
    from capsx.jobs.pictures import Gallery
    from capsx.jobs.trained import TrainedRun


@contextlib.contextmanager
def _pictures(ctx: Context, run: str | None, checkpoint: Path | None) -> Iterator[tuple[TrainedRun, Gallery]]:
    """The trained run and its gallery, logging through the process `handles_errors` started; leaving it
    waits until every image is in the store."""
    background = take_background()
    try:
        from capsx.jobs.pictures import Gallery  # torch comes in here
        from capsx.jobs.trained import open_run, run_or_checkpoint

        t = open_run(run_or_checkpoint(run, checkpoint), ctx)
        out = Gallery.open(t, ctx, background)
    except BaseException:
        if background is not None:
            with contextlib.suppress(CapsxError):  # the opening's own error is the one to show
                background.close()
        raise
    with out:
        yield t, out


def _parse_range(text: str) -> tuple[float, float]:
    try:
        start, stop = (float(v) for v in text.split(":"))
    except ValueError:
        raise CapsxError(f"--range {text!r}: expected START:STOP, e.g. -0.25:0.25") from None
    return start, stop


def _parse_dims(dim: int | None, dims: str | None) -> list[int] | None:
    if dim is not None and dims is not None:
        raise CapsxError("give --dim N or --dims LIST|all, not both")
    if dim is not None:
        return [dim]
    if dims is None or dims == "all":
        return None
    try:
        return [int(d) for d in dims.split(",")]
    except ValueError:
        raise CapsxError(f"--dims {dims!r}: expected 'all' or a comma-separated list such as 0,3,5") from None


@app.command()
@handles_errors
@logs_pictures
def perturb(
    dim: Annotated[int | None, typer.Option("--dim", help="One capsule dimension: one row per input.")] = None,
    dims: Annotated[str | None, typer.Option("--dims", help="'all' (default) or a list such as 0,3,5: "
                                                            "one row per dimension, a picture per input.")] = None,
    cls: Annotated[int | None, typer.Option("--class", help="Use test images of this class.")] = None,
    samples: Annotated[int | None, typer.Option("--samples", help="How many test images (default: one per class "
                                                                  "with --dim, else one).")] = None,
    value_range: Annotated[str, typer.Option("--range", help="START:STOP of the shifts (use --range=-0.3:0.3).")]
    = "-0.25:0.25",
    steps: Annotated[int, typer.Option("--steps", help="Columns from START to STOP.")] = 11,
    class_mean: Annotated[bool, typer.Option("--class-mean", help="Perturb each class's mean capsule over the "
                                                                  "test set instead of one image's.")] = False,
    image: ImageOpt = None,
    run: RunOpt = None,
    checkpoint: CheckpointOpt = None,
    data_root: DataRootOpt = None,
    tracking_uri: TrackingOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
    log: LogOpt = True,
    device: DeviceOpt = "auto",
) -> None:
    """The paper's Fig. 4: decode the winning class capsule with one dimension shifted at a time."""

    chosen = _parse_dims(dim, dims)
    rng = _parse_range(value_range)
    ctx = context(runs_dir, tracking_uri, data_root, track=log, device=device)
    with _pictures(ctx, run, checkpoint) as (t, out):
        from capsx.jobs.perturb import run_perturb

        run_perturb(t, out, dims=chosen, value_range=rng, steps=steps, cls=cls, samples=samples, image=image,
                    class_mean=class_mean)


@app.command()
@handles_errors
@logs_pictures
def reconstruct(
    count: Annotated[int, typer.Option("--count", min=1, max=100, help="Test images in the main panel.")] = 10,
    misclassified: Annotated[int, typer.Option("--misclassified", help="Mistakes in the strip (0: none).")] = 10,
    force_class: Annotated[int | None, typer.Option(
        "--force-class", help="Decode the capsule of this class instead of the predicted one ('P:').")] = None,
    error_images: Annotated[int | None, typer.Option(
        "--error-images", min=1, help="Test images the mean error is taken over. Default: the whole test split, "
                                      "as the run's own evaluation measured it (kept in its checkpoint); "
                                      "for an older checkpoint, or two-digit images, the first 1000.",
        show_default=False)] = None,
    image: ImageOpt = None,
    run: RunOpt = None,
    checkpoint: CheckpointOpt = None,
    data_root: DataRootOpt = None,
    tracking_uri: TrackingOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
    log: LogOpt = True,
    device: DeviceOpt = "auto",
) -> None:
    """The paper's Fig. 3: inputs above their reconstructions, mistakes marked; the mean reconstruction error."""

    ctx = context(runs_dir, tracking_uri, data_root, track=log, device=device)
    with _pictures(ctx, run, checkpoint) as (t, out):
        from capsx.jobs.reconstruct import run_reconstruct

        run_reconstruct(t, out, count=count, misclassified=misclassified, force_class=force_class, image=image,
                        error_images=error_images)


visualize_app = typer.Typer(help="Look inside a trained model: filters, activations, routing, saliency, "
                                 "top-activating images; with no subcommand, all of them.",
                            invoke_without_command=True)
app.add_typer(visualize_app, name="visualize")


@visualize_app.callback()
@handles_errors
def visualize_all(
    ctx: typer.Context,
    run: RunOpt = None, checkpoint: CheckpointOpt = None, data_root: DataRootOpt = None,
    tracking_uri: TrackingOpt = None, runs_dir: RunsDirOpt = Path("runs"), log: LogOpt = True,
    device: DeviceOpt = "auto",
) -> None:
    """Every picture below with its defaults (the routing only for a CapsNet), when no subcommand is given."""
    if ctx.invoked_subcommand is not None:
        return
    context_ = context(runs_dir, tracking_uri, data_root, track=log, device=device)
    with _pictures(context_, run, checkpoint) as (t, out):
        from capsx.jobs.visualize import every_visualization

        for job in every_visualization(t.model):
            job(t, out)
LayerOpt = Annotated[str | None, typer.Option("--layer", help="A layer name as `capsx summary` lists it "
                                                              "(default: the first conv layer).")]
IndexOpt = Annotated[int, typer.Option("--index", help="Which test image.")]
OneImageOpt = Annotated[Path | None, typer.Option("--image", help="Your own image instead of a test image.")]


@visualize_app.command("filters")
@handles_errors
@logs_pictures
def visualize_filters(
    layer: LayerOpt = None,
    in_channel: Annotated[int | None, typer.Option("--in-channel", help="Show the kernels of this input channel "
                                                                        "(default: mean |w| when there are many).")]
    = None,
    run: RunOpt = None, checkpoint: CheckpointOpt = None, tracking_uri: TrackingOpt = None,
    runs_dir: RunsDirOpt = Path("runs"), log: LogOpt = True, device: DeviceOpt = "auto",
) -> None:
    """A conv layer's weights as a tile grid, each filter normalised (CapsNet's Conv1: 256 9x9 kernels)."""

    ctx = context(runs_dir, tracking_uri, None, track=log, device=device)
    with _pictures(ctx, run, checkpoint) as (t, out):
        from capsx.jobs.visualize import run_filters

        run_filters(t, out, layer=layer, in_channel=in_channel)


@visualize_app.command("activations")
@handles_errors
@logs_pictures
def visualize_activations(
    layer: LayerOpt = None, index: IndexOpt = 0, image: OneImageOpt = None,
    run: RunOpt = None, checkpoint: CheckpointOpt = None, data_root: DataRootOpt = None,
    tracking_uri: TrackingOpt = None, runs_dir: RunsDirOpt = Path("runs"), log: LogOpt = True,
    device: DeviceOpt = "auto",
) -> None:
    """Feature maps of a layer for one input, a tile per channel (dead channels black); for a CapsNet also
    the length of every primary capsule over its grid."""

    ctx = context(runs_dir, tracking_uri, data_root, track=log, device=device)
    with _pictures(ctx, run, checkpoint) as (t, out):
        from capsx.jobs.visualize import run_activations

        run_activations(t, out, layer=layer, index=index, image=image)


@visualize_app.command("routing")
@handles_errors
@logs_pictures
def visualize_routing(
    index: IndexOpt = 0, image: OneImageOpt = None,
    run: RunOpt = None, checkpoint: CheckpointOpt = None, data_root: DataRootOpt = None,
    tracking_uri: TrackingOpt = None, runs_dir: RunsDirOpt = Path("runs"), log: LogOpt = True,
    device: DeviceOpt = "auto",
) -> None:
    """Coupling coefficients c_ij for one input, per class capsule and routing iteration, and the mean
    change of the routing logits b_ij per iteration (the paper's appendix diagnostic)."""

    ctx = context(runs_dir, tracking_uri, data_root, track=log, device=device)
    with _pictures(ctx, run, checkpoint) as (t, out):
        from capsx.jobs.visualize import run_routing

        run_routing(t, out, index=index, image=image)


@visualize_app.command("saliency")
@handles_errors
@logs_pictures
def visualize_saliency(
    index: IndexOpt = 0, image: OneImageOpt = None,
    cls: Annotated[int | None, typer.Option("--class", help="The class to explain (default: the prediction).")]
    = None,
    method: Annotated[str, typer.Option("--method", help="integrated-gradients or grad-cam.")]
    = "integrated-gradients",
    layer: LayerOpt = None,
    steps: Annotated[int, typer.Option("--steps", min=1, max=1024, help="Integrated-gradients steps.")] = 32,
    run: RunOpt = None, checkpoint: CheckpointOpt = None, data_root: DataRootOpt = None,
    tracking_uri: TrackingOpt = None, runs_dir: RunsDirOpt = Path("runs"), log: LogOpt = True,
    device: DeviceOpt = "auto",
) -> None:
    """A heat map of what drives a class: integrated gradients or Grad-CAM (for a CapsNet the class score
    is the capsule's length)."""

    if method not in ("integrated-gradients", "grad-cam"):
        raise CapsxError(f"--method {method!r}: expected integrated-gradients or grad-cam")
    if steps < 1:
        raise CapsxError(f"--steps {steps}: expected at least 1")
    ctx = context(runs_dir, tracking_uri, data_root, track=log, device=device)
    with _pictures(ctx, run, checkpoint) as (t, out):
        from capsx.jobs.visualize import run_saliency

        run_saliency(t, out, index=index, image=image, cls=cls, method=method, layer=layer, steps=steps)


@visualize_app.command("top-activating")
@handles_errors
@logs_pictures
def visualize_top_activating(
    layer: LayerOpt = None,
    channel: Annotated[int, typer.Option("--channel", help="Channel, or capsule type for PrimaryCaps, or class "
                                                           "capsule for the class capsule layer.")] = 0,
    k: Annotated[int, typer.Option("--k", min=1, max=256, help="How many images.")] = 16,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Test images to search.")] = 2000,
    run: RunOpt = None, checkpoint: CheckpointOpt = None, data_root: DataRootOpt = None,
    tracking_uri: TrackingOpt = None, runs_dir: RunsDirOpt = Path("runs"), log: LogOpt = True,
    device: DeviceOpt = "auto",
) -> None:
    """The k test images that drive one channel (or capsule type) most."""

    if k < 1:
        raise CapsxError(f"--k {k}: expected at least 1")
    ctx = context(runs_dir, tracking_uri, data_root, track=log, device=device)
    with _pictures(ctx, run, checkpoint) as (t, out):
        from capsx.jobs.visualize import run_top_activating

        run_top_activating(t, out, layer=layer, channel=channel, k=k, limit=limit)
