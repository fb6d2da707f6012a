"""Transfer learning end to end: train on MNIST, fine-tune on another data set with frozen layers and a
new head through the real CLI; torchvision state dicts; the errors a user can make."""

from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from capsx.cli import app
from capsx.errors import CapsxError
from capsx.models import MODELS, build_model
from capsx.models.transfer import prepare_transfer
from capsx.train.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import tiny_recipe, write_mnist

runner = CliRunner()
LENET = {"name": "lenet", "channels": [8, 16], "hidden": [32], "dropout": 0.0}
SHAPES = {"name": "shapes", "train_size": 96, "test_size": 32, "batch_size": 16}  # 6 classes, not 10


def _train(recipe_path: Path, recipe: dict, *args: str):
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(yaml.safe_dump(recipe))
    return runner.invoke(app, ["train", str(recipe_path), *args])


def _run(workdir: Path, experiment: str):
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/runs/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    return run


@pytest.fixture
def mnist_lenet(workdir) -> Path:
    """A small lenet trained one epoch on test-written MNIST through the CLI: its best.pt."""
    data = write_mnist(workdir / "data")
    res = _train(workdir / "source.yaml", tiny_recipe(
        data={"name": "mnist", "batch_size": 32}, model=dict(LENET), name="source"), "--data-root", str(data))
    assert res.exit_code == 0, res.output
    return next((workdir / "runs" / "source").glob("*/checkpoints/best.pt"))


def test_fine_tune_on_another_data_set_with_frozen_layers_and_a_new_head(workdir, mnist_lenet):
    source = load_checkpoint(mnist_lenet)["model"]
    relative = Path("..") / mnist_lenet.relative_to(workdir)  # recipe paths are relative to the recipe file
    model = {**LENET, "pretrained": str(relative), "freeze": 1, "head": "replace", "pretrained_lr_factor": 0.1}
    res = _train(workdir / "ft" / "shapes.yaml", tiny_recipe(data=dict(SHAPES), model=model, name="finetune",
                                                            schedule={"name": "constant"}))
    assert res.exit_code == 0, res.output

    after = load_checkpoint(next((workdir / "runs" / "finetune").glob("*/checkpoints/last.pt")))
    tuned = after["model"]
    for key in ("features.0.weight", "features.0.bias"):  # layer 1, frozen: exactly the MNIST weights
        assert torch.equal(tuned[key], source[key]), key
    for key in ("features.3.weight", "features.3.bias", "classifier.1.weight", "classifier.1.bias"):
        assert tuned[key].shape == source[key].shape and not torch.equal(tuned[key], source[key]), key
    assert tuned["classifier.4.weight"].shape == (6, 32) and source["classifier.4.weight"].shape == (10, 32)

    groups = after["optimizer"]["param_groups"]  # pretrained layers at 0.1 x lr, the new head at lr
    assert [g["lr_factor"] for g in groups] == [0.1, 1.0]
    assert groups[0]["lr"] == pytest.approx(0.1 * groups[1]["lr"])
    assert [len(g["params"]) for g in groups] == [4, 2]  # features.3 and classifier.1; classifier.4

    params = _run(workdir, "finetune").data.tags
    frozen = 8 * 1 * 5 * 5 + 8
    total = sum(t.numel() for k, t in tuned.items())
    assert int(params["model.frozen_params"]) == frozen
    assert int(params["model.trainable_params"]) == total - frozen
    assert int(params["model.pretrained_tensors"]) == len(tuned) - 2  # all but the head's two
    assert params["recipe.model.freeze"] == "1" and params["recipe.model.head"] == "replace"

    # a resumed run takes its own weights, freezes the same layer, and rebuilds the same lr groups
    res = runner.invoke(app, ["train", "--resume", "latest", "train.epochs=2"])
    assert res.exit_code == 0, res.output
    resumed = load_checkpoint(next((workdir / "runs" / "finetune").glob("*/checkpoints/last.pt")))
    assert resumed["state"]["epoch"] == 2
    assert torch.equal(resumed["model"]["features.0.weight"], source["features.0.weight"])
    assert not torch.equal(resumed["model"]["features.3.weight"], tuned["features.3.weight"])
    assert [g["lr_factor"] for g in resumed["optimizer"]["param_groups"]] == [0.1, 1.0]


def test_fine_tune_from_a_torchvision_state_dict_freezing_by_name(workdir):
    tv = torchvision.models.resnet18(weights=None, num_classes=10)
    tv.conv1 = torch.nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)  # a grey-image resnet18
    weights = workdir / "resnet18-grey.pth"
    extra = {"aux_head.weight": torch.zeros(3, 512), "aux_head.bias": torch.zeros(3)}  # no use to the model
    torch.save({**tv.state_dict(), **extra}, weights)
    model = {"name": "resnet18", "pretrained": str(weights), "freeze": ["conv1", "bn1", "layer1"],
             "head": "replace"}
    res = _train(workdir / "r.yaml", tiny_recipe(data={**SHAPES, "train_size": 32, "test_size": 16}, model=model,
                                                 name="tv"))
    assert res.exit_code == 0, res.output
    tuned = load_checkpoint(next((workdir / "runs" / "tv").glob("*/checkpoints/last.pt")))["model"]
    source = tv.state_dict()
    for key in ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer1.1.bn2.bias"):
        assert torch.equal(tuned[key], source[key]), key
    for key in ("layer2.0.conv1.weight", "layer4.1.bn2.weight"):
        assert not torch.equal(tuned[key], source[key]), key
    assert tuned["fc.weight"].shape == (6, 512)
    # frozen batch norm keeps its parameters but, in training mode, still moves its running averages
    for bn in ("bn1", "layer1.0.bn1"):
        assert torch.equal(tuned[f"{bn}.weight"], source[f"{bn}.weight"]), bn
        assert not torch.equal(tuned[f"{bn}.running_mean"], source[f"{bn}.running_mean"]), bn
        assert tuned[f"{bn}.num_batches_tracked"] == source[f"{bn}.num_batches_tracked"] + 2, bn  # 32 / 16
    tags = _run(workdir, "tv").data.tags
    assert int(tags["model.pretrained_tensors"]) == len(source) - 2  # all but the replaced fc's two
    assert int(tags["model.pretrained_unused"]) == 2  # the file's aux_head.*


