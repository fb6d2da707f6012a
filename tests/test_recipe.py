"""Recipes: every shipped recipe loads, overrides apply with YAML types, and errors say what is wrong."""

from pathlib import Path

import pytest
import yaml

from capsx.errors import RecipeError
from capsx.models import build_model
from capsx.recipe import apply_overrides, load_recipe, recipe_from_dict
from tests.conftest import REPO, tiny_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_loads_and_builds(path):
    folder = yaml.safe_load(path.read_text())["data"]["name"] == "imagefolder"
    # an image-folder recipe's classes are the user's folders: as training fills them in
    recipe = load_recipe(path, ["data.class_names=[a, b, c]"] if folder else [])
    assert recipe.name == path.stem
    model = build_model(recipe.model, recipe.data.input_shape, len(recipe.data.classes))
    assert sum(p.numel() for p in model.parameters()) > 0
    # the resolved recipe survives a round trip through its own YAML
    again = recipe_from_dict(yaml.safe_load(recipe.to_yaml()), source="roundtrip")
    assert again.model_dump() == recipe.model_dump()


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_opens_with_a_comment_header(path):
    header = path.read_text().splitlines()[0]
    assert header.startswith("# ") and len(header) > 20, f"{path.name}: say what it is in a comment first"


def test_the_readmes_table_of_paper_numbers_is_the_recipes_own():
    """Every `paper:` entry of every recipe is a row of the README's table, and every row an entry."""
    import re

    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| recipe | metric | test set | paper | band | models |"):]
    table = table[:table.index("\n\n")]
    rows = set()
    for line in table.splitlines()[2:]:
        stem, metric, dataset, value, band, models = (c.strip().strip("`") for c in line.strip("|").split("|"))
        low, high = band.split("-")
        rows.add((stem, metric, dataset, float(value), float(low), float(high), int(models)))
    assert re.search(r"\| `mnist-capsnet` \| error \| test \| 0\.25 \|", table)  # the parse read the table
    entries = set()
    for path in RECIPES:
        recipe = load_recipe(path)
        for n in recipe.paper:
            entries.add((path.stem, n.metric, n.dataset, n.value, n.band[0], n.band[1], n.models))
    assert rows == entries, (rows - entries, entries - rows)


def test_paper_variant_recipes_hold_the_paper_settings():
    def caps_input(stem):
        r = load_recipe(REPO / "recipes" / f"{stem}.yaml")
        model = build_model(r.model, r.data.input_shape, len(r.data.classes))
        return r, model, r.data.input_shape

    r, model, shape = caps_input("cifar10-capsnet")  # 24x24 patches, 64 primary types, none of the above, 3 iters
    assert shape == (3, 24, 24) and r.model.primary_types == 64 and r.model.none_of_the_above
    assert r.model.routing_iters == 3 and model.class_caps.weight.shape[1] == 11
    r, model, shape = caps_input("svhn-capsnet")  # Conv1 64, 16 types of 6-D, 8-D final capsules
    assert shape == (3, 32, 32) and model.conv1.out_channels == 64
    assert (r.model.primary_types, r.model.primary_dim, r.model.class_dim) == (16, 6, 8)
    r, model, shape = caps_input("smallnorb-capsnet")  # stereo 48x48, 32x32 crops, the MNIST architecture
    assert shape == (2, 32, 32) and r.model.conv1_channels == 256 and r.model.primary_types == 32
    for stem in ("cifar10", "svhn", "smallnorb", "fashion-mnist"):  # each has its CNN baseline on the same input
        caps, cnn = (load_recipe(REPO / "recipes" / f"{stem}-{kind}.yaml") for kind in ("capsnet", "cnn"))
        assert cnn.data.name == caps.data.name and cnn.data.input_shape == caps.data.input_shape
        assert cnn.model.name in ("baseline_cnn", "convnet_small")


def test_overrides_take_yaml_types_and_create_sections():
    r = recipe_from_dict(tiny_recipe(), "t.yaml", ["train.epochs=3", "optimizer.lr=2e-3", "model.decoder=false",
                                                  "model.decoder_hidden=[8, 16]", "schedule.name=cosine"])
    assert r.train.epochs == 3 and r.optimizer.lr == 0.002 and r.model.decoder is False
    assert r.model.decoder_hidden == [8, 16] and r.schedule.name == "cosine"


def test_scientific_notation_without_a_dot_is_a_float(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe()) + "optimizer:\n  lr: 1e-3\n  eps: 5E-9\n")
    r = load_recipe(path)
    assert r.optimizer.lr == 1e-3 and r.optimizer.eps == 5e-9


def test_default_loss_follows_the_model():
    assert recipe_from_dict(tiny_recipe(), "t").loss.name == "margin"
    cnn = recipe_from_dict(tiny_recipe(model={"name": "convnet_small"}), "t")
    assert cnn.loss.name == "cross_entropy"


def test_data_root_in_a_recipe_is_relative_to_the_recipe_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(data={"name": "mnist", "root": "../mydata"})))
    assert Path(load_recipe(path).data.root) == (tmp_path / "mydata").resolve()


