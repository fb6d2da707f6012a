"""Ensembles: the mean of class probabilities, by hand on fixed scores, and end to end: `train
--seeds` evaluates its seeds as one classifier, `eval PARENT --ensemble` agrees with a plain
re-computation from the checkpoints, and mismatched runs or a paper number of another size are refused."""

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from torch import nn
from typer.testing import CliRunner

from capsx.cli import app
from capsx.data import Batches
from capsx.data.imageset import ImageSet
from capsx.jobs.ensemble import Member, class_probabilities, evaluate_ensemble
from capsx.models import ModelOutput
from capsx.recipe import recipe_from_dict
from capsx.train.checkpoint import Checkpoint
from capsx.train.loop import load_model
from tests.conftest import tiny_recipe

runner = CliRunner()
CNN = {"name": "convnet_small", "channels": [8, 16], "hidden": [32]}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


class FixedScores(nn.Module):
    """Answers image i (its pixels hold the value i) with row i of `scores`; capsules if asked."""

    def __init__(self, scores: torch.Tensor, capsules: bool) -> None:
        super().__init__()
        self.scores, self.capsules = scores, capsules

    def forward(self, x: torch.Tensor) -> ModelOutput:
        idx = (x[:, 0, 0, 0] * 255).round().long()
        s = self.scores[idx]
        return ModelOutput(scores=s, capsules=s.unsqueeze(2).expand(-1, -1, 4) if self.capsules else None)


def _images(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()


def test_class_probabilities_put_every_model_on_one_scale():
    caps = recipe_from_dict(tiny_recipe(), source="t")
    ce = recipe_from_dict(tiny_recipe(model=CNN), source="t")
    s = torch.tensor([[0.2, 0.9, 0.1]])
    assert torch.equal(class_probabilities(ModelOutput(s, capsules=s.unsqueeze(2)), caps), s)  # lengths as they are
    p = class_probabilities(ModelOutput(torch.log(torch.tensor([[1.0, 3.0, 4.0]]))), ce)
    assert torch.allclose(p, torch.tensor([[0.125, 0.375, 0.5]]))  # softmax of log-odds 1:3:4


def test_the_ensemble_predicts_the_mean_and_scores_each_member_alone():
    recipe = recipe_from_dict(tiny_recipe(), source="t")
    # image 0 (label 0): A says 0 firmly, B says 1 weakly -> mean says 0 (A alone right, B wrong)
    # image 1 (label 1): A says 0 weakly, B says 1 firmly -> mean says 1 (A wrong, B right)
    # image 2 (label 2): both say 2 -> right for all
    # image 3 (label 0): both say 1 -> wrong for all
    a = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.4, 0.0], [0.0, 0.1, 0.8], [0.5, 0.6, 0.0]])
    b = torch.tensor([[0.3, 0.4, 0.0], [0.1, 0.9, 0.0], [0.1, 0.0, 0.7], [0.5, 0.6, 0.0]])
    data = ImageSet(_images(4), torch.tensor([0, 1, 2, 0]))
    members = [Member("a", recipe, FixedScores(a, True)), Member("b", recipe, FixedScores(b, True))]
    res = evaluate_ensemble(members, Batches(data, 3), torch.device("cpu"), ["0", "1", "2"])
    assert [m.error for m in res.members] == [0.5, 0.5]
    assert res.ensemble.error == 0.25  # images 0, 1 and 2 right
    assert res.ensemble.confusion.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]


def test_a_two_label_ensemble_takes_the_two_best_mean_scores():
    recipe = recipe_from_dict(tiny_recipe(), source="t")
    a = torch.tensor([[0.9, 0.8, 0.0, 0.7]])
    b = torch.tensor([[0.9, 0.0, 0.3, 0.7]])  # mean: 0.9, 0.4, 0.15, 0.7 -> {0, 3}
    data = ImageSet(_images(1), torch.tensor([[0, 3]]))
    members = [Member("a", recipe, FixedScores(a, True)), Member("b", recipe, FixedScores(b, True))]
    res = evaluate_ensemble(members, Batches(data, 1), torch.device("cpu"), list("0123"))
    assert [m.error for m in res.members] == [1.0, 0.0] and res.ensemble.error == 0.0


