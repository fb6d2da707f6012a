"""Local run directories: `runs/<experiment>/<run id>/` with run.json and checkpoints/.

This is where a run's checkpoints live, so `eval latest` or `eval RUN_ID`
works offline and with tracking off.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from capsx.atomic import write_text
from capsx.errors import CapsxError


@dataclass
class RunInfo:
    run_id: str
    experiment: str
    recipe: str
    tracking_uri: str | None
    started: float

    def save(self, run_dir: Path) -> None:
        """Written beside, then renamed into place, as checkpoints are: never half a file."""
        try:
            write_text(run_dir / "run.json", json.dumps(asdict(self), indent=2) + "\n")
        except OSError as e:
            raise CapsxError(f"{run_dir}: cannot write run.json ({e.strerror or e})") from None


def ensure_writable(runs_dir: Path) -> None:
    """Create `runs_dir` if needed and prove a file can be written there."""
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        probe = runs_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CapsxError(f"cannot write to {runs_dir}/: {e.strerror}; expected a writable folder for "
                         "checkpoints (pass --runs-dir)") from None


def make_run_dir(runs_dir: Path, experiment: str, run_id: str) -> Path:
    run_dir = runs_dir / _safe(experiment) / run_id
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CapsxError(f"cannot create the run directory {run_dir}: {e.strerror}; "
                         "expected a writable runs/ (or pass --runs-dir)") from None
    return run_dir


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "default"


def read_run_info(run_dir: Path) -> RunInfo:
    """The run's run.json; one that cannot be read as capsx writes it is one CapsxError naming it."""
    path = run_dir / "run.json"
    try:
        return RunInfo(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CapsxError(f"{path}: not a run.json capsx wrote ({type(e).__name__}: {str(e)[:120]}); "
                         "the run's checkpoints are still usable by path") from None


def is_run_id(ref: str) -> bool:
    """Shaped like an MLflow run id (32 hex digits), so worth asking the tracking store about."""
    return re.fullmatch(r"[0-9a-f]{32}", ref) is not None


def find_run_dir(runs_dir: Path, ref: str, *, which: str = "best") -> Path | None:
    """The local directory of run `ref` (a run id or `latest`), or None if it is not here.

    `latest`: for weights (`which` "best"), the newest run holding a checkpoint, tracked or not (a picture
    command says when its pictures stay local); to resume ("last"), the newest run, whose missing last.pt
    is then an error rather than a quiet resume of an older run. A run.json that cannot be read is passed
    over: one broken run must not hide all the others."""
    infos = sorted(runs_dir.glob("*/*/run.json"))
    if ref == "latest":
        candidates = []
        for p in infos:
            try:
                info = read_run_info(p.parent)
            except CapsxError:
                continue
            if which == "last" or any((p.parent / "checkpoints" / n).is_file() for n in ("best.pt", "last.pt")):
                candidates.append((info.started, p.stat().st_mtime, p.parent))
        return max(candidates, key=lambda c: c[:2])[2] if candidates else None
    for p in infos:
        if p.parent.name == ref:
            return p.parent
    return None


def best_checkpoint(run_dir: Path) -> Path:
    """best.pt if the run kept one, else last.pt."""
    for name in ("best.pt", "last.pt"):
        path = run_dir / "checkpoints" / name
        if path.is_file():
            return path
    raise CapsxError(f"{run_dir}: no checkpoints/best.pt or checkpoints/last.pt (the run ended before its first)")


def resolve_checkpoint(ref: str, runs_dir: Path, tracking_uri: str | None, which: str = "best") -> Path:
    """A checkpoint from a path, a run directory, 'latest', or a run id (local first, then MLflow).

    which: 'best' (weights for eval; falls back to last.pt) or 'last' (the resumable state).
    """
    path = Path(ref)
    if path.is_file():
        return path
    run_dir = path if (path / "checkpoints").is_dir() else find_run_dir(runs_dir, ref, which=which)
    if run_dir is not None:
        if which == "last":
            last = run_dir / "checkpoints" / "last.pt"
            if not last.is_file():
                raise CapsxError(f"{run_dir}: no checkpoints/last.pt to resume from")
            return last
        return best_checkpoint(run_dir)
    if ref == "latest":
        raise CapsxError(f"no run with a checkpoint in {runs_dir}/ yet; train one first "
                         "(e.g. capsx train recipes/quickstart.yaml)")
    if is_run_id(ref) and which == "best":
        from capsx.track.tracker import download_checkpoint, resolve_tracking_uri

        uri = resolve_tracking_uri(tracking_uri, None, runs_dir)
        fetched = download_checkpoint(uri, ref, runs_dir / "_downloads" / ref)
        if fetched is not None:
            return fetched
    raise CapsxError(f"no run or checkpoint {ref!r}: expected a checkpoint file, a run id found under "
                     f"{runs_dir}/ or in the tracking store, or 'latest'")


def run_tracking_uri(checkpoint: Path, cli_uri: str | None, runs_dir: Path) -> str | None:
    """The store a checkpoint's run logs to: --tracking-uri, else its run.json's (None: trained
    with tracking off), else the default store for a checkpoint outside any run directory."""
    if cli_uri:
        return cli_uri
    run_dir = checkpoint.parent.parent
    if (run_dir / "run.json").is_file():
        return read_run_info(run_dir).tracking_uri
    from capsx.track.tracker import resolve_tracking_uri

    return resolve_tracking_uri(None, None, runs_dir)
