"""Recipes: YAML files, validated once into a strict typed `Recipe`.

Load order: the YAML file, then `--set key.path=value` overrides (values are
YAML too), then validation. Every error names the file, the key path and what
was expected, and raises `RecipeError`.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import Field, PrivateAttr, ValidationError, model_validator
from pydantic.fields import FieldInfo

from capsx.data import DATASETS, DataConfig
from capsx.errors import RecipeError
from capsx.models import MODELS, ModelConfig
from capsx.paper import PaperNumber
from capsx.registry import Registry
from capsx.schema import Section, flatten
from capsx.train.losses import (
    BinaryCrossEntropyConfig,
    CrossEntropyConfig,
    LossConfig,
    MarginLossConfig,
    SpreadLossConfig,
)
from capsx.train.optim import OptimizerConfig, ScheduleConfig

LOSSES = {c.model_fields["name"].default: c
          for c in (MarginLossConfig, CrossEntropyConfig, BinaryCrossEntropyConfig, SpreadLossConfig)}
MAX_YAML_VALUES = 100_000  # a recipe holds a few hundred; aliases must not expand it past this


class _RecipeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` (no object construction) with YAML 1.2's scalars: 1e-3 is a float
    (YAML 1.1 wants "1.0e-3") and only true/false are booleans (1.1 also takes yes/no/on/off).
    A key given twice in one mapping is an error (YAML lets the last win, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden: that is its point
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line)
            except TypeError:  # an unhashable key: the constructor says so below
                continue
            if first != key_node.start_mark.line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first at line {first + 1}); keep one",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    """The document's value; refused (a yaml.YAMLError with its place) if a key repeats or its aliases
    expand it past MAX_YAML_VALUES values ("billion laughs": a few lines that would take all memory)."""
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_YAML_VALUES:
            raise yaml.constructor.ConstructorError(
                None, None, f"its aliases expand it to {size:,} values (at most {MAX_YAML_VALUES:,}; a recipe "
                            "holds a few hundred)", node.start_mark)
        return loader.construct_document(node)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply to read (a recipe is a few levels deep)") from None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many values `node` becomes once every alias is copied out (an alias is the node it names,
    so each shared node is counted once and multiplied, never walked again)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a node that contains itself (a recursive alias) counts once
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(n, memo) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = size
    return size


if TYPE_CHECKING:  # what the sections are to a type checker: the registries' common bases
    ModelSection = ModelConfig
    DataSection = DataConfig
else:  # what pydantic validates: the union of the registered configs, picked by `name`
    ModelSection = Annotated[Union[tuple(MODELS.values())], Field(discriminator="name")]
    DataSection = Annotated[Union[tuple(DATASETS.values())], Field(discriminator="name")]


class CheckpointConfig(Section):
    every: int = Field(1, ge=1)  # write last.pt every this many epochs (and on interruption)
    best: bool = True  # keep best.pt, the epoch with the lowest test error


class TrainConfig(Section):
    epochs: int = Field(1, ge=1, le=1_000_000)
    seed: int = 0
    early_stopping_patience: int | None = Field(None, ge=1)  # epochs without a better test error
    checkpoint: CheckpointConfig = CheckpointConfig()
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16: autocast mixed precision
    log_every: int = Field(50, ge=1)  # steps between train/step_loss points
    max_steps_per_epoch: int | None = Field(None, ge=1)  # cap an epoch's length (smoke runs)
    compile: bool = False  # torch.compile the training step's model (see README: measured, not a default)
    deterministic: bool = False  # deterministic kernels: a CUDA run repeats exactly, slower (the CPU's always do)
    tf32: bool = True  # CUDA: fp32 matrix products and convolutions in TF32 (Ampere and later)


class TrackingConfig(Section):
    experiment: str | None = None  # default: the recipe's name
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db
    run_name: str | None = None  # default: <recipe>-s<seed>-<4 hex digits>, e.g. mnist-capsnet-s0-3f9a
    pictures_every: int = Field(1, ge=0)  # log the run's pictures after every N-th epoch's evaluation; 0: never
    system_metrics: bool = True  # MLflow's CPU, memory (and GPU, with pynvml) metrics on training runs


def _default_loss_name(model: type[ModelConfig], objects: int) -> str:
    """The loss a model gets without a `loss:` section: its own (matrix capsules: spread), margin for
    capsule models, else cross-entropy (binary cross-entropy per class for images of several objects)."""
    if model.default_loss is not None:
        return model.default_loss
    return "margin" if model.outputs_capsules else "cross_entropy" if objects == 1 else "binary_cross_entropy"


class Recipe(Section):
    name: str = Field(min_length=1)
    description: str = ""
    model: ModelSection
    loss: LossConfig | None = None  # default: margin for capsule models, else cross-entropy (binary: k labels)
    data: DataSection
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: CUDA, then MPS, then CPU
    paper: list[PaperNumber] = Field(default_factory=list)  # the paper's numbers this recipe reproduces
    _overridden: tuple[str, ...] = PrivateAttr(default=())  # the keys `--set` changed (see `params`)

    @model_validator(mode="before")
    @classmethod
    def _name_the_default_loss(cls, raw: Any) -> Any:
        """`loss: {recon_weight: 0}` without a name (e.g. `--set loss.recon_weight=0` on a recipe with no
        loss section) changes the loss the model gets by default, rather than asking for its name."""
        if not isinstance(raw, dict) or not isinstance(raw.get("loss"), dict) or "name" in raw["loss"]:
            return raw
        model, data = raw.get("model"), raw.get("data")
        model_name = model.get("name") if isinstance(model, dict) else None
        data_name = data.get("name") if isinstance(data, dict) else None
        if not isinstance(model_name, str) or not isinstance(data_name, str) or model_name not in MODELS \
                or data_name not in DATASETS:
            return raw  # the model's or data's own error says what is wrong
        name = _default_loss_name(MODELS.get(model_name), DATASETS.get(data_name).objects)
        return {**raw, "loss": {"name": name, **raw["loss"]}}

    @model_validator(mode="after")
    def _default_loss(self) -> Recipe:
        if self.loss is None:
            name = _default_loss_name(type(self.model), self.data.objects)
            object.__setattr__(self, "loss", LOSSES[name]())
        return self

    @property
    def loss_config(self) -> MarginLossConfig | CrossEntropyConfig | BinaryCrossEntropyConfig | SpreadLossConfig:
        assert self.loss is not None  # filled in by the validator
        return self.loss

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def params(self) -> dict[str, str]:
        """The run's MLflow params: what it changed from its recipe file (`--set`, `--seeds`) and its seed.

        Few on purpose: MLflow's image cards print every param of the run above the picture, and twenty
        are enough to push it out of the card. The recipe's own settings are the run's `recipe.*` tags
        (`tags`) and the whole resolved recipe is its recipe.yaml."""
        flat = flatten(self.to_dict())
        keys = [*self._overridden, "train.seed"]
        return {k: v for k, v in flat.items() if any(k == key or k.startswith(key + ".") for key in keys)}

    def tags(self) -> dict[str, str]:
        r"""What the recipe file and its overrides set, as `recipe.<key>` tags: searchable
        (`tags.\`recipe.model.routing_iters\` = '3'`) and columns of the runs table. Defaults stay out
        (they are in recipe.yaml); the description is the run's MLflow description, the paper's numbers
        are not settings."""
        chosen = self.model_dump(mode="json", exclude_unset=True)
        chosen.pop("description", None)
        chosen.pop("paper", None)
        return {f"recipe.{k}": v for k, v in flatten(chosen).items()}

    @property
    def overridden_keys(self) -> tuple[str, ...]:
        return self._overridden

    def overridden(self, keys: list[str] | tuple[str, ...]) -> Recipe:
        """This recipe, counting `keys` as changed by overrides (a recipe rebuilt from another's dict)."""
        self._overridden = (*self._overridden, *(k for k in keys if k not in self._overridden))
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override, validate. Raises `RecipeError` naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e})") from None
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}: not valid YAML{at}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping of sections (model, data, ...), got {_kind(raw)}")
    raw.setdefault("name", path.stem)
    for section, key in (("data", "root"), ("model", "pretrained")):  # paths in a recipe are relative to it
        node = raw.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(value, str) and not Path(value).expanduser().is_absolute():
            node[key] = str((path.parent / value).resolve())
    return recipe_from_dict(raw, source=str(path), overrides=overrides)


