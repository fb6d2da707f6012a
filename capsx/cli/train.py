"""`capsx train`: a recipe (or `--resume RUN`) to one training, N seeds, or N data-parallel processes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from capsx.cli.app import app, handles_errors
from capsx.cli.options import DataRootOpt, OverridesArg, RunsDirOpt, SetOpt, TrackingOpt, context
from capsx.errors import CapsxError

if TYPE_CHECKING:
    from capsx.jobs.context import Context
    from capsx.recipe import Recipe
    from capsx.train.checkpoint import Checkpoint


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
    grid: Annotated[list[str] | None, typer.Option(
        "--grid", help="KEY=V1,V2 (repeatable): train every cell of the cross product (with --seeds, once per "
                       "seed) under one parent run and print one table; --resume PARENT continues it.")] = None,
) -> None:
    """Train a recipe: progress bar, test evaluation every epoch, checkpoints, MLflow run."""
    changes = [*(set_ or []), *(overrides or [])]
    if seeds is not None and resume is not None:
        raise CapsxError("--seeds starts new trainings; it does not go with --resume")
    if resume is not None and recipe is not None and "=" in recipe.name and not recipe.exists():
        changes, recipe = [str(recipe), *changes], None  # `--resume RUN key=value`: an override, not a recipe
    ctx = context(runs_dir, tracking_uri, data_root, track=not no_track)
    if grid or (resume is not None and _grid_parent(resume, ctx)):
        _grid(recipe, grid or [], resume, changes, seeds, nproc, print_config, ctx)
        return
    loaded, ckpt = _recipe_to_train(recipe, resume, changes, ctx.runs_dir, ctx.tracking_uri)
    if print_config:
        typer.echo(loaded.to_yaml(), nl=False)  # plain, unwrapped: it is meant to be piped or saved
        return
    if nproc > 1:
        _launch(nproc, loaded, recipe, ckpt, changes, seeds, runs_dir, data_root, tracking_uri, no_track)
        return
    from capsx.jobs.seeds import run_seeds
    from capsx.jobs.training import run_training

    if seeds is not None:
        code, _ = run_seeds(loaded, _parse_seeds(seeds), ctx, recipe_path=str(recipe))
    else:
        code = run_training(loaded, ctx, recipe_path=str(recipe or resume), resume=ckpt).code
    if code:
        raise typer.Exit(code)


def _grid_parent(resume: str, ctx: Context) -> bool:
    from capsx.jobs.grid import grid_spec_of
    from capsx.track.runs import is_run_id

    return is_run_id(resume) and grid_spec_of(ctx.store(), resume) is not None


def _grid(recipe: Path | None, grid: list[str], resume: str | None, changes: list[str], seeds: str | None,
          nproc: int, print_config: bool, ctx: Context) -> None:
    """`--grid` (a new grid) or `--resume PARENT` (a stopped one)."""
    from capsx.jobs.grid import GridSpec, grid_spec_of, parse_grid, run_grid

    if nproc > 1 or print_config:
        raise CapsxError("--grid trains its cells one at a time in this process; it does not go with "
                         + ("--nproc" if nproc > 1 else "--print-config (print one cell with --set instead)"))
    if resume is not None:
        if grid or recipe is not None or changes:
            raise CapsxError("--resume PARENT continues the grid stored in the parent run; give no recipe, "
                             "--grid or overrides")
        spec = grid_spec_of(ctx.store(), resume)
        assert spec is not None
    else:
        if recipe is None:
            raise CapsxError("--grid needs a RECIPE file, e.g. capsx train recipes/mnist-capsnet.yaml "
                             "--grid model.routing=dynamic,none")
        spec = GridSpec(str(recipe), changes, parse_grid(grid), _parse_seeds(seeds) if seeds is not None else None)
    code = run_grid(spec, ctx, resume_parent=resume)
    if code:
        raise typer.Exit(code)


def _recipe_to_train(recipe: Path | None, resume: str | None, changes: list[str], runs_dir: Path,
                     tracking_uri: str | None) -> tuple[Recipe, Checkpoint | None]:
    """The recipe file with its overrides, or the resumed checkpoint's own recipe (and the checkpoint)."""
    from capsx.recipe import load_recipe, recipe_from_dict

    if resume is None:
        if recipe is None:
            raise CapsxError("missing RECIPE: give a recipe file (e.g. recipes/quickstart.yaml) or --resume RUN")
        return load_recipe(recipe, changes), None
    from capsx.track.runs import resolve_checkpoint
    from capsx.train.checkpoint import Checkpoint

    if recipe is not None:
        raise CapsxError("--resume continues the recipe stored in the checkpoint; give no recipe file")
    if any(not c.startswith("train.epochs=") for c in changes):
        raise CapsxError("--resume takes no overrides except train.epochs=N (to extend the run)")
    ckpt = Checkpoint.read(resolve_checkpoint(resume, runs_dir, tracking_uri, which="last"))
    if not ckpt.resumable:
        raise CapsxError(f"{ckpt.path}: holds weights only; --resume needs a run's last.pt")
    return recipe_from_dict(ckpt.recipe, source=str(ckpt.path), overrides=changes), ckpt


def _launch(nproc: int, loaded: Recipe, recipe: Path | None, ckpt: Checkpoint | None, changes: list[str],
            seeds: str | None, runs_dir: Path, data_root: Path | None, tracking_uri: str | None,
            no_track: bool) -> None:
    """Start `nproc` workers with torchrun, each running this same command (without --nproc)."""
    from capsx.train import distributed
    from capsx.train.device import resolve_device

    if seeds is not None:
        raise CapsxError("--seeds with --nproc: not supported together; run each seed with --nproc")
    if distributed.in_worker():
        raise CapsxError("--nproc starts the worker processes itself; under torchrun, leave it out")
    distributed.per_process_batch(loaded.data.batch_size, nproc)  # refused here, before any worker starts
    if resolve_device(loaded.device).type == "cuda":
        distributed.check_gpus(nproc)
    args = ["train", *([str(recipe)] if ckpt is None else ["--resume", str(ckpt.path)])]
    args += [a for c in changes for a in ("--set", c)]
    args += ["--runs-dir", str(runs_dir)]
    args += ["--data-root", str(data_root)] if data_root else []
    args += ["--tracking-uri", tracking_uri] if tracking_uri else []
    args += ["--no-track"] if no_track else []
    code = distributed.launch(nproc, args)
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
