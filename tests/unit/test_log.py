"""The rate-limited drop logger: the first line at once, then a summary with the exact
count of what it suppressed, written by a flush even when no further drop comes."""

from __future__ import annotations

import logging
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_layer._log import RateLimited
from hybrid_layer.stats import DROP_REASONS, Counters


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def text(self) -> list[str]:
        return [r.getMessage() for r in self.records]


def limiter(interval: float) -> tuple[RateLimited, Lines]:
    logger = logging.getLogger(f"hybrid_layer.test.{time.monotonic_ns()}")
    logger.propagate = False
    h = Lines()
    logger.addHandler(h)
    logger.setLevel(logging.DEBUG)
    return RateLimited(interval, logger), h


def summed(lines: list[str]) -> int:
    """Drops accounted for by the lines: 1 per first line, N per 'N more' summary."""
    total = 0
    for t in lines:
        m = re.match(r"hybrid_layer: (\d+) more ", t)
        total += int(m.group(1)) if m else 1
    return total


def test_a_storm_is_one_line_then_a_summary_without_a_further_drop() -> None:
    lim, h = limiter(0.2)
    for i in range(474):
        lim.dropped("full", 1, "copy for %r dropped: full", (f"c{i}",), logging.WARNING)
    assert h.text == ["copy for 'c0' dropped: full"]  # the first one at once
    assert lim.flush() == 0  # not due yet
    time.sleep(0.25)
    assert lim.flush() == 1  # no further drop came: the flush writes the summary
    assert (
        h.text[1]
        == "hybrid_layer: 473 more full drops in the last 0 s (last: copy for 'c473' dropped: full)"
    )
    assert lim.flush() == 0 and len(h.text) == 2  # said once


def test_sites_and_reasons_are_limited_apart() -> None:
    lim, h = limiter(60)
    for _ in range(3):
        lim.dropped("full", 1, "a %s", ("x",), logging.WARNING)
        lim.dropped("expired", 2, "a %s", ("x",), logging.WARNING)  # same text, other reason
        lim.dropped("full", 1, "b %s", ("y",), logging.INFO)
    assert h.text == ["a x", "a x", "b y"]
    assert lim.flush(force=True) == 3
    assert sorted(h.text[3:]) == [
        "hybrid_layer: 2 more full drops in the last 0 s (last: a x)",
        "hybrid_layer: 2 more full drops in the last 0 s (last: b y)",
        "hybrid_layer: 4 more expired drops in the last 0 s (last: a x)",
    ]
    assert [r.levelno for r in h.records[3:]].count(logging.INFO) == 1


def test_after_a_quiet_interval_the_next_drop_is_logged_at_once() -> None:
    lim, h = limiter(0.05)
    lim.dropped("expired", 1, "m %d", (1,), logging.WARNING)
    time.sleep(0.06)
    lim.dropped("expired", 1, "m %d", (2,), logging.WARNING)
    assert h.text == ["m 1", "m 2"] and lim.flush(force=True) == 0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 5), st.booleans()), max_size=60))
def test_every_drop_is_accounted_for_exactly(events: list[tuple[int, int, bool]]) -> None:
    """Whatever the interleaving of drops and flushes: first lines plus summaries add
    up to exactly the number of drops, once everything is flushed."""
    lim, h = limiter(0.0005)
    total = 0
    for site, n, flush in events:
        lim.dropped("full", n, f"site{site} %d", (n,), logging.WARNING)
        total += n
        if flush:
            lim.flush()
    lim.flush(force=True)
    # a first line counts 1 drop of its event; its other n-1 are not in it: count events
    firsts = [t for t in h.text if not re.match(r"hybrid_layer: \d+ more ", t)]
    n_of_first = sum(int(t.split()[1]) for t in firsts)
    assert n_of_first + summed([t for t in h.text if t not in firsts]) == total


def test_counters_drop_counts_every_reason_and_rejects_an_unknown_one() -> None:
    c = Counters()
    for r in DROP_REASONS:
        c.drop(r, 2, "hybrid_layer: test drop %s", r)
    assert all(v == 2 for k, v in c.as_dict().items() if k.startswith("dropped_"))
    with pytest.raises(KeyError):
        c.drop("nonsense", 1, "x")


def test_a_summary_of_one_key_with_two_texts_is_written_with_the_last(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two log sites that share a key but not a text (and not the same arguments): the
    summary says the last one, formatted, instead of failing to format."""
    import logging

    from hybrid_layer._log import RateLimited

    rl = RateLimited(interval=60.0)
    caplog.set_level(logging.WARNING, logger="hybrid_layer")
    rl.warning("k", "hybrid_layer: first %d %r", 1, "a")
    rl.warning("k", "hybrid_layer: second %s", "b")
    assert rl.flush(force=True) == 1
    texts = [r.getMessage() for r in caplog.records]
    assert texts[-1] == "hybrid_layer: 1 more similar in the last 0 s (last: second b)", texts