def test_seeds_are_evaluated_as_an_ensemble_that_a_plain_recomputation_matches(workdir):
    recipe = tiny_recipe(model=CNN, paper=[{"metric": "error", "value": 50, "band": [0, 100], "models": 2,
                                            "source": "a two-model number"}])
    path = workdir / "seeds.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = invoke("train", path, "--seeds", "0,1")
    assert res.exit_code == 0, res.output
    assert "ensemble of 2" in res.output and "mean class probabilities" in res.output
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/runs/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.info.start_time)
    logged = parent.data.metrics["ensemble/error"]
    assert parent.data.metrics["ensemble/members"] == 2

    # the same number, plainly: both best checkpoints, softmax, mean, argmax over the test split
    probs, labels = [], None
    for child in children:
        best = next((workdir / "runs").glob(f"*/{child.info.run_id}/checkpoints/best.pt"))
        rec, model = load_model(Checkpoint.read(best), torch.device("cpu"))
        test = rec.data.load_splits(workdir).test
        x = test.images.float() / 255
        with torch.no_grad():
            model.eval()
            probs.append(torch.softmax(model(x).scores, dim=1))
        labels = test.labels
    expected = (torch.stack(probs).mean(0).argmax(1) != labels).float().mean().item()
    assert logged == pytest.approx(expected, abs=1e-9)

    # eval of the parent stands for its seeds; --check reads the two-model number
    res = invoke("eval", parent.info.run_id, "--ensemble", "--check")
    assert res.exit_code == 0, res.output
    assert f"{100 * expected:.2f}%" in res.output and "within" in res.output
    # one model against a two-model number: refused, saying how to check it
    res = invoke("eval", children[0].info.run_id, "--check")
    assert res.exit_code == 2 and "an ensemble of 2 models" in res.output and "--ensemble --check" in res.output


def test_an_ensemble_needs_two_models_answering_the_same_question(workdir, tiny_mnist):
    ids = []
    for name, data in (("a", None), ("b", {"name": "mnist", "batch_size": 16})):
        path = workdir / f"{name}.yaml"
        recipe = tiny_recipe(model=CNN, data=data)
        recipe["name"] = name
        path.write_text(yaml.safe_dump(recipe))
        assert invoke("train", path, "--data-root", tiny_mnist).exit_code == 0
        ids.append(next((workdir / "runs" / name).glob("*/run.json")).parent.name)
    res = invoke("eval", ids[0], "--ensemble")
    assert res.exit_code == 2 and "is one model" in res.output
    res = invoke("eval", *ids, "--ensemble", "--data-root", tiny_mnist)
    assert res.exit_code == 2 and "data set mnist" in res.output and "must answer the same question" in res.output
    assert "Traceback" not in res.output


def test_a_capsnet_and_a_cnn_mix_and_runs_without_a_common_parent_are_printed_not_logged(workdir):
    """`eval A B` evaluates each run on its own (each logs its own eval/error); `eval A B --ensemble` of a
    CapsNet (lengths as they are) and a CNN (softmax) matches the plain recomputation, and with no common
    parent run logs nothing anywhere. `--check` of that two-model ensemble against a one-model number is
    refused, saying what to run."""
    ids, probs, labels = [], [], None
    for name, model in (("caps", None), ("cnn", CNN)):
        path = workdir / f"{name}.yaml"
        recipe = tiny_recipe(model=model, name=name,
                             paper=[{"metric": "error", "value": 50, "band": [0, 100], "source": "one model"}])
        path.write_text(yaml.safe_dump(recipe))
        assert invoke("train", path).exit_code == 0
        run_dir = next((workdir / "runs" / name).glob("*/run.json")).parent
        ids.append(run_dir.name)
        rec, model_ = load_model(Checkpoint.read(run_dir / "checkpoints" / "best.pt"), torch.device("cpu"))
        test = rec.data.load_splits(workdir).test
        with torch.no_grad():
            out = model_.eval()(test.images.float() / 255)
        probs.append(out.scores if name == "caps" else torch.softmax(out.scores, dim=1))
        labels = test.labels
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/runs/mlflow.db")

    res = invoke("eval", *ids)
    assert res.exit_code == 0, res.output
    assert res.output.count("confusion matrix") == 2
    for run_id in ids:
        assert len(client.get_metric_history(run_id, "eval/error")) == 1, run_id

    res = invoke("eval", *ids, "--ensemble")
    assert res.exit_code == 0, res.output
    expected = (torch.stack(probs).mean(0).argmax(1) != labels).float().mean().item()
    assert f"{100 * expected:.2f}%" in res.output and "not logged: the runs are not the seeds" in res.output
    for run_id in ids:
        assert not any(k.startswith("ensemble/") for k in client.get_run(run_id).data.metrics), run_id

    res = invoke("eval", *ids, "--ensemble", "--check")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "is one model: check each run alone, `capsx eval RUN --check` (without --ensemble)" in res.output
