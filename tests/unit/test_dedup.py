"""The host-queue dedupe table (pure): ids, marks, per-publisher high-water marks."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hybrid_layer.amqp.dedup import DedupTable, mark, message_id, parse_message_id


def table(entries: int = 4) -> tuple[DedupTable, memoryview]:
    words = memoryview(bytearray(8 * (10 + 3 * entries))).cast("Q")
    return DedupTable(words, 10, entries), words


def test_message_id_round_trips_and_foreign_ids_are_none() -> None:
    assert parse_message_id(message_id(0xABC, 42)) == (0xABC, 42)
    for foreign in (None, "", "1", "abc.1", "0000000000000000.1", "zzzzzzzzzzzzzzzz.1", "x" * 60):
        assert parse_message_id(foreign) is None
    assert parse_message_id("00000000000000ff.٣") is None  # a Unicode digit is no seq


def test_marks_order_batches_within_a_message_and_messages() -> None:
    assert mark(1, 0) < mark(1, 1023) < mark(2, 0)


@given(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 50), st.integers(0, 3)), max_size=200))
def test_each_frame_is_delivered_at_most_once(arrivals: list[tuple[int, int, int]]) -> None:
    """Whatever order and repetition frames arrive in (redeliveries, republishes), a
    frame passes at most once, and a frame newer than all before it always passes."""
    t, _ = table()
    passed: set[tuple[int, int, int]] = set()
    best: dict[int, int] = {}
    for nonce, seq, frame in arrivals:
        e = t.entry(nonce)
        m = mark(seq, frame)
        fresh = m > best.get(nonce, 0)
        if not t.seen(e, m):
            assert (nonce, seq, frame) not in passed
            passed.add((nonce, seq, frame))
            t.record(e, m)
            best[nonce] = max(best.get(nonce, 0), m)
        else:
            assert not fresh


def test_a_new_leader_reads_the_table_its_predecessor_left() -> None:
    t, words = table()
    e = t.entry(7)
    t.record(e, mark(5, 0))
    successor = DedupTable(words, 10, 4)  # the same shared words, another process
    e2 = successor.entry(7)
    assert successor.seen(e2, mark(5, 0)) and not successor.seen(e2, mark(6, 0))


def test_the_least_recently_used_publisher_is_evicted() -> None:
    t, _ = table(entries=2)
    t.entry(1)
    t.entry(2)
    t.entry(1)  # 2 is now the oldest
    t.entry(3)
    assert set(t.index) == {1, 3}


def test_own_publishers_are_remembered_across_leaders_and_never_look_old() -> None:
    t, words = table(4)
    t.claim_own(11)
    e = t.entry(11)
    assert t.is_own(e)
    t.record(e, mark(3, 0))
    assert not t.is_own(t.entry(22))  # another host's publisher
    # a new leader (reading the same words) knows its predecessor's nonce as this host's
    t2 = DedupTable(words, 10, 4)
    assert t2.is_own(t2.entry(11)) and t2.seen(t2.entry(11), mark(3, 0))
    # the OWN bit does not make the entry look recently used forever: it is evicted
    for n in (33, 44, 55):  # (55 evicts 22, the least recently used)
        t2.entry(n)
    t2.entry(66)  # evicts the least recently used: 11
    assert 11 not in t2.index
    assert not t2.is_own(t2.entry(11))  # (a new entry for it is not own)
