"""A log that a flood cannot flood: per kind of event, the first few lines of each time window are
logged one by one, the rest only counted and summarised in one line when the window ends. Both
sides of the wire use it for what a peer can make them log at will (rejected frames, failed
handshakes); the counters that metrics export are kept by the caller, every event counted."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Window:
    start_s: float
    num_logged: int = 0
    num_suppressed: int = 0


class RateLimitedLog:
    def __init__(
        self,
        logger: logging.Logger,
        window_s: float = 10.0,
        lines_per_window: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.window_s = window_s
        self.lines_per_window = lines_per_window
        self.clock = clock
        self._windows: dict[str, _Window] = {}  # by kind (a small fixed set of names)

    def log(self, level: int, kind: str, message: str, *args: object) -> None:
        """Log `message % args` unless `kind` already used up its lines in this window."""
        now_s = self.clock()
        window = self._windows.get(kind)
        if window is None or now_s - window.start_s >= self.window_s:
            if window is not None:
                self._summarise(kind, window)
            window = self._windows[kind] = _Window(now_s)
        if window.num_logged < self.lines_per_window:
            window.num_logged += 1
            self.logger.log(level, message, *args)
        else:
            window.num_suppressed += 1

    def warning(self, kind: str, message: str, *args: object) -> None:
        self.log(logging.WARNING, kind, message, *args)

    def error(self, kind: str, message: str, *args: object) -> None:
        self.log(logging.ERROR, kind, message, *args)

    def tick(self) -> None:
        """Summarise the windows that ended (call it now and then, e.g. from a housekeeping
        loop, so that the count of a flood that stopped is still told)."""
        now_s = self.clock()
        for kind, window in list(self._windows.items()):
            if now_s - window.start_s >= self.window_s:
                self._summarise(kind, window)
                del self._windows[kind]

    def _summarise(self, kind: str, window: _Window) -> None:
        if window.num_suppressed:
            self.logger.warning(
                "%d more %s event(s) in %.0f s were not logged one by one (see the metrics)",
                window.num_suppressed,
                kind,
                self.window_s,
            )
