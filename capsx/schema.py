"""The base class of every recipe section: strict, typed, no unknown keys."""

from typing import Any

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A recipe section. Unknown keys are errors; YAML types are taken as they are
    (no silent "3" -> 3), except that an int is accepted where a float is expected."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"model": {"name": "capsnet"}}` -> `{"model.name": "capsnet"}`, every value as text (MLflow's
    params and tags)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)
    return out
