"""The paper's numbers a recipe reproduces, and the check of a measurement against them.

A recipe of a paper experiment carries, in its `paper:` section, the number the
paper reports, where it says so, and the band a reproduction should land in
(`capsx eval RUN --check` exits non-zero outside it). The band is the recipe
author's judgement of run-to-run spread, written beside the number so it can be
argued with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from capsx.errors import CapsxError
from capsx.schema import Section

EVAL_SETS = ("test", "affnist", "affine-mnist")  # what a paper number is measured on


class PaperNumber(Section):
    """One number of the paper, in percent, as its tables print it."""

    metric: Literal["error", "accuracy"]  # percent of the images
    value: float = Field(ge=0, le=100)
    band: list[float] = Field(min_length=2, max_length=2)  # [low, high] in percent: what counts as reproduced
    dataset: Literal["test", "affnist", "affine-mnist"] = "test"  # test: the recipe's own test split
    source: str = Field(min_length=1)  # where the paper says it, e.g. "Table 1, CapsNet 3 routing iterations"
    models: int = Field(1, ge=1)  # models averaged into the number (CIFAR-10: a 7-model ensemble)

    @model_validator(mode="after")
    def _band_holds_value(self) -> PaperNumber:
        low, high = self.band
        if not 0 <= low <= high <= 100:
            raise ValueError(f"band [{low:g}, {high:g}]: expected [low, high] with 0 <= low <= high <= 100")
        return self


@dataclass
class CheckRow:
    number: PaperNumber
    measured: float  # percent, same metric as the number

    @property
    def within(self) -> bool:
        low, high = self.number.band
        return low <= self.measured <= high


class CheckFailed(CapsxError):
    """A measurement outside the paper's band: the run did not reproduce the number."""

    exit_code = 1


def check_rows(numbers: list[PaperNumber], dataset: str, error: float, models: int = 1) -> list[CheckRow]:
    """Compare an evaluation's error (a fraction) on `dataset`, of one model or an ensemble of
    `models`, with the recipe's paper numbers for it."""
    on_set = [n for n in numbers if n.dataset == dataset]
    if not numbers:
        raise CapsxError("--check: the run's recipe has no `paper:` section, so there is no number to check "
                         "against; add one (see recipes/mnist-capsnet.yaml)")
    if not on_set:
        have = ", ".join(sorted({n.dataset for n in numbers}))
        raise CapsxError(f"--check: the run's recipe has no paper number for {dataset!r} (it has: {have}); "
                         "add one to its `paper:` section")
    chosen = [n for n in on_set if n.models == models]
    if not chosen:
        n = on_set[0]
        how = ("one model: check each run alone, `capsx eval RUN --check` (without --ensemble)" if n.models == 1 else
               f"an ensemble of {n.models} models: train with --seeds (one per model) and check with "
               "`capsx eval PARENT_RUN --ensemble --check`")
        raise CapsxError(f"--check: the paper's {dataset!r} number ({n.value:g}%, {n.source}) is {how}, "
                         f"not {'one model' if models == 1 else f'an ensemble of {models}'}")
    return [CheckRow(n, 100 * (error if n.metric == "error" else 1 - error)) for n in chosen]
