"""`capsx train --seeds`: one training per seed, each a child of one MLflow parent run that gets the mean
and standard deviation of the test error (the paper's "mean of 3 trials"), then the seeds as one ensemble."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, replace

from capsx.console import key_value_table
from capsx.jobs.context import Context
from capsx.jobs.ensemble import run_ensemble
from capsx.jobs.training import run_tags, run_training
from capsx.recipe import Recipe, recipe_from_dict
from capsx.track.runs import ensure_writable
from capsx.track.tracker import NullTracker, Tracker
from capsx.train.device import autocast, resolve_device


@dataclass
class SeedSummary:
    seeds: list[int]
    run_ids: list[str]
    final_errors: list[float]  # fractions, one per seed
    best_errors: list[float]

    def stats(self) -> dict[str, float]:
        """Mean and sample standard deviation (n - 1; 0 for one seed) of the test errors."""
        out: dict[str, float] = {"seeds/count": float(len(self.seeds))}
        for key, xs in (("test_error", self.final_errors), ("best_test_error", self.best_errors)):
            out[f"seeds/{key}_mean"], out[f"seeds/{key}_std"] = mean_std(xs)
        return out


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value; NaN for none)."""
    if not xs:
        return math.nan, math.nan
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
    return mean, math.sqrt(var)


def seeded_recipe(recipe: Recipe, seed: int, run_name: str, source: str) -> Recipe:
    """`recipe` with `train.seed` and the run name set, logging the same choices (its overridden keys)."""
    raw = recipe.model_dump(mode="json", exclude_unset=True)
    raw.setdefault("train", {})["seed"] = seed
    raw.setdefault("tracking", {})["run_name"] = run_name
    return recipe_from_dict(raw, source=source).overridden(recipe.overridden_keys)


def run_seeds(recipe: Recipe, seeds: list[int], ctx: Context, *, recipe_path: str) -> tuple[int, SeedSummary]:
    """Train once per seed under one parent run; returns the exit code and the summary."""
    device = resolve_device(recipe.device)
    autocast(device, recipe.train.precision)
    recipe.data.load_splits(ctx.data_root_for(recipe.data))  # a missing or broken data set: an error now
    uri = ctx.store(recipe.tracking.uri)
    parent: Tracker | NullTracker = NullTracker(uuid.uuid4().hex)
    if ctx.track:
        ensure_writable(ctx.runs_dir)
        tags = {**run_tags(recipe, device), "capsx.seeds": ",".join(map(str, seeds))}
        del tags["capsx.seed"]  # each child has its own
        parent = Tracker.start(uri, recipe.tracking.experiment or recipe.name,
                               run_name=f"{recipe.name} seeds {','.join(map(str, seeds))}", tags=tags)
        params = {**recipe.params(), "train.seed": ",".join(map(str, seeds))}
        parent.log_params(params)
    summary = SeedSummary(seeds, [], [], [])
    ctx.say(f"[bold]seeds[/] {', '.join(map(str, seeds))}"
                  + (f": parent run {parent.run_id}" if ctx.track else ""), soft_wrap=True)
    try:
        for seed in seeds:
            child = seeded_recipe(recipe, seed, f"{recipe.tracking.run_name or recipe.name} seed {seed}", recipe_path)
            done = run_training(child, ctx.with_store(uri),
                                recipe_path=recipe_path, parent_run_id=parent.run_id if ctx.track else None)
            if done.code:
                parent.end("KILLED", note=f"stopped during seed {seed} (run {done.run_id})")
                return done.code, summary
            assert done.result is not None and done.result.final is not None
            summary.run_ids.append(done.run_id)
            summary.final_errors.append(done.result.final.error)
            best = done.result.state.best_error
            summary.best_errors.append(best if best is not None else done.result.final.error)
    except BaseException:
        parent.end("FAILED")
        raise
    stats = summary.stats()
    parent.log_metrics(stats, step=0)
    parent.end("FINISHED")
    ctx.say(_seeds_table(recipe, summary, stats, parent.run_id if ctx.track else None))
    if len(seeds) > 1:  # the seeds as one classifier (the paper's CIFAR-10 protocol), logged to the parent
        run_ensemble(summary.run_ids, replace(ctx, tracking_uri=uri if ctx.track else None, device=recipe.device))
    return 0, summary


def _seeds_table(recipe: Recipe, summary: SeedSummary, stats: dict[str, float], parent: str | None) -> object:
    rows = [(f"seed {s}", f"{100 * e:.2f}% final, {100 * b:.2f}% best  (run {r})")
            for s, e, b, r in zip(summary.seeds, summary.final_errors, summary.best_errors, summary.run_ids,
                                  strict=True)]
    rows += [("test error", f"{100 * stats['seeds/test_error_mean']:.2f}% +- {100 * stats['seeds/test_error_std']:.2f}"
                            f" (mean +- std over {len(summary.seeds)} seeds)"),
             ("best test error", f"{100 * stats['seeds/best_test_error_mean']:.2f}% +- "
                                 f"{100 * stats['seeds/best_test_error_std']:.2f}"),
             *([("parent run", parent)] if parent else [])]
    return key_value_table(f"{recipe.name}: {len(summary.seeds)} seeds", rows)
