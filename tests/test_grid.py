"""`capsx train --grid`: the cross product, nesting, the table from MLflow, and a stopped grid resumed."""

import os
import signal

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from capsx.cli import app
from capsx.errors import CapsxError
from capsx.jobs import training
from capsx.jobs.context import Context
from capsx.jobs.grid import CELL_TAG, GridSpec, grid_runs, grid_table, parse_grid, run_grid
from capsx.train.loop import QuietReporter
from tests.conftest import tiny_recipe


def test_grid_values_split_at_top_level_commas_and_bad_axes_are_one_line():
    assert parse_grid(["model.routing=dynamic,none", "model.decoder_hidden=[8,16],[16, 32]"]) == [
        ("model.routing", ["dynamic", "none"]), ("model.decoder_hidden", ["[8,16]", "[16, 32]"])]
    spec = GridSpec("r.yaml", [], parse_grid(["a.x=1,2", "b.y=p,q,r"]), None)
    assert [dict(c) for c in spec.cells()][:4] == [{"a.x": "1", "b.y": "p"}, {"a.x": "1", "b.y": "q"},
                                                  {"a.x": "1", "b.y": "r"}, {"a.x": "2", "b.y": "p"}]
    assert len(spec.cells()) == 6 and GridSpec.from_json(spec.to_json()) == spec
    for bad, words in [("model.routing", "expected KEY=V1,V2"), ("=1,2", "expected KEY=V1,V2"),
                       ("a.x=1,,2", "an empty value"), ("a.x=1,1", "repeated"), ("train.seed=0,1", "--seeds")]:
        with pytest.raises(CapsxError, match=words):
            parse_grid([bad])
    with pytest.raises(CapsxError, match="given twice"):
        parse_grid(["a.x=1", "a.x=2"])


class _StopAt(QuietReporter):
    """A reporter whose `at`-th training step of the whole process sends SIGINT, as Ctrl-C would."""

    steps = 0
    at = 10**9

    def step(self, totals, lr, steps=1):
        type(self).steps += steps
        if type(self).steps == type(self).at:
            os.kill(os.getpid(), signal.SIGINT)


def _recipe(workdir) -> str:
    raw = tiny_recipe(data={"name": "shapes", "train_size": 48, "test_size": 16, "batch_size": 16},
                      train={"epochs": 2, "seed": 0}, tracking={"pictures_every": 0})
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_a_grid_of_2_cells_x_2_seeds_stopped_by_ctrl_c_resumes_to_the_table_an_uninterrupted_one_gives(
        workdir, monkeypatch):
    recipe = _recipe(workdir)
    spec = GridSpec(recipe, [], parse_grid(["model.routing=dynamic,none"]), [0, 1])
    monkeypatch.setattr(training, "ProgressReporter", _StopAt)
    _StopAt.steps, _StopAt.at = 0, 2 * 6 + 4  # 6 steps a training: the third (cell none, seed 0), in epoch 2
    ctx = Context(workdir / "runs", progress=True)
    assert run_grid(spec, ctx) == 130
    uri = f"sqlite:///{workdir}/runs/mlflow.db"
    client = MlflowClient(uri)
    (parent,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                 if "capsx.grid" in r.data.tags]
    assert parent.info.status == "KILLED"
    before = {r.info.run_id: r.info.status for r in grid_runs(uri, parent.info.run_id)}
    assert sorted(before.values()) == ["FINISHED", "FINISHED", "FINISHED", "KILLED", "KILLED"]  # 2 seeds + cell
    _StopAt.at = 10**9
    assert run_grid(GridSpec.from_json(parent.data.tags["capsx.grid"]), ctx, resume_parent=parent.info.run_id) == 0

    runs = grid_runs(uri, parent.info.run_id)
    assert all(r.info.status == "FINISHED" for r in runs) and len(runs) == 2 + 2 * 2  # 2 cell runs, 4 trainings
    assert set(before) <= {r.info.run_id for r in runs}  # kept and continued in their own runs, none restarted
    for r in runs:  # each seed nested under its cell, each cell under the grid
        role, up = r.data.tags["capsx.grid.role"], r.data.tags["mlflow.parentRunId"]
        if role == "cell":
            assert up == parent.info.run_id
        else:
            assert client.get_run(up).data.tags["capsx.grid.role"] == "cell"
            assert client.get_run(up).data.tags[CELL_TAG] == r.data.tags[CELL_TAG]
    table = grid_table(uri, parent.info.run_id)
    assert [dict(row.cell) for row in table.rows] == [{"model.routing": "dynamic"}, {"model.routing": "none"}]
    assert [len(row.trainings) for row in table.rows] == [2, 2]
    # the resumed training ends where one never stopped ends: the same cell and seed, trained straight through
    resumed = next(r for r in runs if before.get(r.info.run_id) == "KILLED"
                   and r.data.tags["capsx.grid.role"] == "training")
    raw = yaml.safe_load((workdir / "tiny.yaml").read_text())
    raw["model"]["routing"], raw["tracking"]["experiment"] = "none", "straight"
    (workdir / "straight.yaml").write_text(yaml.safe_dump(raw))
    assert CliRunner().invoke(app, ["train", str(workdir / "straight.yaml")]).exit_code == 0
    (straight,) = client.search_runs([client.get_experiment_by_name("straight").experiment_id])
    assert client.get_run(resumed.info.run_id).data.metrics["test/loss"] == straight.data.metrics["test/loss"]

    mean = table.rows[1].as_dict()["test_error_mean"]
    errors = [client.get_run(t.run_id).data.metrics["test/error"] for t in table.rows[1].trainings]
    assert mean == pytest.approx(sum(errors) / 2)
    assert client.get_run(table.rows[1].trainings[0].run_id).data.tags["capsx.seed"] == "0"
    # `capsx eval PARENT` prints the table again from MLflow alone
    res = CliRunner().invoke(app, ["eval", parent.info.run_id])
    assert res.exit_code == 0, res.output
    assert "dynamic" in res.output and "none" in res.output and f"{100 * mean:.2f} +- " in res.output
    assert "…" not in res.output  # nothing cut at 80 columns
    assert "test error: mean +- std over 2 seeds" in res.output
    logged = client.get_run(parent.info.run_id)
    assert logged.info.status == "FINISHED" and logged.data.metrics["grid/cell1_test_error_mean"] == mean


def test_grid_on_the_command_line_one_training_per_cell_and_resume_of_a_finished_grid_trains_nothing(workdir):
    recipe = _recipe(workdir)
    res = CliRunner().invoke(app, ["train", recipe, "--grid", "model.routing=dynamic,attention", "--set",
                                   "train.epochs=1"])
    assert res.exit_code == 0, res.output
    client = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
                 if "capsx.grid" in r.data.tags]
    kids = grid_runs(f"sqlite:///{workdir}/runs/mlflow.db", parent.info.run_id)
    assert len(kids) == 2 and {r.data.params["model.routing"] for r in kids} == {"dynamic", "attention"}
    assert all(r.data.params["train.epochs"] == "1" for r in kids)  # the --set applies to every cell
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in kids)
    again = CliRunner().invoke(app, ["train", "--resume", parent.info.run_id])
    assert again.exit_code == 0 and again.output.count("finished already") == 2, again.output
    assert len(grid_runs(f"sqlite:///{workdir}/runs/mlflow.db", parent.info.run_id)) == 2
