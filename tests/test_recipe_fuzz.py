"""Fuzz the recipe loader: whatever YAML or override a user throws at it, the only
exception that may come out is the project's own `RecipeError`."""

import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsx.errors import RecipeError
from capsx.recipe import load_recipe, recipe_from_dict
from tests.conftest import tiny_recipe

KEYS = ["name", "model", "data", "loss", "optimizer", "schedule", "train", "tracking", "device", "routing_iters",
        "batch_size", "epochs", "lr", "augment", "shift", "checkpoint", "every", "decoder_hidden", "root", "x"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["capsnet", "mnist", "shapes", "adam", "margin", "cpu"]))
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)), max_leaves=20)
paths = st.lists(st.sampled_from(KEYS + ["", " ", "a.b"]), min_size=1, max_size=4).map(".".join)
override_values = st.one_of(st.text(alphabet=string.printable, max_size=15),
                            st.sampled_from(["[1, 2", "{a: 1}", "!!python/object:os.system", "1e-3", "null", "-"]))
overrides = st.lists(st.one_of(st.builds("{}={}".format, paths, override_values), st.text(max_size=10)),
                     max_size=3)

# derandomize: the same 150 documents on every run and machine (a failure reproduces; no unseeded draws)
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(doc=documents, changes=overrides)
def test_random_documents_and_overrides_only_raise_recipe_errors(doc, changes):
    try:
        recipe_from_dict(doc if isinstance(doc, dict) else {"value": doc}, "fuzz.yaml", changes)
    except RecipeError as e:
        assert str(e).startswith("fuzz.yaml") or str(e).startswith("override"), str(e)
        assert "\n" not in str(e)


@FUZZ
@given(changes=overrides)
def test_random_overrides_on_a_valid_recipe_only_raise_recipe_errors(changes):
    try:
        recipe_from_dict(tiny_recipe(), "fuzz.yaml", changes)
    except RecipeError as e:
        assert "\n" not in str(e)


@FUZZ
@given(text=st.text(alphabet=string.printable + "\u00e9\u2603", max_size=200))
def test_random_text_files_only_raise_recipe_errors(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    try:
        load_recipe(path)
    except RecipeError as e:
        assert "\n" not in str(e)


def test_python_tags_are_never_constructed(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe()) + "description: !!python/object/apply:os.system ['touch pwned']\n")
    try:
        load_recipe(path)
        raise AssertionError("should not load")
    except RecipeError as e:
        assert "not valid YAML" in str(e)
    assert not (tmp_path / "pwned").exists()
