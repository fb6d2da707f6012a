"""`summary` (a model's layers), `sync` (a run's buffered tracking calls) and `bench` (capsx against the
plain reference)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from capsx.cli.app import app, handles_errors
from capsx.cli.options import OverridesArg, RunsDirOpt, SetOpt, TrackingOpt
from capsx.errors import CapsxError

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
    import torch

    from capsx.console import console, summary_tables
    from capsx.models import build_model
    from capsx.models.transfer import freeze_layers, prepare_transfer
    from capsx.recipe import load_recipe
    from capsx.summary import summarize

    r = load_recipe(recipe, [*(set_ or []), *(overrides or [])])
    shape = _parse_shape(input_shape) if input_shape else r.data.input_shape
    num_classes = classes or len(r.data.classes)
    where = f"--input {input_shape}" if input_shape else f"{recipe}: {r.data.name}'s {'x'.join(map(str, shape))}"
    try:  # too small an input for the kernels: the model's own check (ValueError) or torch's (RuntimeError)
        # on the meta device: shapes, parameter counts and FLOPs without allocating a weight or an
        # activation, so any --input is answered at once (the same table, to the FLOP, as on the CPU)
        with torch.device("meta"):
            model = build_model(r.model, shape, num_classes, r.data.objects)
        prepare_transfer(model, r.model, shape, num_classes, load=False)  # model.freeze, as training sets it
        layers = summarize(model, shape)
    except (ValueError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CapsxError(f"{where}: {r.model.name} cannot take inputs of this shape ({reason})") from None
    title = (f"{r.model.name} on {r.data.name if not input_shape else 'inputs'} {'x'.join(map(str, shape))}, "
             f"{num_classes} classes")
    for table in summary_tables(title, layers, [name for name, _ in freeze_layers(model)]):
        console.print(table)


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
    from capsx.console import console
    from capsx.errors import RunError
    from capsx.jobs.sync import sync_run

    left = sync_run(run_dir, tracking_uri, console.print)
    if left:
        raise RunError(f"the tracking store still does not answer; {left} call(s) left in {run_dir}")


@app.command()
@handles_errors
def bench(
    recipe: Annotated[Path, typer.Argument(help="A CapsNet recipe (its model is benchmarked).")]
    = Path("recipes/mnist-capsnet.yaml"),
    batch: Annotated[int, typer.Option("--batch", min=1, max=1 << 16, help="Training batch.")] = 128,
    infer_batch: Annotated[int, typer.Option("--infer-batch", min=1, max=1 << 16, help="Inference batch.")] = 1000,
    rounds: Annotated[int, typer.Option("--rounds", min=1, max=100, help="Alternating rounds of both paths.")] = 5,
    steps: Annotated[int, typer.Option("--steps", min=1, max=1000, help="Training steps per round and path.")] = 3,
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
    set_: SetOpt = None,
) -> None:
    """Train and inference images/s of capsx's CapsNet against the plain reference (the public code's style),
    with achieved GFLOP/s, % of a matrix-product peak and peak memory (RSS on the CPU, allocated on CUDA)."""
    import json

    from capsx.console import bench_tables, console, err_console
    from capsx.jobs.bench import log_bench, run_bench
    from capsx.recipe import load_recipe
    from capsx.track.tracker import resolve_tracking_uri
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
    r = load_recipe(recipe, set_ or [])  # e.g. --set model.routing=attention: each routing on the same weights
    say = (lambda m: err_console.print(m, style="dim")) if as_json else (lambda m: console.print(m, style="dim"))
    res = run_bench(r, batch=batch, infer_batch=infer_batch, rounds=rounds, steps=steps, precision=precision,
                    compile=compile_, device=dev, progress=say)
    if as_json:
        typer.echo(json.dumps(res.as_json()))
    else:
        title = f"{r.name}: {r.model.name}, {res.routing} routing, {precision}"
        for table in bench_tables(title, res, rounds, dev.type == "cuda"):
            console.print(table)
    if track:
        log_bench(res, r, resolve_tracking_uri(tracking_uri, None, runs_dir))
