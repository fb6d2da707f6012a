"""`capsx train RECIPE --grid KEY=V1,V2 [--grid ...] [--seeds 0,1,2]`: the ablation as one command.

Every cell of the cross product is trained (once, or once per seed) under one MLflow parent run: the
parent holds the grid, each cell is a child (with `--seeds`, a child whose children are its seeds, as
`train --seeds` nests them), and the table of the cells (test error mean +- std over the seeds, best
epoch, parameters, wall time) is built from what MLflow holds, so `capsx eval PARENT` prints the same
table later, and `capsx train --resume PARENT` continues a stopped grid: finished trainings are kept,
an interrupted one continues from its last.pt, the rest start.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from capsx.errors import CapsxError
from capsx.jobs.context import Context
from capsx.jobs.seeds import mean_std, seeded_recipe
from capsx.jobs.training import run_tags, run_training
from capsx.recipe import Recipe, load_recipe, recipe_from_dict
from capsx.track.runs import ensure_writable
from capsx.track.tracker import Tracker, find_run, metric_history, runs_tagged

GRID_TAG = "capsx.grid"  # on the parent: the GridSpec as JSON
PARENT_TAG = "capsx.grid.parent"  # on every cell and seed run: the grid's parent run id
CELL_TAG = "capsx.grid.cell"  # on every cell and seed run: the cell's KEY=VALUE pairs as JSON
ROLE_TAG = "capsx.grid.role"  # "cell" (a cell's parent of its seeds) or "training"

Cell = tuple[tuple[str, str], ...]  # ((key, YAML value), ...) in the order the --grid options came


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """`KEY=V1,V2` options -> [(key, [values])]. Commas inside [...] or {...} belong to the value
    (`model.decoder_hidden=[256,512],[512,1024]`)."""
    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise CapsxError(f"--grid {spec!r}: expected KEY=V1,V2,... (e.g. model.routing=dynamic,none)")
        values = _split_top_level(text)
        if any(not v for v in values):
            raise CapsxError(f"--grid {spec!r}: an empty value; expected KEY=V1,V2,...")
        if len(set(values)) != len(values):
            raise CapsxError(f"--grid {spec!r}: a value is repeated")
        if key in (k for k, _ in axes):
            raise CapsxError(f"--grid {key}: given twice; put all its values in one --grid {key}=V1,V2")
        if key == "train.seed":
            raise CapsxError("--grid train.seed=...: use --seeds 0,1,2 (each cell then trains once per seed)")
        axes.append((key, values))
    return axes


def _split_top_level(text: str) -> list[str]:
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
    out.append(text[start:].strip())
    return out


@dataclass(frozen=True)
class GridSpec:
    """What a grid trains: the recipe file and its --set changes, the axes, and the seeds (None: each
    cell once, with the recipe's seed). Stored on the parent run, so a resume needs nothing else."""

    recipe: str
    changes: list[str]
    axes: list[tuple[str, list[str]]]
    seeds: list[int] | None

    def cells(self) -> list[Cell]:
        return [tuple(zip([k for k, _ in self.axes], values, strict=True))
                for values in itertools.product(*(v for _, v in self.axes))]

    def to_json(self) -> str:
        return json.dumps({"recipe": self.recipe, "changes": self.changes, "axes": self.axes, "seeds": self.seeds})

    @classmethod
    def from_json(cls, text: str) -> GridSpec:
        d = json.loads(text)
        return cls(d["recipe"], list(d["changes"]), [(k, list(v)) for k, v in d["axes"]], d["seeds"])


def cell_label(cell: Cell) -> str:
    return " ".join(f"{k}={v}" for k, v in cell)


def _cell_tag(cell: Cell) -> str:
    return json.dumps([list(kv) for kv in cell])


def cell_recipes(spec: GridSpec) -> list[Recipe]:
    """Every cell's recipe, loaded (and so validated) before anything trains: a bad value is one line
    naming the cell, not a failure after hours of the others."""
    out = []
    for cell in spec.cells():
        try:
            out.append(load_recipe(Path(spec.recipe), [*spec.changes, *(f"{k}={v}" for k, v in cell)]))
        except CapsxError as e:
            raise CapsxError(f"--grid cell {cell_label(cell)}: {e}") from None
    return out


def run_grid(spec: GridSpec, ctx: Context, *, resume_parent: str | None = None) -> int:
    """Train every cell not finished yet, then print and log the table; the exit code of an interrupted
    training (130, 143) if one was stopped, else 0."""
    if not ctx.track:
        raise CapsxError("--grid keeps its cells in MLflow (the table and --resume read them); "
                         "it does not go with --no-track")
    recipes = cell_recipes(spec)
    first = recipes[0]
    first.data.load_splits(ctx.data_root_for(first.data))  # a missing data set: an error before any run
    uri = ctx.store(first.tracking.uri)
    experiment = first.tracking.experiment or first.name
    if resume_parent is None:
        ensure_writable(ctx.runs_dir)
        from capsx.train.device import resolve_device

        tags = {**run_tags(first, resolve_device(first.device)), GRID_TAG: spec.to_json()}
        del tags["capsx.seed"]
        axes = "; ".join(f"{k}={','.join(v)}" for k, v in spec.axes)
        parent = Tracker.start(uri, experiment, run_name=f"{first.name} grid {axes}", tags=tags)
        parent.log_params({f"grid.{k}": ",".join(v) for k, v in spec.axes}
                          | {"grid.seeds": ",".join(map(str, spec.seeds)) if spec.seeds else "recipe"})
    else:
        parent = Tracker.attach(uri, resume_parent, reopen=True)
    ctx.say(f"[bold]grid[/] {len(recipes)} cell(s)" + (f" x {len(spec.seeds)} seeds" if spec.seeds else "")
            + f": parent run {parent.run_id}", soft_wrap=True)
    try:
        code = _train_cells(spec, recipes, ctx.with_store(uri), parent.run_id, experiment)
    except BaseException:
        parent.end("FAILED")
        raise
    if code:
        parent.end("KILLED", note="stopped; continue with: capsx train --resume " + parent.run_id)
        ctx.say(f"  continue the grid with: capsx train --resume {parent.run_id}")
        return code
    table = grid_table(uri, parent.run_id)
    parent.log_dict({"cells": [row.as_dict() for row in table.rows]}, "grid.json")
    parent.log_metrics({f"grid/cell{i}_test_error_mean": r.error_mean for i, r in enumerate(table.rows)
                        if r.error_mean is not None}, step=0)
    parent.end("FINISHED")
    ctx.say(table.render())
    return 0


def _train_cells(spec: GridSpec, recipes: list[Recipe], ctx: Context, parent_id: str, experiment: str) -> int:
    uri = ctx.store()
    runs = grid_runs(uri, parent_id)
    for cell, recipe in zip(spec.cells(), recipes, strict=True):
        label, tag = cell_label(cell), _cell_tag(cell)
        mine = [r for r in runs if r.data.tags.get(CELL_TAG) == tag]
        base = {PARENT_TAG: parent_id, CELL_TAG: tag}
        if spec.seeds is None:
            code = _train_once(recipe, ctx, spec, label, mine, parent_id, {**base, ROLE_TAG: "training"})
            if code:
                return code
            continue
        cell_runs = [r for r in mine if r.data.tags.get(ROLE_TAG) == "cell"]
        if cell_runs:
            cell_run = Tracker.attach(uri, cell_runs[0].info.run_id, reopen=cell_runs[0].info.status != "FINISHED")
        else:
            tags = {"mlflow.parentRunId": parent_id, **base, ROLE_TAG: "cell", "capsx.recipe": recipe.name,
                    "capsx.seeds": ",".join(map(str, spec.seeds))}
            cell_run = Tracker.start(uri, experiment, run_name=f"{recipe.name} {label}", tags=tags)
            cell_run.log_params(recipe.params())
        cell_id = cell_run.run_id
        for seed in spec.seeds:
            seeded = seeded_recipe(recipe, seed, f"{recipe.name} {label} seed {seed}", spec.recipe)
            done = [r for r in mine if r.data.tags.get(ROLE_TAG) == "training"
                    and r.data.tags.get("capsx.seed") == str(seed)]
            code = _train_once(seeded, ctx, spec, f"{label} seed {seed}", done, cell_id,
                               {**base, ROLE_TAG: "training"})
            if code:
                cell_run.end("KILLED", note=f"stopped during seed {seed}")
                return code
        errors = [r.error for r in _leaf_rows(grid_runs(uri, parent_id), tag)]
        mean, std = mean_std(errors)
        cell_run.log_metrics({"seeds/test_error_mean": mean, "seeds/test_error_std": std,
                              "seeds/count": float(len(errors))}, step=0)
        cell_run.end("FINISHED")
    return 0


def _train_once(recipe: Recipe, ctx: Context, spec: GridSpec, label: str, existing: list[Any], parent_id: str,
                tags: dict[str, str]) -> int:
    """One training of the grid: kept if a run of it finished, continued if one stopped with a last.pt,
    else started."""
    finished = [r for r in existing if r.info.status == "FINISHED"]
    if finished:
        ctx.say(f"[dim]{label}: finished already (run {finished[0].info.run_id})[/]", soft_wrap=True)
        return 0
    ctx.say(f"[bold]cell[/] {label}", soft_wrap=True)
    for run in existing:  # a stopped one: continue where it stopped
        last = Path(run.data.tags.get("capsx.run_dir", "")) / "checkpoints" / "last.pt"
        if run.data.tags.get("capsx.run_dir") and last.is_file():
            from capsx.train.checkpoint import Checkpoint

            ckpt = Checkpoint.read(last)
            resumed = recipe_from_dict(ckpt.recipe, source=str(last))
            return run_training(resumed, ctx, recipe_path=spec.recipe, resume=ckpt).code
    return run_training(recipe, ctx, recipe_path=spec.recipe, parent_run_id=parent_id, extra_tags=tags).code


def grid_runs(uri: str, parent_id: str) -> list[Any]:
    """Every cell and seed run of the grid `parent_id` (MLflow Run objects), oldest first."""
    return runs_tagged(uri, PARENT_TAG, parent_id)


@dataclass
class LeafRow:
    run_id: str
    error: float  # final test error, a fraction
    best_error: float
    best_epoch: int
    params: int | None
    seconds: float


def _leaf_rows(runs: list[Any], tag: str, uri: str | None = None) -> list[LeafRow]:
    out = []
    for r in runs:
        if (r.data.tags.get(CELL_TAG) != tag or r.data.tags.get(ROLE_TAG) != "training"
                or r.info.status != "FINISHED" or "test/error" not in r.data.metrics):
            continue
        best, best_epoch = r.data.metrics["test/error"], -1
        if uri is not None:
            history = metric_history(uri, r.info.run_id, "test/error")
            if history:
                best_m = min(history, key=lambda m: (m.value, m.step))
                best, best_epoch = best_m.value, best_m.step
        params = r.data.tags.get("model.num_params")
        seconds = ((r.info.end_time or r.info.start_time) - r.info.start_time) / 1000
        out.append(LeafRow(r.info.run_id, r.data.metrics["test/error"], best, best_epoch,
                           int(params) if params else None, seconds))
    return out


@dataclass
class GridRow:
    cell: Cell
    trainings: list[LeafRow]
    expected: int  # trainings the cell has when done (its seeds, or 1)

    @property
    def error_mean(self) -> float | None:
        return mean_std([t.error for t in self.trainings])[0] if self.trainings else None

    def as_dict(self) -> dict[str, Any]:
        mean, std = mean_std([t.error for t in self.trainings])
        return {"cell": dict(self.cell), "runs": [t.run_id for t in self.trainings],
                "test_error_mean": mean if self.trainings else None,
                "test_error_std": std if self.trainings else None,
                "best_epochs": [t.best_epoch for t in self.trainings],
                "params": self.trainings[0].params if self.trainings else None,
                "seconds": sum(t.seconds for t in self.trainings), "done": len(self.trainings) == self.expected}


@dataclass
class GridTable:
    title: str
    spec: GridSpec
    rows: list[GridRow]

    def render(self) -> Table:
        keys = [k for k, _ in self.spec.axes]
        short = [k.rsplit(".", 1)[-1] for k in keys]
        names = short if len(set(short)) == len(short) else keys  # the last part of each key, unless ambiguous
        n = len(self.spec.seeds) if self.spec.seeds else 1
        over = f"mean +- std over {n} seeds" if self.spec.seeds else "one training per cell"
        over += "; time: the cell's trainings, evaluation included"
        caption = "; ".join([f"test error: {over}", *(f"{a} = {k}" for a, k in zip(names, keys, strict=True)
                                                        if a != k)])
        table = Table(title=self.title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, caption=caption,
                      caption_justify="left")
        for name in names:
            table.add_column(name, no_wrap=True, min_width=len(name))
        for header in ("test error %", "best epochs", "params", "time"):
            table.add_column(header, justify="right", no_wrap=True, min_width=len(header))
        for row in self.rows:
            d = row.as_dict()
            values = [v for _, v in row.cell]
            if not row.trainings:
                table.add_row(*values, "not trained", "", "", "")
                continue
            error = f"{100 * d['test_error_mean']:.2f}"
            if self.spec.seeds:
                error += f" +- {100 * d['test_error_std']:.2f}"
            if not d["done"]:
                error += f" ({len(row.trainings)} of {row.expected})"
            table.add_row(*values, error, ", ".join(map(str, d["best_epochs"])),
                          f"{d['params']:,}" if d["params"] else "?", _duration(d["seconds"]))
        return table


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def grid_table(uri: str, parent_id: str) -> GridTable:
    """The grid's table from MLflow alone (what `capsx eval PARENT` prints)."""
    parent = find_run(uri, parent_id)
    if parent is None or GRID_TAG not in parent.data.tags:
        raise CapsxError(f"run {parent_id}: not a --grid parent run in {uri}")
    spec = GridSpec.from_json(parent.data.tags[GRID_TAG])
    runs = grid_runs(uri, parent_id)
    rows = [GridRow(cell, _leaf_rows(runs, _cell_tag(cell), uri), len(spec.seeds) if spec.seeds else 1)
            for cell in spec.cells()]
    return GridTable(f"{parent.info.run_name}\nparent run {parent_id}", spec, rows)


def grid_spec_of(uri: str, run_id: str) -> GridSpec | None:
    """The grid a parent run trains, or None if `run_id` is no grid parent (or not in this store)."""
    run = find_run(uri, run_id)
    return GridSpec.from_json(run.data.tags[GRID_TAG]) if run is not None and GRID_TAG in run.data.tags else None
