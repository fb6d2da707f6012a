"""Tracking that survives its store: a real `mlflow server` stopped mid-run, an unreachable
store at start, and two trainings writing one SQLite store at once."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from capsx.cli import app
from capsx.recipe import recipe_from_dict
from capsx.track.tracker import BUFFER_FILE, Tracker
from capsx.train.device import resolve_device
from capsx.train.loop import Run, fit
from tests.conftest import tiny_recipe
from tests.mlflow_server import Server, free_port

BIN = Path(sys.executable).parent


@pytest.fixture
def server(tmp_path):
    """`capsx server` on a real PostgreSQL where one can be started here (the team server's database:
    the harder case), else on its SQLite store."""
    from tests.postgres import database_or_none

    with database_or_none() as db:
        srv = Server(tmp_path / "server", free_port(), backend=db.uri if db else None)
        srv.start()
        yield srv
        srv.stop()


class _StopServerAt:
    def __init__(self, server: Server, at: int) -> None:
        self.server, self.at, self.steps = server, at, 0

    def warn(self, *a): ...
    def epoch_start(self, *a): ...
    def epoch_end(self, *a): ...

    def step(self, totals, lr, steps=1):
        self.steps += steps
        if self.steps == self.at:
            self.server.stop()


def test_a_server_that_dies_mid_run_loses_nothing(tmp_path, server, monkeypatch):
    monkeypatch.setattr("capsx.track.tracker.RETRY_SECONDS", 0.5)  # retry often in a short test
    recipe = recipe_from_dict(tiny_recipe(train={"epochs": 3, "log_every": 1}), "t")  # 6 steps per epoch
    notes = []
    tracker = Tracker.start(server.uri, "dies")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    tracker.buffer_dir, tracker.notify = run_dir, notes.append
    (run_dir / "run.json").write_text(
        f'{{"run_id": "{tracker.run_id}", "experiment": "dies", "recipe": "t", "tracking_uri": "{server.uri}",'
        f' "started": 0}}')
    result = fit(recipe, Run(resolve_device("cpu"), tmp_path, run_dir, tracker, _StopServerAt(server, 4)))
    assert result.state.epoch == 3  # training went on
    left = tracker.end("FINISHED")
    assert left > 0 and (run_dir / BUFFER_FILE).is_file()
    assert sum("did not answer" in n for n in notes) == 1, notes  # said once, not at every call

    server.start()  # the same database, the same port
    res = CliRunner().invoke(app, ["sync", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert f"sent {left} of {left}" in res.output
    assert not (run_dir / BUFFER_FILE).exists()
    client = MlflowClient(server.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(tracker.run_id, "test/error")] == [1, 2, 3]
    assert sorted(m.step for m in client.get_metric_history(tracker.run_id, "train/step_loss")) == list(range(1, 19))


def test_sync_says_when_there_is_nothing_or_the_store_is_still_down(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    port = free_port()
    (run_dir / "run.json").write_text(f'{{"run_id": "abc", "experiment": "e", "recipe": "r", '
                                      f'"tracking_uri": "http://127.0.0.1:{port}", "started": 0}}')
    res = CliRunner().invoke(app, ["sync", str(run_dir)])
    assert res.exit_code == 0 and "nothing to send" in res.output
    (run_dir / BUFFER_FILE).write_text('{"op": "tags", "args": {"items": [["a", "b"]]}}\n')
    res = CliRunner().invoke(app, ["sync", str(run_dir)])
    assert res.exit_code == 1 and "still does not answer" in res.output
    res = CliRunner().invoke(app, ["sync", str(tmp_path)])
    assert res.exit_code == 2 and "not a run directory" in res.output


def test_sync_tracking_uri_sends_the_buffer_to_the_store_where_it_is_now(tmp_path):
    """The run's store moved (its server was down, then came back elsewhere): `sync --tracking-uri`
    replays the buffer there instead of the address run.json names."""
    store = f"sqlite:///{tmp_path}/moved.db"
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(f'{{"run_id": "{run_id}", "experiment": "e", "recipe": "r", '
                                      f'"tracking_uri": "http://127.0.0.1:{free_port()}", "started": 0}}')
    (run_dir / BUFFER_FILE).write_text('{"op": "tags", "args": {"items": [["where", "moved"]]}}\n')
    res = CliRunner().invoke(app, ["sync", str(run_dir)])
    assert res.exit_code == 1 and "still does not answer" in res.output
    res = CliRunner().invoke(app, ["sync", str(run_dir), "--tracking-uri", store])
    assert res.exit_code == 0 and "sent 1 of 1" in res.output, res.output
    assert client.get_run(run_id).data.tags["where"] == "moved" and not (run_dir / BUFFER_FILE).exists()


def test_mlflow_http_retries_are_lowered_unless_the_user_set_them(monkeypatch):
    """A dead server should cost seconds (capsx buffers), not MLflow's default minutes of retries;
    a variable the user set wins."""
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    from capsx.track.tracker import _quiet_mlflow

    for var in (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_TIMEOUT):
        monkeypatch.delenv(var.name, raising=False)
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() > 1 and MLFLOW_HTTP_REQUEST_TIMEOUT.get() > 10  # MLflow's own
    _quiet_mlflow()
    assert (MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_TIMEOUT.get()) == (1, 10)
    assert MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 1
    monkeypatch.setenv(MLFLOW_HTTP_REQUEST_MAX_RETRIES.name, "4")
    monkeypatch.setenv(MLFLOW_HTTP_REQUEST_TIMEOUT.name, "60")
    _quiet_mlflow()
    assert (MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_TIMEOUT.get()) == (4, 60)


def test_an_unreachable_store_at_start_is_a_clear_error_before_training(workdir):
    recipe = workdir / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe()))
    t = time.time()
    res = CliRunner().invoke(app, ["train", str(recipe), "--tracking-uri", f"http://127.0.0.1:{free_port()}"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: tracking store http://127.0.0.1:") and "--no-track" in res.output
    assert not list(workdir.glob("runs/*/*/checkpoints/*.pt"))  # nothing trained
    assert time.time() - t < 60


@pytest.mark.fresh_store  # both make the store at once: its creation is serialised
def test_two_trainings_into_one_sqlite_store_both_keep_all_metrics(workdir):
    for name in ("one", "two"):
        (workdir / f"{name}.yaml").write_text(yaml.safe_dump(tiny_recipe(
            name=name, train={"epochs": 3, "log_every": 1})))
    procs = [subprocess.Popen([str(BIN / "capsx"), "train", f"{name}.yaml"], cwd=workdir,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name in ("one", "two")]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    client = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    for name in ("one", "two"):
        (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "test/error")] == [1, 2, 3]
        assert len(client.get_metric_history(run.info.run_id, "train/step_loss")) == 18


def test_the_tracking_process_logs_exactly_what_it_is_given_and_says_why_when_it_cannot(tmp_path):
    import numpy as np

    from capsx.errors import CapsxError
    from capsx.track.process import TrackerProcess

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = Tracker.start(uri, "pictures").run_id
    image = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    process = TrackerProcess().attach(uri, run_id)
    process.log_image(image, key="perturb/class0", step=3)
    process.log_metrics({"recon/mean_sse": 29.25}, step=3)
    plot = tmp_path / "sweep-rotate.png"
    plot.write_bytes(b"a saved picture")
    process.log_artifact(plot, "sweep")
    assert process.close() == 3 and process.close() == 3  # idempotent
    client = MlflowClient(uri)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "recon/mean_sse")] == [(3, 29.25)]
    (png,) = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    assert "perturb~class0" in png
    assert [a.path for a in client.list_artifacts(run_id, "sweep")] == ["sweep/sweep-rotate.png"]
    from PIL import Image

    logged = np.asarray(Image.open(client.download_artifacts(run_id, png, str(tmp_path / "dl"))))
    assert np.array_equal(logged, image)

    assert TrackerProcess().close() == 0  # started, never given a run: ends at once, nothing logged
    ghost = TrackerProcess().attach(uri, "0" * 32)  # no such run in this store
    ghost.log_metrics({"x": 1.0}, step=0)
    with pytest.raises(CapsxError, match="tracking store .*mlflow.db") as err:
        ghost.close()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("system", [True, False])
def test_a_training_run_is_named_marked_as_training_and_samples_the_system(workdir, monkeypatch, system):
    """Its name says what it is (recipe, seed) and tells it apart; its experiment is marked for MLflow 3's UI
    as model training (it opens on the runs table, not the GenAI overview); the CPU and memory are sampled."""
    import re


    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    recipe = workdir / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(train={"epochs": 2, "seed": 7},
                                                 tracking={"system_metrics": system, "pictures_every": 0})))
    assert CliRunner().invoke(app, ["train", str(recipe)]).exit_code == 0
    client = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    experiment = client.get_experiment_by_name("tiny")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = client.search_runs([experiment.experiment_id])
    assert re.fullmatch(r"tiny-s7-[0-9a-f]{4}", run.info.run_name), run.info.run_name
    sampled = [k for k in run.data.metrics if k.startswith("system/")]
    if system:
        assert "system/cpu_utilization_percentage" in sampled and "system/system_memory_usage_megabytes" in sampled
    else:
        assert sampled == []


def test_latest_is_the_newest_run_with_weights_and_a_broken_run_json_hides_no_other(tmp_path):
    from capsx.track.runs import RunInfo, find_run_dir

    def run(name: str, started: float, checkpoint: str | None) -> Path:
        d = tmp_path / "exp" / name
        (d / "checkpoints").mkdir(parents=True)
        RunInfo(name, "exp", "r.yaml", None, started).save(d)
        if checkpoint:
            (d / "checkpoints" / checkpoint).write_bytes(b"x")
        return d

    older = run("a" * 32, 1.0, "best.pt")
    newest = run("b" * 32, 2.0, None)  # stopped before its first checkpoint
    broken = tmp_path / "exp" / ("c" * 32)
    broken.mkdir()
    (broken / "run.json").write_text("{not json")
    assert find_run_dir(tmp_path, "latest") == older  # weights to evaluate or draw
    assert find_run_dir(tmp_path, "latest", which="last") == newest  # to resume: the newest, whose missing
    # last.pt is then an error, not a quiet resume of an older run


def test_sync_drops_a_last_line_a_kill_cut_short_and_names_any_other_bad_line(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker.start(uri, "cut")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(f'{{"run_id": "{tracker.run_id}", "experiment": "cut", "recipe": "r", '
                                      f'"tracking_uri": "{uri}", "started": 0}}')
    good = ['{"op": "tags", "args": {"items": [["a", "b"]]}}', '{"op": "tags", "args": {"items": [["c", "d"]]}}']
    (run_dir / BUFFER_FILE).write_text("\n".join(good) + '\n{"op": "tags", "args": {"ite')  # killed mid-append
    res = CliRunner().invoke(app, ["sync", str(run_dir)])
    assert res.exit_code == 0 and "sent 2 of 2" in res.output, res.output
    tags = MlflowClient(uri).get_run(tracker.run_id).data.tags
    assert tags["a"] == "b" and tags["c"] == "d" and not (run_dir / BUFFER_FILE).exists()

    (run_dir / BUFFER_FILE).write_text(good[0] + "\nnot json\n" + good[1] + "\n")
    res = CliRunner().invoke(app, ["sync", str(run_dir)])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "line 2 is not a tracking call capsx wrote" in lines[0]
    assert (run_dir / BUFFER_FILE).read_text().count("\n") == 3  # nothing lost, nothing sent past it
