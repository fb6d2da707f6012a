"""A run's tracker in a process of its own, for the picture commands.

Importing MLflow and opening its store takes seconds (MLflow imports pandas and its GenAI modules),
about as long as the rest of a picture command (README: the start-up table). The process is started first thing, so that
time runs on another core while this one imports torch, opens the checkpoint and draws; which run
to log to is sent once it is known, then the calls, as JSON lines on its stdin, and it reports one
line when its input ends. On one core it costs about what the in-process tracker did.

`python -m capsx.track.process` is the other end.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

import numpy as np

from capsx.atomic import replacing
from capsx.errors import CapsxError

DONE = "capsx-tracking-done "  # the child's last stdout line: this, then how many calls it applied


class TrackerProcess:
    """log_image / log_metrics of an existing MLflow run, applied by a child process; `close()` waits for
    it and raises its error (a store that does not answer, a run that is not there) as a CapsxError."""

    active = True

    def __init__(self) -> None:
        self.uri, self.run_id = "", ""
        self._scratch = tempfile.TemporaryDirectory(prefix="capsx-log-")
        self._output: IO[str] = open(Path(self._scratch.name) / "output.txt", "w+")  # noqa: SIM115
        # output to a file, not a pipe: a child blocked on a full pipe would block our writes to its stdin
        self._proc = subprocess.Popen([sys.executable, "-m", "capsx.track.process"], stdin=subprocess.PIPE,
                                      stdout=self._output, stderr=subprocess.STDOUT, text=True)
        self._sent = 0
        self._closed: int | None = None

    def attach(self, uri: str, run_id: str) -> TrackerProcess:
        """Log to this existing run."""
        self.uri, self.run_id = uri, run_id
        self._send({"uri": uri, "run_id": run_id})
        self._sent = 0
        return self

    def log_image(self, image: np.ndarray, key: str, step: int = 0) -> None:
        path = Path(self._scratch.name) / f"{self._sent}.npy"
        with replacing(path) as f:  # exact: the child logs the very array, and never half of it
            np.save(f, image)
        self._send({"op": "image", "path": str(path), "key": key, "step": step})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file that stays where it is until the child has read it (a run's picture)."""
        self._send({"op": "artifact", "path": str(path), "artifact_path": artifact_path})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._send({"op": "metrics", "metrics": {k: float(v) for k, v in metrics.items()}, "step": step})

    def _send(self, call: dict[str, Any]) -> None:
        assert self._proc.stdin is not None and self._closed is None
        self._sent += 1
        try:
            self._proc.stdin.write(json.dumps(call) + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the child has stopped: close() says why

    def close(self, timeout: float = 300.0) -> int:
        """Wait for every call to be applied; returns how many were. Idempotent."""
        if self._closed is not None:
            return self._closed
        try:
            assert self._proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, OSError):
                self._proc.stdin.close()
            try:
                code = self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
                raise CapsxError(f"tracking store {self.uri}: did not take the pictures' calls within "
                                 f"{timeout:.0f} s") from None
            self._output.seek(0)
            lines = [ln.strip() for ln in self._output.read().splitlines() if ln.strip()]
            done = [ln for ln in lines if ln.startswith(DONE)]
            if code != 0 or not done:
                why = next((ln for ln in reversed(lines) if ln.startswith("error: ")), lines[-1] if lines else "")
                raise CapsxError(why.removeprefix("error: ") or f"the tracking process exited with {code}")
            self._closed = int(done[-1][len(DONE):])
            return self._closed
        finally:
            self._output.close()
            self._scratch.cleanup()
            if self._closed is None:
                self._closed = 0


def _serve() -> int:
    from capsx.track.tracker import Tracker, import_mlflow

    import_mlflow()  # the 2 s this process exists for, before it knows which run
    header = sys.stdin.readline()
    if not header:  # nothing to log after all (no run, or --no-log decided later)
        print(f"{DONE}0", flush=True)
        return 0
    run = json.loads(header)
    try:
        tracker = Tracker.attach(run["uri"], run["run_id"])
        applied = 0
        for line in sys.stdin:
            call = json.loads(line)
            if call["op"] == "image":
                tracker.log_image(np.load(call["path"]), key=call["key"], step=call["step"])
            elif call["op"] == "metrics":
                tracker.log_metrics(call["metrics"], step=call["step"])
            elif call["op"] == "artifact":
                tracker.log_artifact(Path(call["path"]), call["artifact_path"])
            applied += 1
    except CapsxError as e:
        print(f"error: {e}", flush=True)
        return e.exit_code
    print(f"{DONE}{applied}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_serve())
