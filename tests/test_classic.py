"""The classic CNN family: torchvision's models, adapted to small images without losing torchvision's
parameter names, the VGG table's parameter counts, and the layers `model.freeze` counts."""

from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from torch import nn
from typer.testing import CliRunner

from capsx.cli import app
from capsx.errors import CapsxError
from capsx.models import MODELS, build_model
from capsx.models.transfer import freeze_layers, head_parameter_names, load_pretrained

# The VGG paper's Table 1: conv widths per configuration ("M" a 2x2 max pool), then FC-4096, FC-4096, FC-1000.
VGG_A = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
VGG_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg_parameters(config: list, classes: int = 1000) -> int:
    """Counted by hand from the table: 3x3 kernels with biases, 224 px -> 7x7x512 into the classifier."""
    total, c = 0, 3
    for width in config:
        if width != "M":
            total += 3 * 3 * c * width + width
            c = width
    for fan_in, fan_out in ((7 * 7 * 512, 4096), (4096, 4096), (4096, classes)):
        total += fan_in * fan_out + fan_out
    return total


def test_vgg_table_counts_by_hand():
    assert vgg_parameters(VGG_A) == 132_863_336  # the paper's "133M"
    assert vgg_parameters(VGG_D) == 138_357_544  # "138M"


@pytest.mark.parametrize("name,config", [("vgg11", VGG_A), ("vgg16", VGG_D)])
def test_capsx_summary_prints_the_vgg_table_counts_at_224(tmp_path, name, config):
    recipe = tmp_path / "vgg.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": name}, "data": {"name": "shapes"}}))
    res = CliRunner().invoke(app, ["summary", str(recipe), "--input", "3x224x224", "--classes", "1000"])
    assert res.exit_code == 0, res.output
    expected = vgg_parameters(config)
    assert f"{expected:,} ({expected / 1e6:.1f}M)" in res.output
    assert "(512, 7, 7)" in res.output  # the last pool's output: 224 / 2**5


def test_summary_input_must_be_c_x_h_x_w(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": "lenet"}, "data": {"name": "shapes"}}))
    res = CliRunner().invoke(app, ["summary", str(recipe), "--input", "224x224"])
    assert res.exit_code == 2 and "expected channels x height x width" in res.output


def _torchvision_twin(name: str, classes: int) -> nn.Module:
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    return getattr(torchvision.models, name)(weights=None, num_classes=classes, **kwargs)


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "googlenet"])
def test_torchvision_state_dict_loads_and_gives_torchvisions_logits(tmp_path, name):
    twin = _torchvision_twin(name, 5).eval()
    path = tmp_path / f"{name}.pth"
    torch.save(twin.state_dict(), path)  # a torchvision-format state dict, as its weights files are
    model = build_model(MODELS.get(name)(), (3, 32, 32), 5).eval()
    loaded, unused = load_pretrained(model, path, skip=set(), head=set())
    assert set(loaded) == set(twin.state_dict()) and unused == []
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x).scores, twin(x), atol=1e-5)


@pytest.mark.parametrize("name", ["vgg11", "vgg16"])
def test_vgg_with_torchvisions_pool_and_width_has_torchvisions_state_dict(name):
    with torch.device("meta"):  # (a 530 MB file would be the same test, slower)
        model = build_model(MODELS.get(name)(pool_size=7, classifier_width=4096), (3, 32, 32), 5)
        twin = _torchvision_twin(name, 5)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}


@pytest.mark.parametrize("name", ["alexnet_small", "vgg11", "resnet18", "densenet121", "googlenet"])
def test_one_channel_input_changes_only_the_first_conv(name):
    with torch.device("meta"):  # shapes only
        grey = build_model(MODELS.get(name)(), (1, 32, 32), 10).state_dict()
        rgb = build_model(MODELS.get(name)(), (3, 32, 32), 10).state_dict()
    assert list(grey) == list(rgb)  # same names, same order
    differ = [k for k in grey if grey[k].shape != rgb[k].shape]
    assert len(differ) == 1 and grey[differ[0]].shape[1] == 1 and rgb[differ[0]].shape[1] == 3


