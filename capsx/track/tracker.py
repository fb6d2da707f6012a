"""MLflow tracking: the only module that imports mlflow.

A `Tracker` is one MLflow run seen through `MlflowClient` (no fluent global
state, so tests and several runs in one process stay independent). With
tracking off, `NullTracker` takes the same calls and keeps nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from capsx.atomic import replacing, write_text
from capsx.errors import CapsxError
from capsx.schema import flatten

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent first runs must be avoided there
    fcntl = None  # type: ignore[assignment]

EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"  # MLflow 3's kinds
DEFAULT_STORE = "mlflow.db"  # the default store: a SQLite file in the runs directory
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000


def resolve_tracking_uri(cli_uri: str | None, recipe_uri: str | None, runs_dir: Path = Path("runs")) -> str:
    """--tracking-uri, else the recipe's tracking.uri, else $MLFLOW_TRACKING_URI, else <runs>/mlflow.db.

    A relative SQLite path is made absolute: MLflow caches one store per URI
    string, so a relative one would keep pointing at the first directory used.
    """
    default = f"sqlite:///{runs_dir / DEFAULT_STORE}"
    uri = cli_uri or recipe_uri or os.environ.get("MLFLOW_TRACKING_URI") or default
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
    """MLflow logs its database migrations at INFO; capsx prints its own progress. And an
    HTTP store that does not answer should fail fast (capsx buffers), not retry for minutes."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic", "sqlalchemy.engine"):
        logging.getLogger(name).setLevel(logging.WARNING)


def import_mlflow() -> Any:
    """MLflow's client class, imported quietly (it is slow to import: pandas and its GenAI modules)."""
    _quiet_mlflow()
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()  # again: importing mlflow configures its loggers
    return MlflowClient


def _client(uri: str) -> Any:
    MlflowClient = import_mlflow()

    store = local_store_dir(uri)
    if store is not None:
        try:
            store.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CapsxError(f"tracking store {uri}: cannot create {store}: {e.strerror}") from None
    with _store_errors(uri), _creation_lock(uri):
        return MlflowClient(tracking_uri=uri)  # builds the store, migrating a new database's schema


@contextlib.contextmanager
def _creation_lock(uri: str) -> Iterator[None]:
    """One process at a time sets up a SQLite store: two that create (migrate) the same new
    database at once both fail half-way ("duplicate column name")."""
    if not uri.startswith("sqlite:///") or fcntl is None:
        yield
        return
    lock_path = Path(uri[len("sqlite:///"):] + ".lock")
    with lock_path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _store_errors(uri: str) -> Iterator[None]:
    """An unusable tracking store is the user's to fix: say which and how."""
    try:
        yield
    except CapsxError:
        raise
    except Exception as e:
        raise CapsxError(f"tracking store {uri}: {_first_line(e)} (check --tracking-uri / MLFLOW_TRACKING_URI, "
                         "or go without it: --no-track to train, --no-log for a picture command)") from None


def shortest(value: float) -> float:
    """The value to 12 significant digits: what the MLflow UI shows is 0.001, not the arithmetic's
    0.0010000000000000009 (nothing capsx measures is known to more than 12 digits)."""
    return float(f"{float(value):.12g}")


NOTE = "mlflow.note.content"  # the run's description in the MLflow UI
BUFFER_FILE = "tracking_buffer.jsonl"  # in the run directory: calls the store did not take yet
RETRY_SECONDS = 15.0  # while the store is unreachable, try it again this often


