"""A real MLflow tracking server for tests, started the way users start one: `capsx server`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

CAPSX = Path(sys.executable).with_name("capsx")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, "the server exited"
        assert time.time() < deadline, "the server did not come up"
        time.sleep(0.3)


def rest_get(base: str, endpoint: str, **query: Any) -> dict:
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}",
                                timeout=10) as r:
        return json.loads(r.read())


def rest_post(base: str, endpoint: str, body: dict) -> dict:
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


class Server:
    """`capsx server` on 127.0.0.1 with its artifacts in `root`, and its SQLite store there too unless
    `backend` names another (a PostgreSQL URI)."""

    def __init__(self, root: Path, port: int, backend: str | None = None, host: str = "127.0.0.1",
                 allowed_hosts: str | None = None) -> None:
        self.root, self.port, self.backend, self.host, self.allowed_hosts = root, port, backend, host, allowed_hosts
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        backend = ["--backend-store-uri", self.backend] if self.backend else []
        backend += ["--host", self.host] + (["--allowed-hosts", self.allowed_hosts] if self.allowed_hosts else [])
        self.proc = subprocess.Popen([str(CAPSX), "server", "--store", str(self.root), "--port", str(self.port),
                                      *backend], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_healthy(self.uri, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
        deadline = time.time() + 30
        while time.time() < deadline:  # until the port is really closed
            with socket.socket() as s:
                if s.connect_ex((self.host, self.port)) != 0:
                    return
            time.sleep(0.2)


def second_loopback() -> str | None:
    """127.0.0.2 where this machine routes it to itself (Linux: all of 127/8), to tell a server's bound
    address from 127.0.0.1; None elsewhere."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.2", 0))
        except OSError:
            return None
    return "127.0.0.2"
