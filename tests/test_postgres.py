"""The team server on a real PostgreSQL: `capsx server --backend-store-uri postgresql://...` on a
database this test starts, a training against it read back (the rows in PostgreSQL's tables).
Skipped, saying why, where PostgreSQL or psycopg is missing. The server stopped mid-run and started
again is tests/test_tracking.py's, which runs on PostgreSQL wherever this test can."""

from __future__ import annotations

import importlib.util

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from capsx.cli import app
from tests import postgres
from tests.conftest import tiny_recipe
from tests.mlflow_server import Server, free_port

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


def test_a_training_on_the_postgresql_server_reads_back(workdir, database):
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

    finally:
        srv.stop()
