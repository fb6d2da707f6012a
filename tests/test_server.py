"""A shared tracking server: `capsx server` for real, a training against it, and everything read back
over MLflow's REST API (params, team tags, per-epoch metrics, an image, the checkpoint artifact).
The server's database is a real PostgreSQL where one can be started here (tests/postgres.py: Debian's
binaries, `initdb` into a temporary folder), else its SQLite store."""

import importlib.util
import io
import socket
import urllib.error
import urllib.request

import pytest
import torch
import yaml
from typer.testing import CliRunner

from capsx.cli import app
from tests.conftest import tiny_recipe
from tests.mlflow_server import Server, free_port, rest_get, rest_post, second_loopback
from tests.postgres import Postgres, database_or_none, why_not


def _rows(db: Postgres, table: str) -> int:
    import psycopg

    with psycopg.connect(db.uri) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


@pytest.fixture
def database():
    with database_or_none() as db:
        yield db


def _status(url: str, host_header: str) -> int:
    req = urllib.request.Request(url, data=b'{"max_results": 5}', headers={
        "Host": host_header, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_run_on_the_shared_server_reads_back_over_rest(workdir, database):
    """`capsx server` bound with --host (a second loopback address where there is one, so binding is seen)
    and --allowed-hosts, on --backend-store-uri's PostgreSQL where one can be started."""
    host, port = second_loopback() or "127.0.0.1", free_port()
    srv = Server(workdir / "server", port, backend=database.uri if database else None, host=host,
                 allowed_hosts=f"{host}:{port},capsx-box.lan:{port}")
    srv.start()
    try:
        search = f"{srv.uri}/api/2.0/mlflow/experiments/search"
        assert _status(search, f"capsx-box.lan:{port}") == 200  # a name clients may use
        assert _status(search, f"elsewhere.lan:{port}") == 403  # MLflow refuses a host it was not told
        if host != "127.0.0.1":
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0  # bound where --host said, not everywhere
        recipe = workdir / "r.yaml"
        recipe.write_text(yaml.safe_dump(tiny_recipe(train={"epochs": 2, "seed": 5})))
        res = CliRunner().invoke(app, ["train", str(recipe), "--tracking-uri", srv.uri])
        assert res.exit_code == 0, res.output
        res = CliRunner().invoke(app, ["visualize", "filters", "--tracking-uri", srv.uri])
        assert res.exit_code == 0, res.output

        (exp,) = [e for e in rest_post(srv.uri, "experiments/search", {"max_results": 50})["experiments"]
                  if e["name"] == "tiny"]
        (run,) = rest_post(srv.uri, "runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        run_id = run["info"]["run_id"]
        assert run["info"]["status"] == "FINISHED"
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["recipe.model.name"] == "capsnet" and params["train.seed"] == "5"
        for key in ("capsx.recipe", "capsx.data", "capsx.model", "capsx.device", "capsx.seed", "capsx.host"):
            assert tags[key], key
        assert tags["capsx.recipe"] == "tiny" and tags["capsx.data"] == "shapes" and tags["capsx.seed"] == "5"

        history = rest_get(srv.uri, "metrics/get-history", run_id=run_id, metric_key="test/error")["metrics"]
        assert sorted(m["step"] for m in history) == [1, 2]

        def listing(path: str = "") -> list[dict]:
            return rest_get(srv.uri, "artifacts/list", run_id=run_id, path=path).get("files", [])

        top = {f["path"] for f in listing()}
        assert {"checkpoints", "recipe.yaml", "images"} <= top, top
        assert any("filters" in f["path"] and f["path"].endswith(".png") for f in listing("images")), listing("images")
        (ckpt,) = listing("checkpoints")
        assert ckpt["path"] == "checkpoints/best.pt"
        url = f"{srv.uri}/get-artifact?path=checkpoints/best.pt&run_uuid={run_id}"
        with urllib.request.urlopen(url, timeout=10) as r:
            payload = torch.load(io.BytesIO(r.read()), weights_only=True)
        assert payload["run_id"] == run_id
        (local,) = workdir.glob(f"runs/tiny/{run_id}/checkpoints/best.pt")  # the very weights training wrote
        saved = torch.load(local, weights_only=True)["model"]
        assert all(torch.equal(payload["model"][k], saved[k]) for k in saved)
        if database is not None:  # it is PostgreSQL that holds the run
            assert _rows(database, "runs") == 1 and _rows(database, "metrics") > 20
    finally:
        srv.stop()


@pytest.mark.parametrize("uri, shown, driver, hint", [
    ("postgresql://me:secret@127.0.0.1/mlflow", "postgresql://me:***@127.0.0.1/mlflow", "psycopg",
     "pip install 'capsx[postgres]' (psycopg 3: what MLflow's postgresql:// uses)"),
    ("postgresql+psycopg2://me:secret@127.0.0.1/mlflow", "postgresql+psycopg2://me:***@127.0.0.1/mlflow",
     "psycopg2", "pip install psycopg2-binary"),
    ("mysql+pymysql://me@127.0.0.1/mlflow", "mysql+pymysql://me@127.0.0.1/mlflow", "pymysql", "pip install pymysql"),
], ids=["postgresql", "psycopg2", "pymysql"])
def test_a_database_backend_without_its_driver_is_one_line_saying_what_to_install(tmp_path, uri, shown, driver,
                                                                                  hint):
    if importlib.util.find_spec(driver) is not None:
        pytest.skip(f"{driver} is installed here")
    res = CliRunner().invoke(app, ["server", "--backend-store-uri", uri, "--store", str(tmp_path / "srv")])
    assert res.exit_code == 2 and res.output.strip().splitlines() == [
        f"error: --backend-store-uri {shown}: needs the Python driver {driver!r}, which is not installed; {hint}"]
    assert not (tmp_path / "srv").exists()  # refused before anything was made


@pytest.mark.skipif(why_not() is not None, reason=f"the server tests run on SQLite here: {why_not()}")
def test_a_throwaway_postgresql_starts_answers_and_is_gone_after():
    with database_or_none() as db:
        assert db is not None
        import psycopg

        with psycopg.connect(db.uri) as conn:
            assert conn.execute("SELECT 1 + 1").fetchone()[0] == 2
        root = db.root
    assert not root.exists()
