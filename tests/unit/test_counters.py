"""``Counters`` declares one typed attribute per ``STATS_FIELDS`` entry (for mypy)."""

from __future__ import annotations

from hybrid_layer.shm.layout import STATS_FIELDS
from hybrid_layer.stats import Counters


def test_counters_annotations_are_the_stats_fields_in_order() -> None:
    assert tuple(Counters.__annotations__) == STATS_FIELDS
    assert Counters.__slots__ == STATS_FIELDS
    c = Counters()
    assert all(getattr(c, f) == 0 for f in STATS_FIELDS)
    assert not hasattr(c, "__dict__")