class Tracker:
    """One MLflow run: start (or attach to) it, log to it, end it.

    Once `buffer_dir` is set (the run directory), a call the store does not take
    (a server gone, a database locked) is appended to `tracking_buffer.jsonl`
    there, in order, and replayed when the store answers again, at the end of
    the run, or by `capsx sync RUN_DIR`: training goes on and nothing is lost.
    """

    def __init__(self, uri: str, run_id: str, buffer_dir: Path | None = None,
                 notify: Callable[[str], None] | None = None) -> None:
        self.uri = uri
        self.client = _client(uri)
        self.run_id = run_id
        self.buffer_dir = buffer_dir
        self.notify = notify or (lambda message: None)
        self._last_attempt = 0.0
        self._monitor: Any = None  # MLflow's system-metrics sampler, while one runs

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
    def attach(cls, uri: str, run_id: str, *, reopen: bool = False, buffer_dir: Path | None = None) -> Tracker:
        """An existing run; `reopen` marks it RUNNING again (a resumed training)."""
        tracker = cls(uri, run_id, buffer_dir)
        with _store_errors(uri):
            tracker.client.get_run(run_id)
            if reopen:
                tracker.client.update_run(run_id, status="RUNNING")
        return tracker

    def _experiment_id(self, name: str) -> str:
        """The experiment's id, created if new; either way tagged with MLflow 3's experiment kind, model
        training (the UI's view is chosen by its URL: `capsx ui` prints the model-training one)."""
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            store = local_store_dir(self.uri)
            location = (store / "artifacts" / name).resolve().as_uri() if store is not None else None
            experiment_id = str(self.client.create_experiment(name, artifact_location=location,
                                                              tags={EXPERIMENT_KIND: MODEL_TRAINING}))
        else:
            experiment_id = str(exp.experiment_id)
            if exp.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:
                self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        return experiment_id

    def monitor_system(self, resume: bool = False) -> None:
        """Log MLflow's system metrics (CPU, memory, disk, network; GPU where pynvml is installed) to this
        run every 10 s ($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL) until `end`; `resume` continues the steps."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume, tracking_uri=self.uri)
        self._monitor.start()

    @property
    def active(self) -> bool:
        return True

    # -- the calls ------------------------------------------------------------------------------

    def log_params(self, params: dict[str, Any]) -> None:
        self._submit("params", {"items": [[k, v[:6000]] for k, v in flatten(params).items()]})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)  # taken now, so a replay keeps the time it happened
        self._submit("metrics", {"items": [[k, shortest(v), ts, step] for k, v in metrics.items()]})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._submit("tags", {"items": [[k, str(v)] for k, v in tags.items()]})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit("text", {"text": text, "artifact_file": artifact_file})

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        self._submit("dict", {"data": data, "artifact_file": artifact_file})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._submit("artifact", {"path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_image(self, image: np.ndarray, key: str, step: int = 0) -> None:
        """An (H, W) or (H, W, 3) uint8 image, paged by `step` in the UI's image view."""
        self._submit("image", {"key": key, "step": step}, image=image)

    def end(self, status: str = "FINISHED", note: str | None = None) -> int:
        """End the run; returns how many calls are still waiting in the buffer (0: all delivered)."""
        if self._monitor is not None:
            self._monitor.finish()  # wakes at once, logs what it sampled
            self._monitor = None
        self._submit("end", {"status": status, "note": note})
        for wait in (0.5, 1.0, 2.0):  # a busy local database frees up in moments; a dead server does not
            if not self.pending():
                break
            time.sleep(wait)
            self.flush()
        return self.pending()

    # -- delivery and buffering -----------------------------------------------------------------

    @property
    def buffer_path(self) -> Path | None:
        return self.buffer_dir / BUFFER_FILE if self.buffer_dir is not None else None

    def pending(self) -> int:
        path = self.buffer_path
        if path is None or not path.is_file():
            return 0
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        try:
            return len(_buffered_calls(path, lines))  # not a last line a kill cut short
        except CapsxError:
            return len(lines)  # `flush` will name the bad line

    def _submit(self, op: str, args: dict[str, Any], image: np.ndarray | None = None) -> None:
        waiting = self.pending() > 0
        if waiting and (time.monotonic() - self._last_attempt < RETRY_SECONDS or self.flush()):
            self._buffer(op, args, image)  # keep the order: nothing jumps the queue
            return
        try:
            self._apply(op, args, image)
        except Exception as e:
            if self.buffer_path is None:
                raise CapsxError(f"tracking store {self.uri}: {_first_line(e)}") from None
            self._last_attempt = time.monotonic()
            self._buffer(op, args, image)
            self.notify(f"tracking store {self.uri} did not answer ({_first_line(e)[:120]}); "
                        f"training goes on, keeping what it logs in {self.buffer_path}")

    def flush(self) -> int:
        """Send buffered calls in order until one fails; returns how many are left."""
        path = self.buffer_path
        if path is None or not path.is_file():
            return 0
        self._last_attempt = time.monotonic()
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        entries = _buffered_calls(path, lines)
        lines = lines[:len(entries)]  # a last line cut short by a kill is dropped with the call it was
        sent = 0
        for entry in entries:
            image = None
            if "image_file" in entry:
                from PIL import Image

                try:
                    with Image.open(entry["image_file"]) as im:
                        image = np.asarray(im)
                except OSError as e:
                    raise CapsxError(f"{path}: the picture of a buffered {entry['op']} call cannot be read "
                                     f"({e}); delete that line to send the rest") from None
            try:
                self._apply(entry["op"], entry["args"], image)
            except Exception:
                break
            sent += 1
        rest = lines[sent:]
        if rest:
            write_text(path, "".join(line + "\n" for line in rest))
        else:
            path.unlink()
            shutil.rmtree(path.parent / "tracking_buffer_images", ignore_errors=True)
            if sent:
                self.notify(f"tracking store {self.uri} is back: sent {sent} buffered call(s)")
        return len(rest)

    def _buffer(self, op: str, args: dict[str, Any], image: np.ndarray | None) -> None:
        """Append one call (a line, flushed to the disk): a kill can cut only the line being written."""
        path = self.buffer_path
        assert path is not None
        entry: dict[str, Any] = {"op": op, "args": args}
        if image is not None:
            from PIL import Image

            folder = path.parent / "tracking_buffer_images"
            folder.mkdir(parents=True, exist_ok=True)
            file = folder / f"{time.time_ns()}.png"
            with replacing(file) as f:  # whole before the line that names it is written
                Image.fromarray(image).save(f, format="PNG")
            entry["image_file"] = str(file)
        with path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _apply(self, op: str, args: dict[str, Any], image: np.ndarray | None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        c, run = self.client, self.run_id
        if op == "params":
            items = [Param(k, v) for k, v in args["items"]]
            for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
                c.log_batch(run, params=items[i:i + MAX_PARAMS_PER_BATCH])
        elif op == "metrics":
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in args["items"]]
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                c.log_batch(run, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])
        elif op == "tags":
            c.log_batch(run, tags=[RunTag(k, v) for k, v in args["items"]])
        elif op == "text":
            c.log_text(run, args["text"], args["artifact_file"])
        elif op == "dict":
            c.log_dict(run, args["data"], args["artifact_file"])
        elif op == "artifact":
            c.log_artifact(run, args["path"], args["artifact_path"])
        elif op == "image":
            assert image is not None
            # synchronous: a failure raises here, so the call is buffered like any other (MLflow's async
            # path would only log it), and nothing waits on MLflow's queue thread at exit (it polls each 1 s)
            c.log_image(run, image, key=args["key"], step=args["step"], synchronous=True)
        elif op == "end":
            if args["note"]:  # below the run's description (the recipe's), not instead of it
                before = c.get_run(run).data.tags.get(NOTE, "")
                c.set_tag(run, NOTE, f"{before}\n\n{args['note']}" if before else args["note"])
            c.set_terminated(run, status=args["status"])
        else:
            raise AssertionError(f"unknown tracking op {op!r}")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


