"""Rate-limited logging: a drop storm is one line at once, then one summary per interval.

Every message the layer drops goes through :meth:`Counters.drop <hybrid_layer.stats.Counters.drop>`,
which counts it and calls :meth:`RateLimited.dropped` here. Each log site (its format
string and reason are the key) logs its first event at once; further events of that site within
``interval`` seconds are only counted, and :meth:`RateLimited.flush` - called by every
participant's host thread on its tick, and at close - logs them as one summary,
``"<N> more <reason> drops in the last 10 s (last: ...)"``, once ``interval`` has passed
since that site's previous line, whether or not another drop comes. So a storm of any
length costs one line at its start and one every ``interval`` while it lasts, and every
suppressed event is reported within ``interval`` plus one tick.

Cost on the path that drops: one dict lookup, one ``time.monotonic()`` and an
uncontended lock; nothing at all on the path that delivers.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("hybrid_layer")

_monotonic = time.monotonic


class _Site:
    __slots__ = ("args", "kind", "last", "level", "msg", "suppressed")

    def __init__(self, now: float, msg: str, args: tuple[object, ...], kind: str, level: int):
        self.last = now  # when this site last wrote a line
        self.suppressed = 0  # events counted since then and not yet written
        self.msg = msg
        self.args = args  # the last suppressed event's (for the summary)
        self.kind = kind
        self.level = level


class RateLimited:
    """One line per site at once, then a summary per ``interval`` with the exact count."""

    def __init__(self, interval: float = 10.0, logger: logging.Logger = log) -> None:
        self.interval = interval
        self.logger = logger
        self._sites: dict[object, _Site] = {}
        self._lock = threading.Lock()
        self._pending = False  # some site has suppressed events (a lock-free peek)

    def warning(self, key: str, msg: str, *args: object) -> None:
        """A rate-limited warning that is not a drop (``key`` names the site)."""
        self._note(key, 1, msg, args, "similar", logging.WARNING)

    def dropped(self, reason: str, n: int, msg: str, args: tuple[object, ...], level: int) -> None:
        """``n`` messages dropped for ``reason`` at the site ``msg`` (its format string)."""
        self._note((reason, msg), n, msg, args, reason.replace("_", " ") + " drops", level)

    def _note(
        self, key: object, n: int, msg: str, args: tuple[object, ...], kind: str, level: int
    ) -> None:
        now = _monotonic()
        with self._lock:
            site = self._sites.get(key)
            if site is not None and now - site.last < self.interval:
                site.suppressed += n
                site.msg, site.args = msg, args  # (one key may log more than one text)
                self._pending = True
                return
            if site is None:
                site = self._sites[key] = _Site(now, msg, args, kind, level)
            else:  # quiet for a whole interval (a flush has written what was counted)
                site.last = now
        self.logger.log(level, msg, *args)

    def flush(self, force: bool = False) -> int:
        """Write a summary for every site whose interval has passed (all if ``force``).

        Returns the number of summary lines written. Cheap when nothing is pending."""
        if not self._pending:
            return 0
        now = _monotonic()
        out: list[tuple[_Site, int, float, str, tuple[object, ...]]] = []
        with self._lock:
            pending = False
            for site in self._sites.values():
                if not site.suppressed:
                    continue
                if force or now - site.last >= self.interval:
                    out.append((site, site.suppressed, now - site.last, site.msg, site.args))
                    site.suppressed = 0
                    site.last = now
                else:
                    pending = True
            self._pending = pending
        for site, n, span, msg, args in out:
            try:
                last = msg % args if args else msg
            except (TypeError, ValueError):  # (never let a summary fail to be written)
                last = f"{msg} {args!r}"
            self.logger.log(
                site.level,
                "hybrid_layer: %d more %s in the last %.0f s (last: %s)",
                n,
                site.kind,
                span,
                last.removeprefix("hybrid_layer: "),
            )
        return len(out)

    def reset(self) -> None:
        """Forget every site (tests)."""
        with self._lock:
            self._sites.clear()
            self._pending = False


limited = RateLimited()