def recipe_from_dict(raw: dict[str, Any], source: str, overrides: list[str] | None = None) -> Recipe:
    raw = apply_overrides(raw, overrides or [], source)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(f"{source}: {describe_error(e)}") from None
    recipe.overridden([item.partition("=")[0].strip() for item in overrides or []])
    if isinstance(recipe.loss, CrossEntropyConfig) and recipe.data.objects > 1:
        raise RecipeError(f"{source}: loss.name: cross_entropy scores one class per image, but {recipe.data.name} "
                          f"has {recipe.data.objects}; expected binary_cross_entropy (or margin for a CapsNet)")
    return recipe


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply `key.path=value` strings; each value is parsed as YAML (`3`, `1e-3`, `[1, 2]`, `null`)."""
    raw = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        keys = key.strip().split(".")
        if not sep or not all(k.strip() for k in keys):
            raise RecipeError(f"override {item!r}: expected key.path=value, e.g. train.epochs=3")
        try:
            value = parse_yaml(text) if text.strip() else None
        except yaml.YAMLError:
            value = text  # not YAML: take it as a plain string and let the schema judge it
        node: Any = raw
        for depth, k in enumerate(keys[:-1]):
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise RecipeError(f"{source}: override {item!r}: {where} is {_kind(child)}, not a section")
            node = child
        node[keys[-1]] = value
    return raw


def _deep_copy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _deep_copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deep_copy(v) for v in x]
    return x


def _kind(x: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "empty"}
    return names.get(type(x), type(x).__name__)


# ---------------------------------------------------------------------------------------------
# Error messages: one line, the key path as the user wrote it, what was expected


def describe_error(err: ValidationError) -> str:
    """The first error of a pydantic ValidationError as 'key.path: problem; expected ...'."""
    errors = err.errors(include_url=False)
    e = errors[0]
    loc, kind, value = e["loc"], e["type"], e.get("input")
    if kind == "extra_forbidden":
        path, fields = _walk(Recipe, loc[:-1])
        where = _dotted(path + [str(loc[-1])])
        return f"{where}: unknown key; expected one of: {', '.join(fields) or 'none'}"
    path, _ = _walk(Recipe, loc)
    where = _dotted(path) or "(top level)"
    if kind == "missing":
        return f"{where}: required key is missing"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        section = path[-1] if path else "section"
        registries: dict[str, Registry[Any]] = {"model": MODELS, "data": DATASETS}
        registry = registries.get(section)
        tags = e.get("ctx", {}).get("expected_tags", "")
        valid = ", ".join(registry.names()) if registry else tags.replace("'", "") or (
            ", ".join(LOSSES) if section == "loss" else "see the recipes/ folder")
        if kind == "union_tag_not_found":
            return f"{where}.name: required key is missing; expected one of: {valid}"
        tag = value.get("name") if isinstance(value, dict) else value
        what = registry.kind if registry else section
        return f"{where}.name: unknown {what} {tag!r}; expected one of: {valid}"
    if kind == "value_error":  # a section's own check across its fields: its message says what it expected
        msg = str(e["ctx"]["error"]) if "error" in e.get("ctx", {}) else e["msg"].removeprefix("Value error, ")
        return msg if not where or msg.startswith(where) else f"{where}: {msg}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{where}: expected a mapping, got {_kind(value)}"
    # A field that takes one of several plain types (`int | list[str]`) fails once per member:
    # report the member that got furthest into the value, or all members' expectations.
    alike = [x for x in errors if _walk(Recipe, x["loc"])[0][: len(path)] == path]
    deepest = max(alike, key=lambda x: len(_walk(Recipe, x["loc"])[0]))
    if len(_walk(Recipe, deepest["loc"])[0]) > len(path):
        return describe_error(ValidationError.from_exception_data(err.title, [_line(deepest)]))
    expected = " or ".join(dict.fromkeys(_expected(x["type"], x.get("ctx", {}), x["msg"]) for x in alike))
    return f"{where}: expected {expected}, got {_short(value)}"


def _line(e: Any) -> Any:
    """An error dict from `.errors()` in the form `ValidationError.from_exception_data` takes."""
    return {"type": e["type"], "loc": e["loc"], "input": e.get("input"), "ctx": e.get("ctx", {})}


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
    "bool_parsing": "true or false", "string_type": "a string", "list_type": "a list",
    "finite_number": "a finite number", "string_too_short": "a non-empty string",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _expected(kind: str, ctx: dict[str, Any], msg: str) -> str:
    if kind in _EXPECTED:
        return _EXPECTED[kind]
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()), "?")
        return f"a value {_BOUNDS[kind]} {bound}"
    if kind == "literal_error":
        return "one of: " + ctx.get("expected", "").replace("'", "").replace(" or ", ", ")
    if kind in ("too_short", "too_long"):
        return msg.replace("List should have", "a list with").split(" after")[0]
    return msg[0].lower() + msg[1:].replace("Input should be", "").strip() if msg else "something else"


def _dotted(path: list[str]) -> str:
    """['model', 'decoder_hidden', '1'] -> 'model.decoder_hidden[1]'."""
    out = ""
    for part in path:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def _walk(cls: Any, loc: tuple[Any, ...]) -> tuple[list[str], list[str]]:
    """Follow a pydantic error location through the schema. Returns the path as the user
    writes it (discriminator tags dropped) and the valid keys of the innermost section."""
    path: list[str] = []
    fields: list[str] = list(getattr(cls, "model_fields", {}))
    tags: dict[str, Any] = {}
    member = False  # the previous part was a field of plain union type: this part names the member
    for part in loc:
        if member:
            member = False
            continue
        if tags:  # the previous part was a discriminated field: this part is the tag
            cls = tags.get(part)
            tags = {}
            fields = list(getattr(cls, "model_fields", {})) if cls else []
            continue
        path.append(str(part))
        if isinstance(part, int):  # an item of a list of sections: still that section
            continue
        info: FieldInfo | None = getattr(cls, "model_fields", {}).get(part) if cls else None
        if info is None:
            cls, fields = None, []
            continue
        cls, tags = _section_type(info)
        member = cls is None and not tags and len([m for m in _members(info.annotation) if m is not type(None)]) > 1
        fields = list(getattr(cls, "model_fields", {})) if cls else []
    return path, fields


def _section_type(info: FieldInfo) -> tuple[Any, dict[str, Any]]:
    """For a field: its section class, or (None, {tag: class}) if it is a discriminated union."""
    sections = [m for m in _members(info.annotation) if isinstance(m, type) and issubclass(m, Section)]
    if len(sections) == 1:
        return sections[0], {}
    if len(sections) > 1:
        return None, {m.model_fields["name"].default: m for m in sections}
    return None, {}


def _members(annotation: Any) -> list[Any]:
    """The classes inside Optional / Union / Annotated, flattened."""
    if get_origin(annotation) is Annotated:
        return _members(get_args(annotation)[0])
    args = get_args(annotation)
    if args and get_origin(annotation) is list:
        return _members(args[0])
    if args and get_origin(annotation) in (Union, UnionType):
        return [m for a in args for m in _members(a)]
    return [annotation]
