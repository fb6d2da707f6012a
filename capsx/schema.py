"""The base class of every recipe section: strict, typed, no unknown keys."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A recipe section. Unknown keys are errors; YAML types are taken as they are
    (no silent "3" -> 3), except that an int is accepted where a float is expected."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
