"""A throwaway PostgreSQL for tests: Debian's `postgresql` binaries, `initdb` into a temporary folder,
listening on a free port of 127.0.0.1 only, trust authentication, stopped and deleted at the end."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.mlflow_server import free_port

OWNER = "postgres"  # the account Debian's package makes: PostgreSQL refuses to run as root


def binaries() -> Path | None:
    """The folder of initdb and pg_ctl (Debian keeps them under /usr/lib/postgresql/<version>/bin)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def why_not() -> str | None:
    """Why no PostgreSQL can be started here, or None if one can."""
    import importlib.util

    if importlib.util.find_spec("psycopg") is None:
        return "psycopg is not installed: pip install 'capsx[postgres]'"
    if binaries() is None:
        return "PostgreSQL is not installed: apt-get install postgresql (make test does, where root apt-get can)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(OWNER)
        except KeyError:
            return f"running as root and there is no {OWNER!r} account to run PostgreSQL as"
    return None


class Postgres:
    def __init__(self) -> None:
        bin_dir = binaries()
        assert bin_dir is not None, why_not()
        self.bin = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="capsx-pg-"))  # not under pytest's root-only tmp
        self.data = self.root / "data"
        if os.geteuid() == 0:
            owner = pwd.getpwnam(OWNER)
            os.chown(self.root, owner.pw_uid, owner.pw_gid)

    @property
    def uri(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str) -> None:
        argv = [str(self.bin / cmd[0]), *cmd[1:]]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", OWNER, "--", *argv]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{' '.join(argv)}:\n{out.stdout}\n{out.stderr}"

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", options, "-w", "-t", "60",
                  "start")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def database_or_none() -> Iterator[Postgres | None]:
    """A started PostgreSQL where one can be started here (the team server's database: the harder
    case for the server tests), else None (they run on the server's SQLite store)."""
    db = Postgres() if why_not() is None else None
    if db is not None:
        db.start()
    try:
        yield db
    finally:
        if db is not None:
            db.stop()
