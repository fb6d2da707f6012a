"""`capsx sync`: send the tracking calls a run kept in its directory while its MLflow store was unreachable."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from capsx.errors import CapsxError
from capsx.jobs.context import silent
from capsx.track.runs import read_run_info
from capsx.track.tracker import Tracker


def sync_run(run_dir: Path, tracking_uri: str | None, say: Callable[..., None] = silent) -> int:
    """Send a run's buffered tracking calls (to `tracking_uri`, else its own store); returns how many are left."""
    if not (run_dir / "run.json").is_file():
        raise CapsxError(f"{run_dir}: not a run directory (expected run.json in it)")
    info = read_run_info(run_dir)
    uri = tracking_uri or info.tracking_uri
    if uri is None:
        raise CapsxError(f"{run_dir}: the run was trained with tracking off; give --tracking-uri to send it")
    tracker = Tracker(uri, info.run_id, buffer_dir=run_dir)
    waiting = tracker.pending()
    if not waiting:
        say(f"nothing to send: {run_dir} has no buffered tracking calls")
        return 0
    left = tracker.flush()
    say(f"sent {waiting - left} of {waiting} buffered call(s) to {uri} (run {info.run_id})")
    return left
