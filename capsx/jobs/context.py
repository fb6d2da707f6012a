"""The command context: what every command shares, resolved once from the CLI's options."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from capsx.data import DataConfig, resolve_data_root
from capsx.track.tracker import resolve_tracking_uri


def silent(*objects: Any, **options: Any) -> None:
    """Say nothing: a job called from Python prints nothing unless its context says where to."""


@dataclass(frozen=True)
class Context:
    """Where runs live and log, where data is read from, on what device, whether to log at all, and where
    a job's tables and progress lines go (the CLI's console; nowhere for a job called from Python)."""

    runs_dir: Path = Path("runs")
    tracking_uri: str | None = None  # --tracking-uri; None: the recipe's, $MLFLOW_TRACKING_URI or <runs>/mlflow.db
    data_root: Path | None = None  # --data-root; None: the recipe's, $CAPSX_DATA or ./data
    track: bool = True  # log to MLflow (train's --no-track, the other commands' --no-log)
    device: str = "auto"  # auto, cpu, cuda or mps; a training's recipe names its own
    say: Callable[..., None] = silent  # takes what Rich's Console.print takes: text with markup, tables
    progress: bool = False  # a live progress bar while training

    def data_root_for(self, data: DataConfig) -> Path:
        """The data root a data set is read from: --data-root, its recipe's `root`, $CAPSX_DATA or ./data."""
        return resolve_data_root(str(self.data_root) if self.data_root else None, getattr(data, "root", None))

    def store(self, recipe_uri: str | None = None) -> str:
        """The tracking store a new run logs to (an existing run logs where its run.json says)."""
        return resolve_tracking_uri(self.tracking_uri, recipe_uri, self.runs_dir)

    def with_store(self, uri: str | None) -> Context:
        return replace(self, tracking_uri=uri)