def _setup(model_cfg: dict, shape=(1, 28, 28), classes=6):
    cfg = MODELS.get(model_cfg["name"]).model_validate(model_cfg)
    model = build_model(cfg, shape, classes)
    return model, prepare_transfer(model, cfg, shape, classes)


def test_feature_extractor_trains_only_the_new_head(tmp_path):
    path = tmp_path / "lenet.pth"
    torch.save(build_model(MODELS.get("lenet")(**{k: v for k, v in LENET.items() if k != "name"}),
                           (1, 28, 28), 10).state_dict(), path)
    model, setup = _setup({**LENET, "pretrained": str(path), "freeze": -1, "head": "replace"})
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.4.weight",
                                                                          "classifier.4.bias"]
    assert len(setup.param_groups) == 1 and setup.param_groups[0]["lr_factor"] == 1.0
    assert setup.trainable == 32 * 6 + 6


def test_without_pretrained_weights_freeze_still_freezes_and_one_group_trains():
    model, setup = _setup({**LENET, "freeze": 2})
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "classifier.1.weight", "classifier.1.bias", "classifier.4.weight", "classifier.4.bias"]
    assert setup.frozen == (8 * 25 + 8) + (16 * 8 * 25 + 16) and len(setup.param_groups) == 1


@pytest.mark.parametrize("model,words", [
    ({"freeze": ["features.9"]}, ["model.freeze: 'features.9' is not a module with parameters",
                                  "features.0, features.3, classifier.1, classifier.4"]),
    ({"freeze": ["features.1"]}, ["'features.1' is not a module with parameters"]),  # a ReLU
    ({"freeze": 5}, ["model.freeze: 5, but this model has 4 layers"]),
    ({"freeze": 4}, ["freezes every parameter"]),
])
def test_freeze_mistakes_name_the_valid_choices(model, words):
    with pytest.raises(CapsxError) as e:
        _setup({**LENET, **model})
    for w in words:
        assert w in str(e.value)


def test_freezing_the_new_head_is_an_error(tmp_path):
    path = tmp_path / "lenet.pth"
    torch.save(build_model(MODELS.get("lenet")(), (1, 28, 28), 10).state_dict(), path)
    with pytest.raises(CapsxError, match="would freeze the new head"):
        _setup({"name": "lenet", "pretrained": str(path), "freeze": 4, "head": "replace"})


def _pickled_object_file(path: Path) -> Path:
    torch.save({"weights": torch.zeros(2), "args": Path("code")}, path)  # an object torch must unpickle
    return path


@pytest.mark.parametrize("pretrained,model,words", [
    ("missing.pth", {}, ["model.pretrained", "missing.pth", "weights file not found"]),
    ("{source}", {"hidden": [64]}, ["does not fit this model", "classifier.1.weight (32, 784) in the file, "
                                    "(64, 784) here"]),
    ("{source}", {}, ["classifier.4.weight (10, 32) in the file, (6, 32) here", "set model.head: replace"]),
    ("{pickled}", {}, ["model.pretrained", "refused to load", "pickled objects"]),
    ("{tensor}", {}, ["expected a capsx checkpoint or a state dict"]),
])
def test_pretrained_mistakes_are_one_red_line(workdir, pretrained, model, words):
    source = workdir / "source.pt"  # a capsx checkpoint of a 10-class lenet
    recipe = tiny_recipe(data={"name": "mnist"}, model=dict(LENET))
    save_checkpoint(source, {"recipe": recipe, "model": build_model(
        MODELS.get("lenet").model_validate(LENET), (1, 28, 28), 10).state_dict()})
    _pickled_object_file(workdir / "pickled.pt")
    torch.save(torch.zeros(3), workdir / "tensor.pt")
    path = (pretrained.replace("{source}", str(source)).replace("{pickled}", str(workdir / "pickled.pt"))
            .replace("{tensor}", str(workdir / "tensor.pt")))
    res = _train(workdir / "bad.yaml", tiny_recipe(data=dict(SHAPES), model={**LENET, "pretrained": path, **model}))
    assert res.exit_code == 1 and "Traceback" not in res.output  # a file that is not what it should be: exit 1
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert not list(workdir.glob("runs/*/*/run.json"))  # refused before a run existed
    for w in words:
        assert w in res.output.replace("\n", ""), (w, res.output)


def test_head_replace_without_pretrained_is_a_recipe_error(workdir):
    res = _train(workdir / "bad.yaml", tiny_recipe(data=dict(SHAPES), model={**LENET, "head": "replace"}))
    assert res.exit_code == 2 and "model.head: replace needs model.pretrained" in res.output

