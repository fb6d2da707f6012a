"""The CLI end to end: train into a real MLflow SQLite store in a temp dir, read it back, eval, errors."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from capsx.cli import app
from tests.conftest import REPO, TINY_CAPSNET, tiny_recipe

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result


def _write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def _only_run(uri: str):
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return client, runs[0]


@pytest.mark.fresh_store  # a first run makes the store (or, here, none)
def test_train_then_eval_into_a_real_mlflow_store(workdir, tiny_mnist):
    recipe = _write(workdir / "tiny-mnist.yaml", tiny_recipe(
        data={"name": "mnist", "batch_size": 32, "augment": {"shift": 2}}, model=dict(TINY_CAPSNET),
        description="tiny test recipe"))
    res = invoke("train", str(recipe), "train.epochs=2", "--set", "train.log_every=2",
                 "--data-root", str(tiny_mnist))
    assert res.exit_code == 0, res.output
    assert "test error" in res.output and "done" in res.output

    uri = f"sqlite:///{workdir}/runs/mlflow.db"
    client, run = _only_run(uri)
    assert run.info.status == "FINISHED"
    # params: what the command line changed, and the seed (few, so MLflow's image cards show the picture)
    assert run.data.params == {"train.epochs": "2", "train.log_every": "2", "train.seed": "0"}
    tags = run.data.tags  # the recipe's own settings, and the facts of the model
    assert tags["recipe.model.name"] == "capsnet" and tags["recipe.data.augment.shift"] == "2"
    assert tags["recipe.train.epochs"] == "2" and "recipe.model.routing_iters" not in tags  # a default
    assert int(tags["model.num_params"]) > 0 and tags["mlflow.note.content"] == "tiny test recipe"
    assert run.data.tags["capsx.model"] == "capsnet" and run.data.tags["capsx.data"] == "mnist"
    assert "capsx.device" in run.data.tags and "capsx.torch" in run.data.tags
    assert {k: v for k, v in tags.items() if k.startswith("kernels.")} == {  # on the CPU: no CUDA switch
        "kernels.deterministic": "false", "kernels.cudnn_benchmark": "false", "kernels.tf32": "false"}
    for key in ("train/loss", "train/margin_loss", "train/recon_loss", "train/acc", "test/error", "lr",
                "time/epoch_s", "time/images_per_s", "time/data_wait_frac", "routing/delta_b_iter1",
                "routing/delta_b_iter3"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
    assert len(client.get_metric_history(run.info.run_id, "train/step_loss")) == 2 * 8 // 2  # 256/32 = 8 steps/epoch
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/step_lr")] == [2, 4, 6, 8, 10, 12, 14, 16]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.yaml", "checkpoints", "test"} <= artifacts
    ckpts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert ckpts == {"checkpoints/best.pt"}
    local = next((workdir / "runs").glob("tiny/*/checkpoints/last.pt"))
    assert local.parent.parent.name == run.info.run_id

    res = invoke("eval", "latest", "--data-root", str(tiny_mnist))
    assert res.exit_code == 0, res.output
    assert "test error" in res.output and "confusion matrix" in res.output and "per-class accuracy" in res.output
    eval_error = client.get_metric_history(run.info.run_id, "eval/error")
    # eval reads best.pt and reproduces the test error training measured at that epoch
    test_error = sorted(client.get_metric_history(run.info.run_id, "test/error"), key=lambda m: m.step)
    best = min(test_error, key=lambda m: m.value)
    assert len(eval_error) == 1 and eval_error[0].step == best.step
    assert eval_error[0].value == pytest.approx(best.value, abs=1e-12)
    assert len(client.get_metric_history(run.info.run_id, "eval/acc_class/3")) == 1
    # the confusion matrices, training's final epoch and eval's best.pt: 64 test images, rows true classes
    for name, expected in (("test/confusion_matrix.json", test_error[-1]), ("eval/confusion_matrix.json", best)):
        matrix = json.loads(Path(client.download_artifacts(run.info.run_id, name, str(workdir / "dl"))).read_text())
        rows = torch.tensor(matrix["rows_true_columns_predicted"])
        assert matrix["classes"] == [str(k) for k in range(10)] and rows.shape == (10, 10), name
        assert int(rows.sum()) == 64 and 1 - rows.trace().item() / 64 == pytest.approx(expected.value), name
        assert matrix["error"] == pytest.approx(expected.value, abs=1e-12), name

    # by run id, and by checkpoint path (last.pt: the final epoch), without logging: the errors training logged
    final = test_error[-1]
    for ref, expected in ((run.info.run_id, best), (str(local), final)):
        res = invoke("eval", ref, "--data-root", str(tiny_mnist), "--no-log")
        assert res.exit_code == 0 and f"{100 * expected.value:.2f}%" in res.output, (ref, res.output)
    assert len(client.get_metric_history(run.info.run_id, "eval/error")) == 1  # --no-log logged nothing


def test_eval_fetches_the_checkpoint_from_mlflow_when_the_run_dir_is_gone(workdir, tiny_mnist):
    recipe = _write(workdir / "r.yaml", tiny_recipe(data={"name": "mnist", "batch_size": 64}))
    assert invoke("train", str(recipe), "--data-root", str(tiny_mnist)).exit_code == 0
    _, run = _only_run(f"sqlite:///{workdir}/runs/mlflow.db")
    import shutil

    shutil.rmtree(workdir / "runs" / "tiny")
    res = invoke("eval", run.info.run_id, "--data-root", str(tiny_mnist), "--no-log")
    assert res.exit_code == 0, res.output
    assert (workdir / "runs" / "_downloads" / run.info.run_id / "best.pt").is_file()


@pytest.mark.fresh_store  # a first run makes the store (or, here, none)
def test_tracking_uri_flag_and_env(workdir, monkeypatch):
    recipe = _write(workdir / "r.yaml", tiny_recipe())
    other = workdir / "elsewhere" / "store.db"
    assert invoke("train", str(recipe), "--tracking-uri", f"sqlite:///{other}").exit_code == 0
    _only_run(f"sqlite:///{other}")
    env_db = workdir / "env.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{env_db}")
    assert invoke("train", str(recipe)).exit_code == 0
    _only_run(f"sqlite:///{env_db}")
    assert not (workdir / "runs" / "mlflow.db").exists()

    # the recipe's tracking section: its store, experiment and run name; the order: --tracking-uri, then
    # the recipe's tracking.uri, then $MLFLOW_TRACKING_URI (the stores above, each holding its one run)
    tracked = _write(workdir / "t.yaml", tiny_recipe(tracking={
        "uri": f"sqlite:///{other}", "experiment": "from-the-recipe", "run_name": "named in the recipe"}))
    assert invoke("train", str(tracked)).exit_code == 0  # $MLFLOW_TRACKING_URI is still set
    client = MlflowClient(f"sqlite:///{other}")
    (run,) = client.search_runs([client.get_experiment_by_name("from-the-recipe").experiment_id])
    assert run.info.run_name == "named in the recipe"
    _only_run(f"sqlite:///{env_db}")
    assert invoke("train", str(tracked), "--tracking-uri", f"sqlite:///{env_db}").exit_code == 0
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert MlflowClient(f"sqlite:///{env_db}").get_experiment_by_name("from-the-recipe") is not None


@pytest.mark.fresh_store  # a first run makes the store (or, here, none)
def test_no_track_still_writes_checkpoints_and_evals(workdir):
    recipe = _write(workdir / "r.yaml", tiny_recipe())
    res = invoke("train", str(recipe), "--no-track")
    assert res.exit_code == 0, res.output
    assert not (workdir / "runs" / "mlflow.db").exists()
    res = invoke("eval", "latest")
    assert res.exit_code == 0 and "not logged" in res.output


@pytest.mark.fresh_store  # a first run makes the store (or, here, none)
def test_print_config_shows_the_resolved_recipe(workdir):
    res = invoke("train", str(REPO / "recipes" / "mnist-capsnet.yaml"), "--print-config", "--set",
                 "train.epochs=1", "data.subset=2000")
    assert res.exit_code == 0
    resolved = yaml.safe_load(res.output)
    assert resolved["train"]["epochs"] == 1 and resolved["data"]["subset"] == 2000
    assert resolved["loss"]["name"] == "margin" and resolved["model"]["routing_iters"] == 3
    assert not (workdir / "runs").exists()


def test_summary_prints_the_paper_totals():
    res = invoke("summary", str(REPO / "recipes" / "mnist-capsnet.yaml"))
    assert res.exit_code == 0
    assert "8,215,568 (8.2M)" in res.output and "6,804,224 (6.8M)" in res.output and "(1152, 8)" in res.output
    res = invoke("summary", str(REPO / "recipes" / "mnist-cnn.yaml"))
    assert "35,445,522 (35.4M)" in res.output


def test_summary_counts_the_forward_flops_by_hand_and_what_model_freeze_freezes():
    import torch

    from capsx.models import build_model
    from capsx.recipe import load_recipe
    from capsx.summary import summarize

    r = load_recipe(REPO / "recipes" / "mnist-capsnet.yaml")
    with torch.device("meta"):
        model = build_model(r.model, r.data.input_shape, 10)
    macs = (256 * 9 * 9 * 1 * 20 * 20  # conv1: 256 maps of 20x20, each output a 9x9x1 product
            + 256 * 9 * 9 * 256 * 6 * 6  # PrimaryCaps: 32 types x 8 = 256 maps of 6x6 over 256 inputs
            + 1152 * 10 * 8 * 16  # the votes u_hat = W_ij u_i
            + 160 * 512 + 512 * 1024 + 1024 * 784)  # the decoder
    routing = 3 * 2 * 1152 * 10 * 16  # 3 iterations of the weighted sum and the agreement
    flops = summarize(model, r.data.input_shape).forward_flops
    assert 2 * macs <= flops <= 2 * (macs + routing), flops
    res = invoke("summary", str(REPO / "recipes" / "mnist-capsnet.yaml"))
    assert f"{flops / 1e9:.2f} GFLOP per image" in res.output and "0.41 GFLOP" in res.output
    assert "6: conv1, primary_caps, class_caps, decoder.0, decoder.2, decoder.4" in " ".join(
        line.strip("│ ") for line in res.output.splitlines())

    lenet = REPO / "recipes" / "mnist-lenet.yaml"
    res = invoke("summary", str(lenet), "model.freeze=[features.0]")
    assert res.exit_code == 0, res.output
    with torch.device("meta"):
        conv = build_model(load_recipe(lenet).model, (1, 28, 28), 10).features[0]
    frozen = sum(p.numel() for p in conv.parameters())
    total = sum(p.numel() for p in build_model(load_recipe(lenet).model, (1, 28, 28), 10).parameters())
    assert f"{total - frozen:,} ({frozen:,} frozen by model.freeze)" in res.output


def test_resume_by_run_id_by_run_folder_and_by_checkpoint_file_continue_the_one_run(workdir):
    """`--resume RUN_ID|PATH`: each continues the same MLflow run and run folder; the run records the
    git commit of the checkout it was started in, and its folder."""
    import subprocess

    subprocess.run(["git", "init", "-q"], cwd=workdir, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
                   cwd=workdir, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workdir, capture_output=True, text=True).stdout.strip()
    recipe = _write(workdir / "r.yaml", tiny_recipe(train={"epochs": 1, "seed": 0, "max_steps_per_epoch": 2}))
    assert invoke("train", str(recipe)).exit_code == 0
    uri = f"sqlite:///{workdir}/runs/mlflow.db"
    client, run = _only_run(uri)
    (run_dir,) = (workdir / "runs" / "tiny").iterdir()
    assert run.data.tags["mlflow.source.git.commit"] == commit
    assert run.data.tags["capsx.run_dir"] == str(run_dir.resolve())
    for epochs, ref in ((2, run.info.run_id), (3, str(run_dir)), (4, str(run_dir / "checkpoints" / "last.pt"))):
        res = invoke("train", "--resume", ref, f"train.epochs={epochs}")
        assert res.exit_code == 0 and "resuming tiny" in res.output, res.output
    client, again = _only_run(uri)  # still the one run, in the one folder
    assert again.info.run_id == run.info.run_id and list((workdir / "runs" / "tiny").iterdir()) == [run_dir]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/error")] == [1, 2, 3, 4]