def test_overrides_do_not_touch_the_input():
    raw = tiny_recipe()
    apply_overrides(raw, ["train.epochs=9"], "t")
    assert raw["train"]["epochs"] == 1


# "billion laughs": nine lines, each alias list nine of the one above; expanded, sum over n = 1..9 of
# (9^(n+1) - 1) / 8 values, plus the 14 of the mapping around them and the model section
LAUGHS = "".join(f"{k}: &{k} [{', '.join([f'*{p}' if p else '0'] * 9)}]\n"
                 for p, k in zip(["", *"abcdefgh"], "abcdefghi", strict=True)) + "model: {name: capsnet}\n"
BAD = [  # (recipe text or dict, overrides, words the one-line message must hold); the cases the CLI's table
    # in test_bad_input.py holds (unknown keys and names, negative sizes, wrong types) are not repeated here
    ("model: {name: capsnet}\ndata: {name: shapes}\ndata: {name: mnist}\n", [],
     ["line 3", "key 'data' given twice (first at line 2)"]),
    (LAUGHS, [], ["aliases expand it to 490,329,068 values", "at most 100,000"]),
    (tiny_recipe(model={"routing_iters": 3}), [], ["model.name", "missing", "baseline_cnn, capsnet"]),
    (tiny_recipe(), ["loss.name=null", "loss.recon_weight=0.1"], ["loss.name", "margin, cross_entropy"]),
    (tiny_recipe(), ["model=capsnet"], ["model", "a mapping", "a string"]),
    (tiny_recipe(), ["train.epochs.max=3"], ["train.epochs", "an integer"]),
    (tiny_recipe(), ["model.init_std='0.1'"], ["model.init_std", "a number"]),
    (tiny_recipe(), ["data.augment.crop=64"], ["data: augment.crop 64 is larger than shapes's 28x28 images"]),
    (tiny_recipe(), ["data.subset=0"], ["data.subset: expected a value >= 1, got 0"]),
    (tiny_recipe(), ["data.eval_batch_size=0"], ["data.eval_batch_size: expected a value >= 1"]),
    (tiny_recipe(), ["data.min_scale=0.9", "data.max_scale=0.8"], ["data: min_scale 0.9 is above max_scale 0.8"]),
    (tiny_recipe(), ["loss.m_plus=2"], ["loss.m_plus: expected a value <= 1.0, got 2"]),
    (tiny_recipe(), ["loss.down_weight=-1"], ["loss.down_weight: expected a value >= 0.0"]),
    (tiny_recipe(), ["schedule.warmup_steps=-1"], ["schedule.warmup_steps: expected a value >= 0"]),
    (tiny_recipe(), ["train.early_stopping_patience=0"], ["train.early_stopping_patience: expected a value >= 1"]),
    (tiny_recipe(), ["train.checkpoint.every=0"], ["train.checkpoint.every: expected a value >= 1"]),
    (tiny_recipe(), ["train.max_steps_per_epoch=0"], ["train.max_steps_per_epoch: expected a value >= 1"]),
    (tiny_recipe(), ["train.log_every=0"], ["train.log_every: expected a value >= 1"]),
    (tiny_recipe(), ["tracking.pictures_every=-1"], ["tracking.pictures_every: expected a value >= 0"]),
    (tiny_recipe(), ["optimizer.momentum=-0.1"], ["optimizer.momentum: expected a value >= 0.0"]),
    (tiny_recipe(), ["optimizer.weight_decay=-1"], ["optimizer.weight_decay: expected a value >= 0.0"]),
    (tiny_recipe(), ["model.conv1_channels=0"], ["model.conv1_channels: expected a value >= 1"]),
    (tiny_recipe(), ["model.primary_dim=0"], ["model.primary_dim: expected a value >= 1"]),
    (tiny_recipe(data={"name": "imagefolder", "class_names": ["a"]}), [], ["two or more distinct names"]),
    (tiny_recipe(data={"name": "imagefolder", "size": 2}), [], ["data.size: expected a value >= 4"]),
]


@pytest.mark.parametrize("source,overrides,words", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_recipes_raise_one_clear_error(tmp_path, source, overrides, words):
    path = tmp_path / "bad.yaml"
    path.write_text(source if isinstance(source, str) else yaml.safe_dump(source))
    with pytest.raises(RecipeError) as e:
        load_recipe(path, overrides)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_bad_override_syntax(tmp_path):
    with pytest.raises(RecipeError, match="expected key.path=value"):
        recipe_from_dict(tiny_recipe(), "t", ["train.epochs"])
    with pytest.raises(RecipeError, match="not a section"):
        recipe_from_dict(tiny_recipe(), "t", ["device.x=1"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_an_override_of_one_loss_field_changes_the_loss_the_model_gets_by_default():
    caps = recipe_from_dict(tiny_recipe(), "t", ["loss.recon_weight=0"])  # tiny_recipe has no loss section
    assert (caps.loss_config.name, caps.loss_config.recon_weight) == ("margin", 0.0)
    cnn = recipe_from_dict(tiny_recipe(model={"name": "convnet_small"}), "t", ["loss.label_smoothing=0.1"])
    assert (cnn.loss_config.name, cnn.loss_config.label_smoothing) == ("cross_entropy", 0.1)
