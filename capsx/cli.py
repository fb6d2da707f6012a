"""The `capsx` command line: thin Typer commands over the library.

Each command parses, loads what it needs, calls one library function and
prints with Rich. A `CapsxError` becomes one red line and its exit code.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from capsx import __version__
from capsx.errors import CapsxError

app = typer.Typer(
    name="capsx",
    help="Train, evaluate and look inside Capsule Networks and the CNNs they are measured against.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals would print whole tensors
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., Any])

# Options shared by several commands.
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


_process_entry = False  # set by `main()`: the process is capsx's own (not a host running the app in-process)


_background: Any = None  # a picture command's TrackerProcess, started by `handles_errors`, taken by `_open`


def handles_errors(fn: F) -> F:
    """Turn the project's errors into one red line and an exit code, never a traceback. In capsx's own
    process, also set the float mode a command computes in, before its first tensor (never for --help,
    which Typer answers before the command runs: importing torch alone takes seconds). For a command
    marked `logs_pictures`, first start the process that will log to MLflow, so its start-up overlaps
    torch's import (capsx/track/process.py), unless this process has imported MLflow already."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _background
        # Only where MLflow is not imported yet: a host that has it (a notebook, the tests) gains nothing.
        if getattr(fn, "logs_pictures", False) and kwargs.get("log") and "mlflow" not in sys.modules:
            from capsx.track.process import TrackerProcess

            _background = TrackerProcess()
        if _process_entry:
            from capsx.train.runtime import flush_denormals

            flush_denormals()
        try:
            return fn(*args, **kwargs)
        except CapsxError as e:
            from capsx.console import print_error

            print_error(str(e))
            raise typer.Exit(e.exit_code) from None
        finally:
            left, _background = _background, None
            if left is not None:  # the command failed before `_open` took it
                with contextlib.suppress(CapsxError):
                    left.close()

    return wrapper  # type: ignore[return-value]


def logs_pictures(fn: F) -> F:
    """Mark a picture command (it has a `log` option): `handles_errors` starts its tracking process."""
    fn.logs_pictures = True  # type: ignore[attr-defined]
    return fn


def _version(value: bool) -> None:
    if value:
        import torch

        typer.echo(f"capsx {__version__} (torch {torch.__version__}, python {platform.python_version()})")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    from capsx.train.runtime import keep_large_tensors_on_heap

    keep_large_tensors_on_heap()


# ---------------------------------------------------------------------------------------------- train


