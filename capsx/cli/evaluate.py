"""`capsx eval`: runs on their test split, an affNIST-style set, a sweep of a transform, or as one ensemble."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from capsx.cli.app import app, handles_errors
from capsx.cli.options import DataRootOpt, RunsDirOpt, TrackingOpt, context
from capsx.errors import CapsxError


def _print_grid(ref: str, ctx: object) -> bool:
    """`capsx eval PARENT` of a `train --grid` parent: its table from MLflow (True), else False."""
    from capsx.jobs.context import Context
    from capsx.jobs.grid import grid_spec_of, grid_table
    from capsx.track.runs import is_run_id

    assert isinstance(ctx, Context)
    if not is_run_id(ref) or grid_spec_of(ctx.store(), ref) is None:
        return False
    ctx.say(grid_table(ctx.store(), ref).render())
    return True


@app.command("eval")
@handles_errors
def eval_(
    runs: Annotated[list[str] | None, typer.Argument(
        help="MLflow run ids, 'latest', or checkpoint paths (several: a sweep compares them in one plot).",
        show_default="latest")] = None,
    dataset: Annotated[str, typer.Option(
        "--dataset", help="test (the run's own test split), affnist (the real affNIST test set under "
                          "<data root>/affNIST/) or affine-mnist (MNIST test digits under seeded random affine "
                          "transforms in affNIST's ranges; 40x40).")] = "test",
    check: Annotated[bool, typer.Option(
        "--check", help="Compare with the paper's number in the recipe's `paper:` section; exit 1 outside "
                        "its band.")] = False,
    sweep: Annotated[str | None, typer.Option(
        "--sweep", help="Accuracy over a transform of the test split: NAME=START:STOP:STEP with NAME rotate "
                        "(degrees), scale, shear or shift (pixels), e.g. --sweep rotate=-45:45:5.")] = None,
    images: Annotated[int | None, typer.Option(
        "--images", help="Evaluate a seeded random subset of this many images (the same every time; with "
                         "--sweep, per point).")] = None,
    ensemble: Annotated[bool, typer.Option(
        "--ensemble", help="Evaluate the runs as one classifier: the mean of their class probabilities "
                           "(capsule lengths; a CNN's softmax or sigmoid), the paper's CIFAR-10 protocol. A "
                           "`train --seeds` parent run stands for its seeds.")] = False,
    pose: Annotated[bool, typer.Option(
        "--pose", help="How much of the pose each class capsule holds (a CNN: its penultimate layer): per "
                       "class, R^2 of a linear readout of each pose quantity (shapes: x, y, rotation, scale; "
                       "smallnorb: azimuth, elevation, lighting), fitted on half its test images, scored on "
                       "the other half.")] = False,
    data_root: DataRootOpt = None,
    tracking_uri: TrackingOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
    log: Annotated[bool, typer.Option("--log/--no-log", help="Log the results to the run in MLflow.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
) -> None:
    """Test error, per-class accuracy and confusion matrix of trained runs; robustness sweeps; the paper check."""
    refs = runs or ["latest"]
    if images is not None and images < 1:
        raise CapsxError(f"--images {images}: expected at least 1")
    ctx = context(runs_dir, tracking_uri, data_root, track=log, device=device)
    if len(refs) == 1 and not (ensemble or pose or sweep or check) and _print_grid(refs[0], ctx):
        return
    if pose:
        from capsx.jobs.pose import run_pose

        if ensemble or sweep is not None or check or dataset != "test":
            raise CapsxError("--pose reads each run's own test split; give it without --sweep, --ensemble, "
                             "--check and --dataset")
        for ref in refs:
            run_pose(ref, ctx, images=images)
        return
    if ensemble:
        from capsx.jobs.ensemble import run_ensemble

        if sweep is not None:
            raise CapsxError("--ensemble does not go with --sweep (a sweep compares the runs one by one)")
        run_ensemble(refs, ctx, dataset=dataset, check=check, images=images)
        return
    if sweep is not None:
        from capsx.jobs.sweep import parse_sweep, run_sweep

        spec = parse_sweep(sweep)
        if check or dataset != "test":
            raise CapsxError("--sweep transforms each run's own test split; give it without --check and --dataset")
        run_sweep(refs, spec, ctx, images=images)
        return
    from capsx.jobs.evaluation import run_evaluation
    from capsx.paper import CheckFailed

    failed: list[CheckFailed] = []
    for ref in refs:
        try:
            run_evaluation(ref, ctx, dataset=dataset, check=check, images=images)
        except CheckFailed as e:  # evaluate every run before saying which missed
            failed.append(e)
    if failed:
        raise failed[0] if len(refs) == 1 else CheckFailed(f"{len(failed)} of {len(refs)} runs outside the "
                                                           f"paper's band; first: {failed[0]}")


@app.command()
@handles_errors
def predict(
    run: Annotated[str, typer.Argument(help="An MLflow run id, 'latest', a run folder or a checkpoint file.")],
    images: Annotated[list[Path], typer.Argument(
        help="Image files and folders (every image file under a folder).", show_default=False)],
    top: Annotated[int, typer.Option("--top", min=1, max=100, help="Classes shown per image.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
    csv_path: Annotated[Path | None, typer.Option(
        "--csv", help="Also write a CSV file: a row per image, its top classes and every class's score.")] = None,
    reconstruct: Annotated[bool, typer.Option(
        "--reconstruct", help="CapsNet: also draw each image above its reconstruction (pictures/ of the run).")]
    = False,
    data_root: DataRootOpt = None,
    tracking_uri: TrackingOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
) -> None:
    """Class scores of a trained run for your own images (capsule lengths or softmax), each prepared as the
    run's training images were."""
    ctx = context(runs_dir, tracking_uri, data_root, track=False, device=device)
    if as_json:
        from dataclasses import replace

        from capsx.jobs.context import silent

        ctx = replace(ctx, say=silent)
    from capsx.jobs.predict import image_files, run_predict
    from capsx.jobs.trained import open_run

    files = image_files(images)  # a missing file or an empty folder: before the run is opened
    t = open_run(run, ctx)
    run_predict(t, ctx, files, top=top, as_json=as_json, csv_path=csv_path)
    if reconstruct:
        from capsx.jobs.pictures import Gallery
        from capsx.jobs.reconstruct import run_reconstruct

        with Gallery.open(t, ctx) as out:
            run_reconstruct(t, out, count=len(files), misclassified=0, force_class=None, image=files,
                            error_images=0)
