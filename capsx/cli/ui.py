"""`ui` and `server`: MLflow's web UI on capsx's store, and a shared tracking server."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from capsx.cli.app import app, handles_errors
from capsx.cli.options import RunsDirOpt, TrackingOpt
from capsx.errors import CapsxError

TRAINING_VIEW = "#/experiments?workflowType=machine_learning"  # the experiments' runs tables, not GenAI's pages


@app.command()
@handles_errors
def ui(
    tracking_uri: TrackingOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
    host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 unless you mean to share.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the web UI.")] = 5000,
) -> None:
    """Open the MLflow UI on the same store `train` logs to."""
    from capsx.track.tracker import local_store_dir, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, None, runs_dir)
    args = ["ui", "--backend-store-uri", uri]
    store = local_store_dir(uri)
    if store is not None:
        try:  # MLflow would make it too, but with a traceback where it cannot
            store.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CapsxError(f"{store}: cannot make the store's folder ({e.strerror or e}); expected a writable "
                             "folder (pass --runs-dir or --tracking-uri)") from None
        args += ["--default-artifact-root", (store / "artifacts").resolve().as_uri()]
    # MLflow 3's UI opens on its GenAI pages unless told the model-training view (remembered once toggled)
    _become_mlflow(args, host, port, f"MLflow UI for {uri} at http://{host}:{port}/{TRAINING_VIEW} "
                                     "(Ctrl-C to stop)", env={"MLFLOW_TRACKING_URI": uri})


@app.command()
@handles_errors
def server(
    store: Annotated[Path, typer.Option(
        help="Folder of the server's SQLite database (mlflow.db) and artifacts (artifacts/).")] = Path("runs/server"),
    backend_store_uri: Annotated[str | None, typer.Option(
        help="Any MLflow backend store instead (e.g. postgresql://user@host/db); artifacts stay in --store.")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind; 0.0.0.0 shares it with the network "
                                           "(MLflow has no login by default: only on a trusted network).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the server (UI and REST API).")] = 5000,
    allowed_hosts: Annotated[str | None, typer.Option(
        help="Host names clients may use to reach it, e.g. 'gpu-box.lan:5000' (MLflow refuses other hosts' "
             "requests by default).")] = None,
) -> None:
    """Start a shared MLflow tracking server; point runs at it with --tracking-uri http://HOST:PORT."""
    if backend_store_uri:
        check_database_driver(backend_store_uri)
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CapsxError(f"--store {store}: cannot make the folder ({e.strerror or e}); expected a writable "
                         "folder for the server's database and artifacts") from None
    backend = backend_store_uri or f"sqlite:///{(store / 'mlflow.db').resolve()}"
    artifacts = (store / "artifacts").resolve()
    args = ["server", "--backend-store-uri", backend, "--artifacts-destination", str(artifacts)]
    args += ["--allowed-hosts", allowed_hosts] if allowed_hosts else []
    reach = socket.gethostname() if host == "0.0.0.0" else host
    _become_mlflow(args, host, port, f"MLflow tracking server at http://{reach}:{port} (store {backend}, "
                                     f"artifacts {artifacts}); train against it with: capsx train RECIPE "
                                     f"--tracking-uri http://{reach}:{port}   (Ctrl-C to stop)", env={})


DRIVER_HINTS = {"psycopg": "pip install 'capsx[postgres]' (psycopg 3: what MLflow's postgresql:// uses)",
                "psycopg2": "pip install psycopg2-binary", "mysqldb": "pip install mysqlclient",
                "pymysql": "pip install pymysql"}


def check_database_driver(uri: str) -> None:
    """A database backend's Python driver, imported before MLflow starts: a missing one is one line saying
    what to install, not MLflow's traceback after a minute of waiting for the server's health."""
    if uri.startswith(("sqlite:", "file:", "http:", "https:", "databricks")) or "://" not in uri:
        return
    from sqlalchemy.engine import make_url

    try:
        url = make_url(uri)
        dialect = url.get_dialect()
    except Exception as e:
        raise CapsxError(f"--backend-store-uri: {uri.split('@')[-1]} is no database URI SQLAlchemy knows "
                         f"({str(e).splitlines()[0][:120]})") from None
    try:
        dialect.import_dbapi()
    except ImportError:
        hint = DRIVER_HINTS.get(dialect.driver, f"pip install the {dialect.driver!r} package")
        raise CapsxError(f"--backend-store-uri {url.render_as_string(hide_password=True)}: needs the Python "
                         f"driver {dialect.driver!r}, which is not installed; {hint}") from None


def _become_mlflow(args: list[str], host: str, port: int, banner: str, env: dict[str, str]) -> None:
    """Replace this process by `mlflow ARGS --host --port`: Ctrl-C and SIGTERM then reach it (and its
    web server) directly, as if the user had typed the mlflow command."""
    from capsx.console import console

    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1" if host == "0.0.0.0" else host, port)) == 0:
            raise CapsxError(f"port {port} on {host} is already in use; pass --port")
    mlflow_bin = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    console.print(banner, soft_wrap=True)
    full_env = {**os.environ, **env}
    # MLflow 3 also starts a pool of job workers (for GenAI evaluation jobs); tracking needs none.
    full_env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    sys.stdout.flush()
    os.execve(mlflow_bin, [mlflow_bin, *args, "--host", host, "--port", str(port)], full_env)
