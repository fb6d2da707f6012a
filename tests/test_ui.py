"""`capsx ui` serves the same store `train` logs to, started for real over a store holding a 2-epoch run:
read back over REST, and seen as a person sees it in a real headless Chromium (Debian's `chromium`, through
Playwright for Python; nothing is downloaded). Screenshots of each page are kept in runs/test-artifacts/ui/
(or $CAPSX_TEST_ARTIFACTS) to be looked at."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, tiny_recipe
from tests.mlflow_server import rest_post

CHROMIUM = os.environ.get("CAPSX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
EPOCHS = 2
ARTIFACTS = Path(os.environ.get("CAPSX_TEST_ARTIFACTS", REPO / "runs" / "test-artifacts")) / "ui"
# the card's picture and the slider: the MLflow 3.17 image card (`imagegridplot`), found by its title
CARD_OF = """title => {
  const t = [...document.querySelectorAll('*')].find(e => e.childElementCount === 0 && e.textContent.trim() === title);
  if (!t) return null;
  let card = t.parentElement;
  while (card && !card.querySelector('img')) card = card.parentElement;  // the smallest box holding title and image
  if (!card) return null;
  const img = card.querySelector('img'), c = card.getBoundingClientRect(), r = img.getBoundingClientRect();
  const hit = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
  const slider = card.querySelector('[role=slider]');
  return {natural: img.naturalWidth, complete: img.complete, inside: r.left >= c.left && r.right <= c.right &&
          r.top >= c.top && r.bottom <= c.bottom, w: r.width, h: r.height, on_top: hit === img || img.contains(hit),
          min: slider && +slider.getAttribute('aria-valuemin'), max: slider && +slider.getAttribute('aria-valuemax'),
          now: slider && +slider.getAttribute('aria-valuenow')};
}"""
CHART_X = """title => [...document.querySelectorAll('.js-plotly-plot')]
  .filter(p => p.closest('[data-testid=experiment-view-compare-runs-card]')?.innerText.includes(`(${title})`))
  .map(p => (p.data || []).map(d => d.x))"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ui(tmp_path_factory) -> Iterator[tuple[str, str, str]]:
    """(base URL, experiment id, run id) of `capsx ui` over a fresh store with one 2-epoch CapsNet run."""
    work = tmp_path_factory.mktemp("ui")
    recipe = work / "browse.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(name="browse", train={"epochs": EPOCHS, "seed": 0})))
    capsx = [sys.executable, "-m", "capsx"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    from typer.testing import CliRunner

    from capsx.cli import app

    here = Path.cwd()
    os.chdir(work)  # trained in this process (no second start-up of torch and MLflow), served by capsx ui
    try:
        done = CliRunner().invoke(app, ["train", str(recipe), "--tracking-uri", f"sqlite:///{work}/runs/mlflow.db"])
    finally:
        os.chdir(here)
    assert done.exit_code == 0, done.output
    client = MlflowClient(f"sqlite:///{work}/runs/mlflow.db")
    experiment = client.get_experiment_by_name("browse")
    (run,) = client.search_runs([experiment.experiment_id])
    port = _free_port()
    server = subprocess.Popen([*capsx, "ui", "--port", str(port)], cwd=work, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, server.stdout.read() if server.stdout else "capsx ui exited"
            assert time.monotonic() < deadline, "capsx ui did not answer within 120 s"
            time.sleep(0.5)
        yield base, experiment.experiment_id, run.info.run_id
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # mlflow ui and its web server's workers
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                                                                "(`make install` installs it with the dev extras)")
    if CHROMIUM is None:
        pytest.skip("no Chromium: `make test` installs Debian's chromium where it can (root and apt-get), "
                    "or set CAPSX_CHROMIUM")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _page(browser, url: str):
    page = browser.new_page(viewport={"width": 1600, "height": 1200})
    page.set_default_timeout(60_000)
    page.goto(url)
    return page


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def test_ui_serves_the_runs_train_logged_over_rest(ui):
    base, experiment_id, run_id = ui
    exps = rest_post(base, "experiments/search", {"max_results": 10})["experiments"]
    assert experiment_id in {e["experiment_id"] for e in exps}
    (run,) = rest_post(base, "runs/search", {"experiment_ids": [experiment_id]})["runs"]
    assert run["info"]["run_id"] == run_id and run["info"]["status"] == "FINISHED"
    assert {"test/error", "train/loss"} <= {m["key"] for m in run["data"]["metrics"]}
    with urllib.request.urlopen(base + "/", timeout=5) as r:  # the UI page itself
        assert r.status == 200 and b"<html" in r.read(2000).lower()


def test_the_experiment_page_lists_the_run_in_its_runs_table(ui, browser):
    base, experiment_id, run_id = ui
    page = _page(browser, f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning")
    name = MlflowClient(f"{base}").get_run(run_id).info.run_name
    assert name.startswith("browse-s0-")
    row = page.locator("[role=row]", has_text=name)
    row.first.wait_for()
    _shot(page, "experiment")
    assert row.count() == 1
    assert page.get_by_text("Model training", exact=True).count() >= 1  # MLflow 3's training view, not GenAI's


def test_the_run_shows_its_filters_and_metrics_epoch_by_epoch(ui, browser):
    base, experiment_id, run_id = ui
    page = _page(browser, f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics"
                          "?workflowType=machine_learning")
    page.get_by_text("filters/conv1", exact=True).first.wait_for()
    page.wait_for_function(f"() => ({CARD_OF})('filters/conv1')?.natural > 0")
    _shot(page, "run-pictures")
    card = page.evaluate(CARD_OF, "filters/conv1")
    assert card["complete"] and card["natural"] > 0, card  # the picture loaded ...
    assert card["inside"] and card["on_top"] and card["w"] > 100 and card["h"] > 100, card  # ... and is seen
    assert (card["min"], card["max"], card["now"]) == (0, EPOCHS, 0), card  # untrained (step 0), then each epoch

    # the slider's marks (one per logged step), then each step typed into its box shows that step's picture
    card_box = page.locator("div", has=page.get_by_text("filters/conv1", exact=True)).filter(
        has=page.locator("[role=slider]")).last
    marks = card_box.locator("[role=slider]").evaluate("t => t.closest('[aria-disabled]').firstElementChild"
                                                       ".children.length")
    assert marks == EPOCHS + 1, marks
    for step in range(EPOCHS + 1):
        box = card_box.locator("input")
        box.press("Control+a")
        box.type(str(step))
        box.press("Tab")  # as a person does: the box takes the value when it loses the focus
        page.wait_for_function("([title, step]) => { const c = (" + CARD_OF + ")(title); const i = [...document"
                               ".querySelectorAll('img')].find(i => i.src.includes('filters~conv1%2Bstep%2B' + step"
                               " + '%2B')); return c && c.now === step && i && i.naturalWidth > 0; }",
                               arg=["filters/conv1", step])
    _shot(page, "run-pictures-last-epoch")

    page.evaluate("() => [...document.querySelectorAll('.du-bois-light-collapse-header')]"
                  ".find(h => h.innerText.startsWith('test\\n')).scrollIntoView()")
    page.wait_for_function(f"() => ({CHART_X})('test/error').length > 0")
    _shot(page, "run-metrics")
    for xs in page.evaluate(CHART_X, "test/error"):
        assert all(x == list(range(1, EPOCHS + 1)) for x in xs), xs  # one point per epoch
