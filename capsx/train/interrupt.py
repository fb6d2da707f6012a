"""Turn SIGINT / SIGTERM into a request to stop after the current step."""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType, TracebackType


class StopRequest:
    """While active, the first SIGINT/SIGTERM sets `signal`; a second SIGINT aborts at once.

    A second signal within `ECHO_SECONDS` of the first is the same request arriving twice (under torchrun
    the terminal's Ctrl-C reaches each worker directly and again through the launcher), not a second press.
    """

    ECHO_SECONDS = 2.0

    def __init__(self) -> None:
        self.signal: int | None = None
        self._at = 0.0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signal is not None:
            if signum == signal.SIGINT and now - self._at > self.ECHO_SECONDS:
                raise KeyboardInterrupt  # second Ctrl-C: the user really means now
            return
        self.signal, self._at = signum, now

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