class NullTracker:
    """Tracking off (--no-track): the same calls, nothing kept."""

    uri = None
    active = False

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_image(self, image: np.ndarray, key: str, step: int = 0) -> None: ...
    def end(self, status: str = "FINISHED", note: str | None = None) -> int:
        return 0


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


def child_run_ids(uri: str, run_id: str) -> list[str]:
    """The runs nested under `run_id` (a `train --seeds` parent's seeds), oldest first; [] if none."""
    client = _client(uri)
    with _store_errors(uri):
        experiments = [e.experiment_id for e in client.search_experiments()]
        if not experiments:
            return []
        runs = client.search_runs(experiments, filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'",
                                  order_by=["attributes.start_time ASC"])
    return [r.info.run_id for r in runs]


def runs_tagged(uri: str, key: str, value: str) -> list[Any]:
    """Every run of the store (any experiment) whose tag `key` is `value`, oldest first (MLflow Runs)."""
    client = _client(uri)
    with _store_errors(uri):
        experiments = [e.experiment_id for e in client.search_experiments()]
        if not experiments:
            return []
        return list(client.search_runs(experiments, filter_string=f"tags.`{key}` = '{value}'",
                                       order_by=["attributes.start_time ASC"], max_results=50_000))


def find_run(uri: str, run_id: str) -> Any | None:
    """The MLflow Run `run_id`, or None when the store does not know it."""
    try:
        return _client(uri).get_run(run_id)
    except Exception:
        return None


def metric_history(uri: str, run_id: str, key: str) -> list[Any]:
    """Every logged value of metric `key` of a run (MLflow Metric objects: value, step)."""
    with _store_errors(uri):
        return list(_client(uri).get_metric_history(run_id, key))


def parent_run_id(uri: str, run_id: str) -> str | None:
    """The run `run_id` is nested under, or None (also when the store does not know the run)."""
    client = _client(uri)
    try:
        return client.get_run(run_id).data.tags.get("mlflow.parentRunId")
    except Exception:
        return None


def _buffered_calls(path: Path, lines: list[str]) -> list[dict[str, Any]]:
    """The buffer's calls, one JSON object a line. The last line may be cut short (the process was
    killed while appending it): that call is dropped. Any other line that is not a call is an error."""
    calls = []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if isinstance(entry, dict) and isinstance(entry.get("op"), str) and isinstance(entry.get("args"), dict):
            calls.append(entry)
        elif number == len(lines):
            break
        else:
            raise CapsxError(f"{path}: line {number} is not a tracking call capsx wrote; fix or delete it "
                             "to send the rest")
    return calls
