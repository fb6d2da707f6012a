"""`capsx ui` serves the same store `train` logs to: start it for real, read a run back over REST."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from typer.testing import CliRunner

from capsx.cli import app
from tests.conftest import tiny_recipe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def test_ui_serves_the_runs_train_logged(workdir):
    recipe = workdir / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe()))
    assert CliRunner().invoke(app, ["train", str(recipe)]).exit_code == 0
    port = _free_port()
    capsx = Path(sys.executable).with_name("capsx")
    proc = subprocess.Popen([str(capsx), "ui", "--port", str(port)], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.time() < deadline, "mlflow ui did not come up"
            time.sleep(0.5)
        exps = _post(base + "/api/2.0/mlflow/experiments/search", {"max_results": 10})["experiments"]
        tiny = next(e for e in exps if e["name"] == "tiny")
        runs = _post(base + "/api/2.0/mlflow/runs/search", {"experiment_ids": [tiny["experiment_id"]]})["runs"]
        assert len(runs) == 1
        metrics = {m["key"] for m in runs[0]["data"]["metrics"]}
        assert {"test/error", "train/loss"} <= metrics
        with urllib.request.urlopen(base + "/", timeout=5) as r:  # the UI page itself
            assert r.status == 200 and b"<html" in r.read(2000).lower()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
