"""Error logs that cannot flood: the same message key is written at most once per interval.

A storefront that sends the same malformed request 10,000 times a second must not turn the gateway's
log into 10,000 tracebacks a second (disk, CPU, and the one useful line drowned). Each key logs its
first occurrence at once, then at most one line per `interval_s` saying how many were suppressed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

MAX_KEYS = 1024
"""Distinct keys remembered; keys come from a fixed set (method, reason), this only guards against misuse."""


class ThrottledLog:
    def __init__(self, logger: logging.Logger, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, message: str, *args: object) -> bool:
        """Log unless `key` was logged less than `interval_s` ago; returns whether it was written."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        if last is None and len(self._last) >= MAX_KEYS:
            self._last.clear()
            self._suppressed.clear()
        suppressed = self._suppressed.pop(key, 0)
        self._last[key] = now
        suffix = f" ({suppressed} more like it in the last {now - last:.0f} s not logged)" if suppressed and last is not None else ""
        self.logger.log(level, message + suffix, *args)
        return True
