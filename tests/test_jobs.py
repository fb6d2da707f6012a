"""The jobs as a library: called from Python with a default `Context`, they print nothing and return
what the CLI prints."""

from capsx.jobs.context import Context
from capsx.jobs.evaluation import run_evaluation
from capsx.jobs.perturb import run_perturb
from capsx.jobs.pictures import Gallery
from capsx.jobs.trained import open_run
from capsx.jobs.training import run_training
from capsx.recipe import recipe_from_dict
from tests.conftest import tiny_recipe


def test_jobs_called_from_python_print_nothing_and_return_their_results(workdir, capsys):
    ctx = Context(runs_dir=workdir / "runs", track=False, device="cpu")
    done = run_training(recipe_from_dict(tiny_recipe(), "tiny"), ctx, recipe_path="tiny")
    assert done.code == 0 and done.result is not None and done.result.final is not None
    result = run_evaluation(done.run_id, ctx)  # the one epoch's best.pt, found by run id with tracking off
    assert result.images == 32 and result.error == done.result.final.error

    t = open_run(done.run_id, ctx)
    assert t.run_id == done.run_id and t.epoch == 1 and t.tracking_uri is None
    with Gallery.open(t, ctx) as out:
        run_perturb(t, out, dims=None, value_range=(-0.25, 0.25), steps=3, cls=None, samples=None, image=None,
                    class_mean=False)
    assert not out.tracker.active  # trained with tracking off: nothing to log to
    assert len(out.written) == len(t.classes) and all(p.is_file() for p in out.written)
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err == ""
