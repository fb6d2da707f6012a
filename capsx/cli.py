"""The `capsx` command line: thin Typer commands over the library.

Each command parses, loads what it needs, calls one library function and
prints with Rich. A `CapsxError` becomes one red line and its exit code.
"""

from __future__ import annotations

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


def handles_errors(fn: F) -> F:
    """Turn the project's errors into one red line and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from capsx.console import print_error

        try:
            return fn(*args, **kwargs)
        except CapsxError as e:
            print_error(str(e))
            raise typer.Exit(e.exit_code) from None

    return wrapper  # type: ignore[return-value]


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
    from capsx.runtime import keep_large_tensors_on_heap

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
) -> None:
    """Train a recipe: progress bar, test evaluation every epoch, checkpoints, MLflow run."""
    from capsx.checkpoint import load_checkpoint
    from capsx.recipe import load_recipe, recipe_from_dict
    from capsx.runs import resolve_checkpoint

    changes = [*(set_ or []), *(overrides or [])]
    payload = None
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
    from capsx.experiment import run_training

    code = run_training(loaded, recipe_path=str(recipe or resume), data_root=data_root, tracking_uri=tracking_uri,
                        track=not no_track, runs_dir=runs_dir, resume=payload,
                        resume_dir=ckpt.parent.parent if payload is not None else None)
    if code:
        raise typer.Exit(code)


# ----------------------------------------------------------------------------------------------- eval


@app.command("eval")
@handles_errors
def eval_(
    run: Annotated[str, typer.Argument(help="An MLflow run id, 'latest', or a checkpoint path.")] = "latest",
    data_root: DataRootOpt = None,
    tracking_uri: TrackingOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
    log: Annotated[bool, typer.Option("--log/--no-log", help="Log the results to the run in MLflow.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
) -> None:
    """Test error, per-class accuracy and confusion matrix of a trained run."""
    from capsx.experiment import run_evaluation

    run_evaluation(run, data_root=data_root, tracking_uri=tracking_uri, runs_dir=runs_dir, log=log,
                   device_name=device)


# -------------------------------------------------------------------------------------------- summary


@app.command()
@handles_errors
def summary(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    overrides: OverridesArg = None,
    set_: SetOpt = None,
) -> None:
    """Per-layer table of the recipe's model: output shapes and parameters, with totals."""
    from rich.table import Table

    from capsx.console import console, key_value_table
    from capsx.models import build_model
    from capsx.recipe import load_recipe
    from capsx.summary import summarize

    r = load_recipe(recipe, [*(set_ or []), *(overrides or [])])
    shape, classes = r.data.input_shape, r.data.classes
    model = build_model(r.model, shape, len(classes))
    s = summarize(model, shape)
    table = Table(title=f"{r.model.name} on {r.data.name} {'x'.join(map(str, shape))}", title_justify="left")
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
    console.print(key_value_table("totals", rows))


# ------------------------------------------------------------------------------------------------- ui


@app.command()
@handles_errors
def ui(
    tracking_uri: TrackingOpt = None,
    host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 unless you mean to share.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the web UI.")] = 5000,
) -> None:
    """Open the MLflow UI on the same store `train` logs to."""
    from capsx.console import console
    from capsx.tracking import local_store_dir, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, None)
    mlflow_bin = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    cmd = [mlflow_bin, "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    store = local_store_dir(uri)
    if store is not None:
        cmd += ["--default-artifact-root", (store / "artifacts").resolve().as_uri()]
    with socket.socket() as s:
        if s.connect_ex((host, port)) == 0:
            raise CapsxError(f"port {port} on {host} is already in use; pass --port")
    console.print(f"MLflow UI for {uri} at http://{host}:{port} (Ctrl-C to stop)", soft_wrap=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    # MLflow 3 also starts a pool of job workers (for GenAI evaluation jobs); browsing runs needs none.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    sys.stdout.flush()
    os.execve(mlflow_bin, cmd, env)  # become mlflow: Ctrl-C and SIGTERM reach it (and its server) directly


def main() -> None:
    app()
