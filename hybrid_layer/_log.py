"""Rate-limited logging: a drop storm becomes one line per key per interval, with a count."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("hybrid_layer")


class RateLimited:
    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._last[key] = now
            n = self._suppressed.pop(key, 0)
        if n:
            log.warning(msg + " (%d similar suppressed)", *args, n)
        else:
            log.warning(msg, *args)


limited = RateLimited()
