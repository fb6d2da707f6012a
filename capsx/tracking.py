"""MLflow tracking: the only module that imports mlflow.

A `Tracker` is one MLflow run seen through `MlflowClient` (no fluent global
state, so tests and several runs in one process stay independent). With
tracking off, `NullTracker` takes the same calls and keeps nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from capsx.errors import CapsxError

DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000


def resolve_tracking_uri(cli_uri: str | None, recipe_uri: str | None) -> str:
    """--tracking-uri, else the recipe's tracking.uri, else $MLFLOW_TRACKING_URI, else runs/mlflow.db.

    A relative SQLite path is made absolute: MLflow caches one store per URI
    string, so a relative one would keep pointing at the first directory used.
    """
    uri = cli_uri or recipe_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and uri != "sqlite:///:memory:":
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    return uri


def local_store_dir(uri: str) -> Path | None:
    """The folder of a local store (sqlite file or file:// dir), where artifacts go beside it."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db = uri[len("sqlite:///"):]
        return Path(db).parent if db and db != ":memory:" else None
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme == "file" else uri)
    return None


def _quiet_mlflow() -> None:
    """MLflow logs its database migrations at INFO; capsx prints its own progress."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic", "sqlalchemy.engine"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _client(uri: str) -> Any:
    _quiet_mlflow()
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()  # again: importing mlflow configures its loggers

    store = local_store_dir(uri)
    if store is not None:
        try:
            store.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CapsxError(f"tracking store {uri}: cannot create {store}: {e.strerror}") from None
    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def _store_errors(uri: str) -> Iterator[None]:
    """An unusable tracking store is the user's to fix: say which and how."""
    try:
        yield
    except CapsxError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CapsxError(f"tracking store {uri}: {first} (check --tracking-uri / MLFLOW_TRACKING_URI, "
                         "or train with --no-track)") from None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


class Tracker:
    """One MLflow run: start (or attach to) it, log to it, end it."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri = uri
        self.client = _client(uri)
        self.run_id = run_id

    @classmethod
    def start(cls, uri: str, experiment: str, *, run_name: str | None = None,
              tags: dict[str, str] | None = None) -> Tracker:
        """A new run in `experiment` (created, with its artifacts beside a local store, if new)."""
        tracker = cls(uri, run_id="")
        with _store_errors(uri):
            run = tracker.client.create_run(tracker._experiment_id(experiment), run_name=run_name, tags=tags or {})
        tracker.run_id = run.info.run_id
        return tracker

    @classmethod
    def attach(cls, uri: str, run_id: str, *, reopen: bool = False) -> Tracker:
        """An existing run; `reopen` marks it RUNNING again (a resumed training)."""
        tracker = cls(uri, run_id)
        with _store_errors(uri):
            tracker.client.get_run(run_id)
            if reopen:
                tracker.client.update_run(run_id, status="RUNNING")
        return tracker

    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return str(exp.experiment_id)
        store = local_store_dir(self.uri)
        location = (store / "artifacts" / name).resolve().as_uri() if store is not None else None
        return str(self.client.create_experiment(name, artifact_location=location))

    @property
    def active(self) -> bool:
        return True

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in _flatten(params).items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i:i + MAX_METRICS_PER_BATCH])

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_image(self, image: np.ndarray, key: str, step: int = 0) -> None:
        """An (H, W) or (H, W, 3) uint8 image, paged by `step` in the UI's image view."""
        self.client.log_image(self.run_id, image, key=key, step=step)

    def end(self, status: str = "FINISHED", note: str | None = None) -> None:
        if note:
            self.client.set_tag(self.run_id, "mlflow.note.content", note)
        self.client.set_terminated(self.run_id, status=status)


class NullTracker:
    """Tracking off (--no-track): the same calls, nothing kept."""

    uri = None
    active = False

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_image(self, image: np.ndarray, key: str, step: int = 0) -> None: ...
    def end(self, status: str = "FINISHED", note: str | None = None) -> None: ...


def download_checkpoint(uri: str, run_id: str, dest: Path) -> Path | None:
    """Fetch checkpoints/best.pt (else last.pt) of an MLflow run into `dest`; None if the run has neither."""
    client = _client(uri)
    try:
        client.get_run(run_id)
    except Exception:
        return None
    for name in ("best.pt", "last.pt"):
        try:
            return Path(client.download_artifacts(run_id, f"checkpoints/{name}", str(dest)))
        except Exception:
            continue
    return None