def test_small_stem_keeps_32px_maps_at_full_size():
    model = build_model(MODELS.get("resnet18")(stem="small"), (3, 32, 32), 10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    with torch.no_grad():
        x = model.maxpool(model.relu(model.bn1(model.conv1(torch.rand(2, 3, 32, 32)))))
        assert model.layer4(model.layer3(model.layer2(model.layer1(x)))).shape == (2, 512, 4, 4)  # 32 / 8
    imagenet = build_model(MODELS.get("resnet18")(), (3, 32, 32), 10)
    assert imagenet.conv1.kernel_size == (7, 7) and isinstance(imagenet.maxpool, nn.MaxPool2d)


def test_too_small_an_input_is_a_user_error_with_advice():
    with pytest.raises(CapsxError, match="densenet121: a 1x28x28 input is too small.*stem: small"):
        build_model(MODELS.get("densenet121")(), (1, 28, 28), 10)
    with torch.device("meta"):
        out = build_model(MODELS.get("densenet121")(stem="small"), (1, 28, 28), 10)(torch.empty(2, 1, 28, 28))
    assert out.scores.shape == (2, 10)


def test_vgg_on_28px_drops_the_pool_it_cannot_take_and_keeps_torchvision_names():
    with torch.device("meta"):
        model = build_model(MODELS.get("vgg11")(), (1, 28, 28), 10)
        tv = torchvision.models.vgg11(weights=None)
        out = model(torch.empty(2, 1, 28, 28))
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 4  # 28 -> 14 -> 7 -> 3 -> 1
    assert isinstance(model.features[20], nn.Identity)  # the fifth pool, at torchvision's index
    assert model.avgpool.output_size == (1, 1) and model.classifier[0].in_features == 512
    assert list(model.state_dict()) == list(tv.state_dict())
    assert out.scores.shape == (2, 10)


@pytest.mark.parametrize("name,count", [
    ("lenet", 4), ("alexnet_small", 8), ("vgg11", 11), ("vgg16", 16), ("resnet18", 10), ("resnet34", 18),
    ("densenet121", 9), ("googlenet", 13), ("capsnet", 6),
])
def test_the_layers_freeze_counts(name, count):
    with torch.device("meta"):
        model = build_model(MODELS.get(name)(), (3, 32, 32), 10)
    layers = freeze_layers(model)
    assert len(layers) == count, [n for n, _ in layers]
    covered = {id(p) for _, modules in layers for m in modules for p in m.parameters()}
    assert covered == {id(p) for p in model.parameters()}  # every parameter belongs to one layer


def test_resnet_layers_are_the_stem_the_blocks_and_fc():
    with torch.device("meta"):
        model = build_model(MODELS.get("resnet18")(), (3, 32, 32), 10)
    layers = freeze_layers(model)
    assert [n for n, _ in layers] == ["conv1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0",
                                      "layer3.1", "layer4.0", "layer4.1", "fc"]
    assert layers[0][1] == [model.conv1, model.bn1]  # a batch norm belongs to the conv before it


@pytest.mark.parametrize("name,head", [
    ("resnet18", {"fc.weight", "fc.bias"}),
    ("vgg16", {"classifier.6.weight", "classifier.6.bias"}),
    ("densenet121", {"classifier.weight", "classifier.bias"}),
    ("lenet", {"classifier.4.weight", "classifier.4.bias"}),
    ("capsnet", {"class_caps.weight", "decoder.0.weight"}),  # the decoder reads K x 16 inputs
])
def test_the_head_is_what_depends_on_the_class_count(name, head):
    assert head_parameter_names(MODELS.get(name)(), (1, 28, 28) if name != "densenet121" else (3, 32, 32),
                                10) == head


def test_lenet_is_the_lectures_network_with_5x5_kernels():
    model = build_model(MODELS.get("lenet")(), (1, 28, 28), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (5, 5)), (64, (5, 5))]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(7 * 7 * 64, 1024), (1024, 10)]
    # 832 + 51,264 + 3,212,288 + 10,250
    assert sum(p.numel() for p in model.parameters()) == 3_274_634


def test_recipes_for_every_family_member_have_a_valid_model_section():
    from capsx.recipe import parse_yaml

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    family = ["lenet", "alexnet_small", "vgg11", "vgg16", "resnet18", "resnet34", "densenet121", "googlenet"]
    for name in family:
        raw = parse_yaml((recipes / f"cifar10-{name.replace('_', '-')}.yaml").read_text())
        assert raw["data"]["name"] == "cifar10" and set(raw["data"]) <= {"name", "batch_size", "augment"}
        assert set(raw["data"].get("augment", {})) <= {"shift"}
        cfg = MODELS.get(raw["model"]["name"]).model_validate(raw["model"])
        assert cfg.name == name
        with torch.device("meta"):  # and it builds for CIFAR-10's 3x32x32 images
            assert build_model(cfg, (3, 32, 32), 10)(torch.empty(2, 3, 32, 32)).scores.shape == (2, 10)


@pytest.mark.parametrize("name,attr,std", [
    ("resnet18", "conv1", (2 / (64 * 7 * 7)) ** 0.5),  # He, fan_out, as torchvision's ResNet
    ("densenet121", "features.conv0", (2 / (1 * 7 * 7)) ** 0.5),  # He, fan_in, as torchvision's DenseNet
    ("googlenet", "conv1.conv", 0.01),  # truncated normal, as torchvision's GoogLeNet
])
def test_a_replaced_first_conv_is_initialised_as_its_family_does(name, attr, std):
    torch.manual_seed(0)
    model = build_model(MODELS.get(name)(), (1, 32, 32), 10)
    weight = model.get_submodule(attr).weight
    assert weight.shape[1] == 1
    assert abs(weight.std().item() - std) < 0.15 * std