@app.command()
@handles_errors
def train(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe YAML file (see recipes/).", show_default=False)] = None,
    overrides: OverridesArg = None,
    set_: SetOpt = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved recipe and exit.")] = False,
    resume: Annotated[str | None, typer.Option(
        "--resume", help="Continue a run exactly: a run id, 'latest', or a path to last.pt.")] = None,
    data_root: DataRootOpt = None,
    tracking_uri: TrackingOpt = None,
    no_track: Annotated[bool, typer.Option("--no-track", help="Do not log to MLflow.")] = False,
    runs_dir: RunsDirOpt = Path("runs"),
    nproc: Annotated[int, typer.Option(
        "--nproc", min=1, help="Train data-parallel in N processes on this machine (torchrun + DDP; gloo on "
                               "CPU, NCCL on CUDA). data.batch_size is the global batch.")] = 1,
    seeds: Annotated[str | None, typer.Option(
        "--seeds", help="Train once per seed, e.g. 0,1,2: one MLflow parent run, a child per seed, and the "
                        "mean +- std of the test error.")] = None,
) -> None:
    """Train a recipe: progress bar, test evaluation every epoch, checkpoints, MLflow run."""
    from capsx.recipe import load_recipe, recipe_from_dict
    from capsx.track.runs import resolve_checkpoint
    from capsx.train.checkpoint import load_checkpoint

    changes = [*(set_ or []), *(overrides or [])]
    payload = None
    if seeds is not None and resume is not None:
        raise CapsxError("--seeds starts new trainings; it does not go with --resume")
    if resume is not None and recipe is not None and "=" in recipe.name and not recipe.exists():
        changes, recipe = [str(recipe), *changes], None  # `--resume RUN key=value`: an override, not a recipe
    if resume is not None:
        if recipe is not None:
            raise CapsxError("--resume continues the recipe stored in the checkpoint; give no recipe file")
        if any(not c.startswith("train.epochs=") for c in changes):
            raise CapsxError("--resume takes no overrides except train.epochs=N (to extend the run)")
        ckpt = resolve_checkpoint(resume, runs_dir, tracking_uri, which="last")
        payload = load_checkpoint(ckpt)
        if "optimizer" not in payload:
            raise CapsxError(f"{ckpt}: holds weights only; --resume needs a run's last.pt")
        loaded = recipe_from_dict(payload["recipe"], source=str(ckpt), overrides=changes)
    elif recipe is None:
        raise CapsxError("missing RECIPE: give a recipe file (e.g. recipes/quickstart.yaml) or --resume RUN")
    else:
        loaded = load_recipe(recipe, changes)
    if print_config:
        typer.echo(loaded.to_yaml(), nl=False)  # plain, unwrapped: it is meant to be piped or saved
        return
    if nproc > 1:
        from capsx.train import distributed

        if seeds is not None:
            raise CapsxError("--seeds with --nproc: not supported together; run each seed with --nproc")
        if distributed.in_worker():
            raise CapsxError("--nproc starts the worker processes itself; under torchrun, leave it out")
        distributed.per_process_batch(loaded.data.batch_size, nproc)  # refused here, before any worker starts
        args = ["train", *([str(recipe)] if recipe is not None else ["--resume", str(ckpt)])]
        args += [a for c in changes for a in ("--set", c)]
        args += ["--runs-dir", str(runs_dir)]
        args += ["--data-root", str(data_root)] if data_root else []
        args += ["--tracking-uri", tracking_uri] if tracking_uri else []
        args += ["--no-track"] if no_track else []
        code = distributed.launch(nproc, args)
        if code:
            raise typer.Exit(code)
        return
    from capsx.experiment import run_seeds, run_training

    if seeds is not None:
        code, _ = run_seeds(loaded, _parse_seeds(seeds), recipe_path=str(recipe), data_root=data_root,
                            tracking_uri=tracking_uri, track=not no_track, runs_dir=runs_dir)
    else:
        code = run_training(loaded, recipe_path=str(recipe or resume), data_root=data_root,
                            tracking_uri=tracking_uri, track=not no_track, runs_dir=runs_dir, resume=payload,
                            resume_dir=ckpt.parent.parent if payload is not None else None).code
    if code:
        raise typer.Exit(code)


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise CapsxError(f"--seeds {text!r}: expected a comma-separated list of integers, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise CapsxError(f"--seeds {text!r}: a seed is repeated; expected distinct seeds")
    return seeds


# ----------------------------------------------------------------------------------------------- eval


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
    data_root: DataRootOpt = None,
    tracking_uri: TrackingOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
    log: Annotated[bool, typer.Option("--log/--no-log", help="Log the results to the run in MLflow.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
) -> None:
    """Test error, per-class accuracy and confusion matrix of trained runs; robustness sweeps; the paper check."""
    from capsx.experiment import run_ensemble, run_evaluation, run_sweep
    from capsx.sweep import parse_sweep

    refs = runs or ["latest"]
    if images is not None and images < 1:
        raise CapsxError(f"--images {images}: expected at least 1")
    if ensemble:
        if sweep is not None:
            raise CapsxError("--ensemble does not go with --sweep (a sweep compares the runs one by one)")
        run_ensemble(refs, data_root=data_root, tracking_uri=tracking_uri, runs_dir=runs_dir, log=log,
                     device_name=device, dataset=dataset, check=check, images=images)
        return
    if sweep is not None:
        spec = parse_sweep(sweep)
        if check or dataset != "test":
            raise CapsxError("--sweep transforms each run's own test split; give it without --check and --dataset")
        run_sweep(refs, spec, images=images, data_root=data_root, tracking_uri=tracking_uri, runs_dir=runs_dir,
                  log=log, device_name=device)
        return
    from capsx.paper import CheckFailed

    failed: list[CheckFailed] = []
    for ref in refs:
        try:
            run_evaluation(ref, data_root=data_root, tracking_uri=tracking_uri, runs_dir=runs_dir, log=log,
                           device_name=device, dataset=dataset, check=check, images=images)
        except CheckFailed as e:  # evaluate every run before saying which missed
            failed.append(e)
    if failed:
        raise failed[0] if len(refs) == 1 else CheckFailed(f"{len(failed)} of {len(refs)} runs outside the "
                                                           f"paper's band; first: {failed[0]}")


# -------------------------------------------------------------------------------------------- summary


@app.command()
@handles_errors
def summary(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    overrides: OverridesArg = None,
    set_: SetOpt = None,
    input_shape: Annotated[str | None, typer.Option(
        "--input", help="Summarise for inputs of this shape, CxHxW (e.g. 3x224x224), instead of the data's.",
        show_default=False)] = None,
    classes: Annotated[int | None, typer.Option(
        "--classes", min=1, help="Summarise for this many classes instead of the data's.", show_default=False)]
    = None,
) -> None:
    """Per-layer table of the recipe's model: output shapes and parameters, with totals."""
    from rich.table import Table

    from capsx.console import console, key_value_table
    from capsx.models import build_model
    from capsx.models.transfer import freeze_layers
    from capsx.recipe import load_recipe
    from capsx.summary import summarize

    r = load_recipe(recipe, [*(set_ or []), *(overrides or [])])
    shape = _parse_shape(input_shape) if input_shape else r.data.input_shape
    num_classes = classes or len(r.data.classes)
    model = build_model(r.model, shape, num_classes, r.data.objects)
    s = summarize(model, shape)
    table = Table(title=f"{r.model.name} on {r.data.name if not input_shape else 'inputs'} "
                        f"{'x'.join(map(str, shape))}, {num_classes} classes", title_justify="left")
    table.add_column("layer")
    table.add_column("type")
    table.add_column("output shape", justify="right")
    table.add_column("params", justify="right")
    for row in s.layers:
        table.add_row(row.name, row.kind, "(" + ", ".join(map(str, row.output_shape)) + ")", f"{row.params:,}")
    console.print(table)
    rows = [("total parameters", f"{s.total_params:,} ({s.total_params / 1e6:.1f}M)"),
            ("trainable", f"{s.trainable_params:,}")]
    if s.decoder_params:
        without = s.total_params - s.decoder_params
        rows.append(("without the decoder", f"{without:,} ({without / 1e6:.1f}M)"))
    rows.append(("forward cost", f"{s.forward_flops / 1e9:.2f} GFLOP per image "
                                 f"(training about 3x: {3 * s.forward_flops / 1e9:.2f})"))
    layers = [name for name, _ in freeze_layers(model)]
    rows.append(("layers (model.freeze)", f"{len(layers)}: {', '.join(layers)}"))
    console.print(key_value_table("totals", rows))


def _parse_shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise CapsxError(f"--input {text!r}: expected channels x height x width, e.g. 3x224x224")
    c, h, w = (int(p) for p in parts)
    return c, h, w


@app.command()
@handles_errors
def sync(
    run_dir: Annotated[Path, typer.Argument(help="A run directory, e.g. runs/<experiment>/<run id>.")],
    tracking_uri: TrackingOpt = None,
) -> None:
    """Send the tracking calls a run kept while its MLflow store was unreachable."""
    from capsx.errors import RunError
    from capsx.experiment import sync_run

    left = sync_run(run_dir, tracking_uri)
    if left:
        raise RunError(f"the tracking store still does not answer; {left} call(s) left in {run_dir}")


@app.command()
@handles_errors
def bench(
    recipe: Annotated[Path, typer.Argument(help="A CapsNet recipe (its model is benchmarked).")]
    = Path("recipes/mnist-capsnet.yaml"),
    batch: Annotated[int, typer.Option("--batch", help="Training batch.")] = 128,
    infer_batch: Annotated[int, typer.Option("--infer-batch", help="Inference batch.")] = 1000,
    rounds: Annotated[int, typer.Option("--rounds", help="Alternating rounds of both paths.")] = 5,
    steps: Annotated[int, typer.Option("--steps", help="Training steps per round and path.")] = 3,
    precision: Annotated[str, typer.Option("--precision", help="fp32, bf16 or fp16 (autocast; fp16 on CUDA "
                                                              "only, with a GradScaler).")] = "fp32",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps (default cpu: the figures in "
                                                         "the README are CPU ones).")] = "cpu",
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile capsx's model first "
                                                           "(the compile time is reported apart).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    track: Annotated[bool, typer.Option("--track/--no-track", help="Log to MLflow, experiment 'bench'.")] = True,
    tracking_uri: TrackingOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """Train and inference images/s of capsx's CapsNet against the plain reference (the public code's style),
    with achieved GFLOP/s, % of a matrix-product peak and peak memory (RSS on the CPU, allocated on CUDA)."""
    import json
    import platform

    import torch

    from capsx.bench import run_bench
    from capsx.console import console, err_console, key_value_table
    from capsx.recipe import load_recipe
    from capsx.track.tracker import Tracker, resolve_tracking_uri
    from capsx.train.device import resolve_device

    if precision not in ("fp32", "bf16", "fp16"):
        raise CapsxError(f"--precision {precision!r}: expected fp32, bf16 or fp16")
    if device not in ("auto", "cpu", "cuda", "mps"):
        raise CapsxError(f"--device {device!r}: expected auto, cpu, cuda or mps")
    if min(batch, infer_batch, rounds, steps) < 1:
        raise CapsxError("--batch, --infer-batch, --rounds and --steps: expected values >= 1")
    dev = resolve_device(device)
    if precision == "fp16" and dev.type != "cuda":
        raise CapsxError(f"--precision fp16 needs --device cuda (this run is on {dev.type}); use bf16 or fp32")
    r = load_recipe(recipe)
    say = (lambda m: err_console.print(m, style="dim")) if as_json else (lambda m: console.print(m, style="dim"))
    res = run_bench(r, batch=batch, infer_batch=infer_batch, rounds=rounds, steps=steps, precision=precision,
                    compile=compile_, device=dev, progress=say)
    out = res.as_json()
    if as_json:
        typer.echo(json.dumps(out))
    else:
        from rich.table import Table

        t = Table(title=f"{r.name}: {r.model.name}, {precision}, {out['device']}, medians of {rounds} rounds",
                  title_justify="left")
        for col in ("", "capsx", "reference", "capsx / reference"):
            t.add_column(col, justify="right" if col else "left")
        def mb(v: object) -> str:
            return "-" if v is None else f"{v:,.0f} MB"

        t.add_row(f"train images/s (batch {batch})", f"{out['train_images_per_s']:.1f}",
                  f"{out['reference_train_images_per_s']:.1f}", f"{out['train_speedup']:.2f}x")
        t.add_row(f"inference images/s (batch {infer_batch})", f"{out['infer_images_per_s']:.1f}",
                  f"{out['reference_infer_images_per_s']:.1f}", f"{out['infer_speedup']:.2f}x")
        gpu = dev.type == "cuda"
        t.add_row(f"peak {'GPU memory (allocated)' if gpu else 'memory (RSS)'}, inference (batch {infer_batch})",
                  mb(out["peak_gpu_mb" if gpu else "peak_rss_mb"]),
                  mb(out["reference_peak_gpu_mb" if gpu else "reference_peak_rss_mb"]), "")
        console.print(t)
        console.print(key_value_table("compute", [
            ("training cost (direct convolutions)", f"{res.train_flops_per_image / 1e9:.2f} GFLOP per image"),
            ("achieved (capsx, training)", f"{out['gflops_achieved']:.0f} GFLOP/s effective: the direct "
                                           "computation's FLOPs per second"),
            ("matrix-product peak (same run)", f"{out['matmul_peak_gflops']:.0f} GFLOP/s "
                                               f"({out['matmul_peak_note']})"),
            ("share of the peak", f"{out['percent_of_matmul_peak']:.0f}%"),
            ("arithmetic capsx performs", f"{res.train_flops_computed_per_image / 1e9:.2f} GFLOP per image, "
                                          f"{out['gflops_computed']:.0f} GFLOP/s"),
            *([("torch.compile (first calls)", f"{res.compile_seconds:.1f} s")] if res.compile_seconds else []),
        ]))
    if track:
        uri = resolve_tracking_uri(tracking_uri, None, runs_dir)
        tracker = Tracker.start(uri, "bench", tags={"capsx.recipe": r.name, "capsx.host": platform.node(),
                                                   "capsx.torch": torch.__version__})
        tracker.log_params({"batch": batch, "infer_batch": infer_batch, "precision": precision, "rounds": rounds,
                            "threads": torch.get_num_threads(), "compile": compile_, "device": out["device"]})
        tracker.log_metrics({k: float(v) for k, v in out.items() if isinstance(v, int | float)}, step=0)
        tracker.end()


# ------------------------------------------------------------------------------------ pictures (shared)

RunOpt = Annotated[str | None, typer.Option("--run", help="A run id or 'latest' (default: latest).")]
CheckpointOpt = Annotated[Path | None, typer.Option("--checkpoint", help="A checkpoint file instead of a run.")]
LogOpt = Annotated[bool, typer.Option("--log/--no-log", help="Log the pictures to the run in MLflow.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")]
ImageOpt = Annotated[list[Path] | None, typer.Option(
    "--image", help="Your own image file (repeatable): made grey, inverted if dark-on-light, scaled, centred.")]


def _open(run: str | None, checkpoint: Path | None, runs_dir: Path, tracking_uri: str | None,
          data_root: Path | None, device: str, log: bool) -> Any:
    """Open a trained run for a picture command, logging through the process `handles_errors` started."""
    global _background
    background, _background = _background, None
    try:
        from capsx.inspection import open_trained

        return open_trained(run, checkpoint, runs_dir=runs_dir, tracking_uri=tracking_uri, data_root=data_root,
                            device_name=device, log=log, background=background)
    except BaseException:
        if background is not None:
            with contextlib.suppress(CapsxError):  # the opening's own error is the one to show
                background.close()
        raise


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
    with _open(run, checkpoint, runs_dir, tracking_uri, data_root, device, log) as t:
        from capsx.inspection import run_perturb  # after _open: torch comes in there

        run_perturb(t, dims=chosen, value_range=rng, steps=steps, cls=cls, samples=samples, image=image,
                    class_mean=class_mean)


@app.command()
@handles_errors
@logs_pictures
def reconstruct(
    count: Annotated[int, typer.Option("--count", help="Test images in the main panel.")] = 10,
    misclassified: Annotated[int, typer.Option("--misclassified", help="Mistakes in the strip (0: none).")] = 10,
    force_class: Annotated[int | None, typer.Option(
        "--force-class", help="Decode the capsule of this class instead of the predicted one ('P:').")] = None,
    error_images: Annotated[int, typer.Option("--error-images", help="Test images the mean error is taken over.")]
    = 1000,
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

    with _open(run, checkpoint, runs_dir, tracking_uri, data_root, device, log) as t:
        from capsx.inspection import run_reconstruct  # after _open: torch comes in there

        run_reconstruct(t, count=count, misclassified=misclassified, force_class=force_class, image=image,
                        error_images=error_images)


visualize_app = typer.Typer(help="Look inside a trained model: filters, activations, routing, saliency, "
                                 "top-activating images.", no_args_is_help=True)
app.add_typer(visualize_app, name="visualize")
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

    with _open(run, checkpoint, runs_dir, tracking_uri, None, device, log) as t:
        from capsx.inspection import run_filters  # after _open: torch comes in there

        run_filters(t, layer=layer, in_channel=in_channel)


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

    with _open(run, checkpoint, runs_dir, tracking_uri, data_root, device, log) as t:
        from capsx.inspection import run_activations  # after _open: torch comes in there

        run_activations(t, layer=layer, index=index, image=image)


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

    with _open(run, checkpoint, runs_dir, tracking_uri, data_root, device, log) as t:
        from capsx.inspection import run_routing  # after _open: torch comes in there

        run_routing(t, index=index, image=image)


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
    steps: Annotated[int, typer.Option("--steps", help="Integrated-gradients steps.")] = 32,
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
    with _open(run, checkpoint, runs_dir, tracking_uri, data_root, device, log) as t:
        from capsx.inspection import run_saliency  # after _open: torch comes in there

        run_saliency(t, index=index, image=image, cls=cls, method=method, layer=layer, steps=steps)


@visualize_app.command("top-activating")
@handles_errors
@logs_pictures
def visualize_top_activating(
    layer: LayerOpt = None,
    channel: Annotated[int, typer.Option("--channel", help="Channel, or capsule type for PrimaryCaps, or class "
                                                           "capsule for the class capsule layer.")] = 0,
    k: Annotated[int, typer.Option("--k", help="How many images.")] = 16,
    limit: Annotated[int, typer.Option("--limit", help="Test images to search.")] = 2000,
    run: RunOpt = None, checkpoint: CheckpointOpt = None, data_root: DataRootOpt = None,
    tracking_uri: TrackingOpt = None, runs_dir: RunsDirOpt = Path("runs"), log: LogOpt = True,
    device: DeviceOpt = "auto",
) -> None:
    """The k test images that drive one channel (or capsule type) most."""

    if k < 1:
        raise CapsxError(f"--k {k}: expected at least 1")
    with _open(run, checkpoint, runs_dir, tracking_uri, data_root, device, log) as t:
        from capsx.inspection import run_top_activating  # after _open: torch comes in there

        run_top_activating(t, layer=layer, channel=channel, k=k, limit=limit)


# ------------------------------------------------------------------------------------------------- ui


@app.command()
@handles_errors
def ui(
    tracking_uri: TrackingOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
    host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 unless you mean to share.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the web UI.")] = 5000,
) -> None:
    """Open the MLflow UI on the same store `train` logs to."""
    from capsx.track.tracker import local_store_dir, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, None, runs_dir)
    args = ["ui", "--backend-store-uri", uri]
    store = local_store_dir(uri)
    if store is not None:
        args += ["--default-artifact-root", (store / "artifacts").resolve().as_uri()]
    _become_mlflow(args, host, port, f"MLflow UI for {uri} at http://{host}:{port} (Ctrl-C to stop)",
                   env={"MLFLOW_TRACKING_URI": uri})


@app.command()
@handles_errors
def server(
    store: Annotated[Path, typer.Option(
        help="Folder of the server's SQLite database (mlflow.db) and artifacts (artifacts/).")] = Path("runs/server"),
    backend_store_uri: Annotated[str | None, typer.Option(
        help="Any MLflow backend store instead (e.g. postgresql://user@host/db); artifacts stay in --store.")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind; 0.0.0.0 shares it with the network "
                                           "(MLflow has no login by default: only on a trusted network).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the server (UI and REST API).")] = 5000,
    allowed_hosts: Annotated[str | None, typer.Option(
        help="Host names clients may use to reach it, e.g. 'gpu-box.lan:5000' (MLflow refuses other hosts' "
             "requests by default).")] = None,
) -> None:
    """Start a shared MLflow tracking server; point runs at it with --tracking-uri http://HOST:PORT."""
    store.mkdir(parents=True, exist_ok=True)
    backend = backend_store_uri or f"sqlite:///{(store / 'mlflow.db').resolve()}"
    artifacts = (store / "artifacts").resolve()
    args = ["server", "--backend-store-uri", backend, "--artifacts-destination", str(artifacts)]
    args += ["--allowed-hosts", allowed_hosts] if allowed_hosts else []
    reach = socket.gethostname() if host == "0.0.0.0" else host
    _become_mlflow(args, host, port, f"MLflow tracking server at http://{reach}:{port} (store {backend}, "
                                     f"artifacts {artifacts}); train against it with: capsx train RECIPE "
                                     f"--tracking-uri http://{reach}:{port}   (Ctrl-C to stop)", env={})


def _become_mlflow(args: list[str], host: str, port: int, banner: str, env: dict[str, str]) -> None:
    """Replace this process by `mlflow ARGS --host --port`: Ctrl-C and SIGTERM then reach it (and its
    web server) directly, as if the user had typed the mlflow command."""
    from capsx.console import console

    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1" if host == "0.0.0.0" else host, port)) == 0:
            raise CapsxError(f"port {port} on {host} is already in use; pass --port")
    mlflow_bin = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    console.print(banner, soft_wrap=True)
    full_env = {**os.environ, **env}
    # MLflow 3 also starts a pool of job workers (for GenAI evaluation jobs); tracking needs none.
    full_env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    sys.stdout.flush()
    os.execve(mlflow_bin, [mlflow_bin, *args, "--host", host, "--port", str(port)], full_env)


def main() -> None:
    """The process entry (`capsx`, `python -m capsx`, torchrun's workers). Subnormal flushing is asked
    for here, not in the app's callback, so a host that runs the app in-process keeps its own float mode;
    it happens when a command starts (`handles_errors`), so `--help` never imports torch."""
    global _process_entry
    _process_entry = True
    app()
