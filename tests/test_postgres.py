"""The team server on a real PostgreSQL: `capsx server --backend-store-uri postgresql://...` on a
database this test starts, a training against it read back, and the server stopped mid-run and
started again with nothing lost. Skipped, saying why, where PostgreSQL or psycopg is missing."""

from __future__ import annotations

import importlib.util

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from capsx.cli import app
from capsx.recipe import recipe_from_dict
from capsx.track.tracker import BUFFER_FILE, Tracker
from capsx.train.device import resolve_device
from capsx.train.loop import Run, fit
from tests import postgres
from tests.conftest import tiny_recipe
from tests.mlflow_server import Server, free_port
from tests.test_tracking import _StopServerAt

pytestmark = [
    pytest.mark.skipif(postgres.why_not() is not None, reason=str(postgres.why_not())),
    pytest.mark.skipif(importlib.util.find_spec("psycopg") is None,
                       reason="psycopg is not installed: pip install 'capsx[postgres]'"),
]


@pytest.fixture
def database():
    db = postgres.Postgres()
    db.start()
    yield db
    db.stop()


def _rows(db: postgres.Postgres, table: str) -> int:
    import psycopg

    with psycopg.connect(db.uri) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_a_training_on_the_postgresql_server_reads_back_and_a_restart_mid_run_loses_nothing(
        workdir, database, monkeypatch):
    srv = Server(workdir / "server", free_port(), backend=database.uri)
    srv.start()
    try:
        recipe = workdir / "r.yaml"
        recipe.write_text(yaml.safe_dump(tiny_recipe(train={"epochs": 2, "seed": 3})))
        res = CliRunner().invoke(app, ["train", str(recipe), "--tracking-uri", srv.uri])
        assert res.exit_code == 0, res.output
        res = CliRunner().invoke(app, ["visualize", "filters", "--tracking-uri", srv.uri])
        assert res.exit_code == 0, res.output
        client = MlflowClient(srv.uri)
        (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
        assert run.info.status == "FINISHED" and run.data.params["train.seed"] == "3"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "test/error")] == [1, 2]
        assert any(a.path.startswith("images") for a in client.list_artifacts(run.info.run_id))
        assert _rows(database, "runs") == 1 and _rows(database, "metrics") > 20  # it is PostgreSQL that holds them

        # the server goes away after step 4 of 18 and comes back on the same database: nothing is lost
        monkeypatch.setattr("capsx.track.tracker.RETRY_SECONDS", 0.5)
        tracker = Tracker.start(srv.uri, "restarted")
        run_dir = workdir / "run"
        (run_dir / "checkpoints").mkdir(parents=True)
        tracker.buffer_dir, tracker.notify = run_dir, lambda message: None
        (run_dir / "run.json").write_text(
            f'{{"run_id": "{tracker.run_id}", "experiment": "restarted", "recipe": "t", '
            f'"tracking_uri": "{srv.uri}", "started": 0}}')
        three = recipe_from_dict(tiny_recipe(train={"epochs": 3, "log_every": 1}), "t")
        fit(three, Run(resolve_device("cpu"), workdir, run_dir, tracker, _StopServerAt(srv, 4)))
        left = tracker.end("FINISHED")
        assert left > 0 and (run_dir / BUFFER_FILE).is_file()
        srv.start()
        res = CliRunner().invoke(app, ["sync", str(run_dir)])
        assert res.exit_code == 0 and f"sent {left} of {left}" in res.output, res.output
        assert client.get_run(tracker.run_id).info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(tracker.run_id, "test/error")] == [1, 2, 3]
        steps = sorted(m.step for m in client.get_metric_history(tracker.run_id, "train/step_loss"))
        assert steps == list(range(1, 19))
    finally:
        srv.stop()
