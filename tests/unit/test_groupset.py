"""Unit and property tests for the single-writer hash set (``hybrid_layer.shm.groupset``)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from hybrid_layer.shm import layout as L
from hybrid_layer.shm.groupset import (
    EMPTY,
    TAG_GROUP,
    TAG_NORMAL,
    TAG_OTHER,
    TAG_PARKED,
    TOMBSTONE,
    GroupSet,
    name_hash,
)

CTRL_BYTES = 256


def make_set(slots: int = 16) -> tuple[GroupSet, bytearray, bytearray]:
    ctrl = bytearray(CTRL_BYTES)
    table = bytearray(slots * 8)
    return GroupSet(memoryview(ctrl), memoryview(table)), ctrl, table


def seq(ctrl: bytearray) -> int:
    return int(L.U64.unpack_from(ctrl, L.CTRL_GROUP_SEQ)[0])


def colliding(slots: int, n: int, low: int = 3) -> list[int]:
    """``n`` distinct hashes that all start probing at index ``low`` (bits 2 and up)."""
    return [((low + slots * (k + 1)) << 2) | 2 for k in range(n)]


# ====================================================================== name_hash
class TestNameHash:
    def test_stable_and_never_reserved(self) -> None:
        h = name_hash("g", "chat")
        assert h == name_hash("g", "chat")
        assert h > TOMBSTONE
        assert h < 2**64

    def test_kind_separates_namespaces(self) -> None:
        assert name_hash("g", "x") != name_hash("n", "x")
        # the separator keeps ("ab", "c") and ("a", "bc") apart
        assert name_hash("ab", "c") != name_hash("a", "bc")

    def test_known_value(self) -> None:
        """Stable across processes and releases: hosts on two versions must agree."""
        import hashlib

        expected = int.from_bytes(hashlib.blake2b(b"g\x00room-1", digest_size=8).digest(), "little")
        expected &= ~3  # tag 0: a group
        assert name_hash("g", "room-1") == (expected if expected > 1 else expected + 4)

    @settings(max_examples=60, deadline=None)
    @given(name=st.text(max_size=100))
    def test_tags(self, name: str) -> None:
        """The leader tells groups from normal channels by the low two bits alone."""
        assert name_hash("g", name) & 3 == TAG_GROUP
        assert name_hash("n", name) & 3 == TAG_NORMAL
        assert name_hash("p", name) & 3 == TAG_PARKED
        assert name_hash("f", name) & 3 == TAG_OTHER

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(kind=st.sampled_from(["g", "n"]), name=st.text(max_size=100))
    def test_range(self, kind: str, name: str) -> None:
        h = name_hash(kind, name)
        assert TOMBSTONE < h < 2**64


# ====================================================================== unit
class TestConstruction:
    @pytest.mark.parametrize("slots", [0, 1, 2, 3, 5, 6, 12, 100])
    def test_rejects_non_power_of_two(self, slots: int) -> None:
        with pytest.raises(ValueError, match="power of two"):
            GroupSet(memoryview(bytearray(CTRL_BYTES)), memoryview(bytearray(slots * 8)))

    @pytest.mark.parametrize("slots", [4, 8, 1024])
    def test_accepts_powers_of_two(self, slots: int) -> None:
        gs, _, _ = make_set(slots)
        assert gs.slots == slots
        assert gs.used == 0
        assert gs.live() == []


class TestBasics:
    def test_add_contains_discard(self) -> None:
        gs, ctrl, _ = make_set()
        a, b = name_hash("g", "a"), name_hash("g", "b")
        assert not gs.maybe_contains(a)
        gs.add(a)
        assert gs.maybe_contains(a)
        assert not gs.maybe_contains(b)
        assert gs.live() == [a]
        assert gs.used == 1
        gs.add(a)  # idempotent
        assert gs.live() == [a]
        assert gs.used == 1
        gs.discard(a)
        assert not gs.maybe_contains(a)
        assert gs.live() == []
        assert gs.used == 1  # a tombstone still occupies the slot
        gs.discard(a)  # discarding an absent hash is a no-op
        gs.discard(b)
        assert gs.used == 1
        assert seq(ctrl) == 0  # no rebuild needed for any of that

    def test_tombstone_is_reused(self) -> None:
        gs, _, table = make_set(8)
        a, b = colliding(8, 2)
        gs.add(a)
        gs.discard(a)
        gs.add(b)
        assert gs.used == 1
        assert L.U64.unpack_from(table, 3 * 8)[0] == b

    def test_probe_chain_survives_discard_in_the_middle(self) -> None:
        gs, _, _ = make_set(16)
        chain = colliding(16, 5, low=14)  # wraps around the end of the table
        for h in chain:
            gs.add(h)
        gs.discard(chain[1])
        gs.discard(chain[3])
        for h in (chain[0], chain[2], chain[4]):
            assert gs.maybe_contains(h), "a tombstone must not cut a probe chain"
        assert not gs.maybe_contains(chain[1])
        assert sorted(gs.live()) == sorted([chain[0], chain[2], chain[4]])
        gs.add(chain[3])
        assert gs.maybe_contains(chain[3])
        assert len(gs.live()) == 4

    def test_clear(self) -> None:
        gs, ctrl, table = make_set(16)
        hs = [name_hash("g", str(i)) for i in range(8)]
        for h in hs:
            gs.add(h)
        gs.discard(hs[0])
        s0 = seq(ctrl)
        gs.clear()
        assert gs.live() == []
        assert gs.used == 0
        assert bytes(table) == bytes(len(table))
        assert seq(ctrl) == s0 + 2  # bracketed: odd during, even after
        for h in hs:
            assert not gs.maybe_contains(h)
        gs.add(hs[3])
        assert gs.live() == [hs[3]]

    def test_snapshot_is_none_while_a_rebuild_is_in_progress(self) -> None:
        gs, _, _ = make_set(16)
        gs.add(2 + 4 * 5)
        before = gs.changes
        gs.add(2 + 4 * 6)
        assert gs.changes == before + 1
        gs._bump()  # the owner is mid-rebuild
        assert gs.snapshot() is None
        gs._bump()
        assert gs.snapshot() == {2 + 4 * 5, 2 + 4 * 6}

    def test_reader_answers_maybe_while_a_rebuild_is_in_progress(self) -> None:
        gs, ctrl, _ = make_set(16)
        h = name_hash("g", "x")
        assert not gs.maybe_contains(h)
        L.U64.pack_into(ctrl, L.CTRL_GROUP_SEQ, seq(ctrl) + 1)  # writer mid-rebuild
        assert gs.maybe_contains(h)
        assert gs.maybe_contains(name_hash("g", "anything else"))
        L.U64.pack_into(ctrl, L.CTRL_GROUP_SEQ, seq(ctrl) + 1)
        assert not gs.maybe_contains(h)

    def test_reader_sees_table_through_shared_buffers(self) -> None:
        """A second GroupSet over the same buffers (another process) sees the owner's state."""
        gs, ctrl, table = make_set(16)
        reader = GroupSet(memoryview(ctrl), memoryview(table))
        h = name_hash("g", "shared")
        gs.add(h)
        assert reader.maybe_contains(h)
        gs.discard(h)
        assert not reader.maybe_contains(h)


class TestRebuild:
    def test_churn_triggers_rebuild_and_keeps_members(self) -> None:
        gs, ctrl, _ = make_set(8)
        keep = name_hash("g", "keeper")
        gs.add(keep)
        rebuilds = 0
        for i in range(40):
            h = name_hash("g", f"churn{i}")
            before = seq(ctrl)
            gs.add(h)
            if seq(ctrl) != before:
                rebuilds += 1
                assert seq(ctrl) == before + 2
            assert gs.maybe_contains(keep)
            assert gs.maybe_contains(h)
            gs.discard(h)
            assert gs.used * 2 <= gs.slots
        assert rebuilds >= 5
        assert gs.live() == [keep]

    def test_rebuild_drops_tombstones(self) -> None:
        gs, _, table = make_set(8)
        hs = colliding(8, 4)
        for h in hs:
            gs.add(h)
        for h in hs[:3]:
            gs.discard(h)
        assert gs.used == 4
        new = colliding(8, 5)[4]
        gs.add(new)  # used would exceed half: rebuild with the two live hashes
        assert gs.used == 2
        raw = [L.U64.unpack_from(table, i * 8)[0] for i in range(8)]
        assert TOMBSTONE not in raw
        assert sorted(v for v in raw if v != EMPTY) == sorted([hs[3], new])


class TestOverflow:
    @pytest.mark.parametrize("slots", [4, 8, 64])
    def test_overflow_message_and_state_kept(self, slots: int) -> None:
        gs, ctrl, table = make_set(slots)
        members = [name_hash("g", f"m{i}") for i in range(slots // 2)]
        for h in members:
            gs.add(h)
        snapshot = bytes(ctrl), bytes(table)
        extra = name_hash("g", "one too many")
        with pytest.raises(OverflowError) as info:
            gs.add(extra)
        text = str(info.value)
        assert str(slots // 2) in text
        assert "max_groups_per_process" in text
        assert (bytes(ctrl), bytes(table)) == snapshot, "a refused add must change nothing"
        assert sorted(gs.live()) == sorted(members)
        assert not gs.maybe_contains(extra)
        gs.add(members[0])  # re-adding a member is still fine when full
        gs.discard(members[0])
        gs.add(extra)  # and there is room again after a discard
        assert gs.maybe_contains(extra)


# ====================================================================== property: set model
def _hash_pool() -> st.SearchStrategy[int]:
    # few distinct values with shared low bits, so probe chains, tombstones and rebuilds
    # happen all the time; plus the occasional arbitrary 64-bit hash
    clustered = st.builds(lambda low, k: low + 64 * k, st.integers(2, 5), st.integers(0, 6))
    return st.one_of(clustered, st.integers(min_value=2, max_value=2**64 - 1))


class GroupSetVsSet(RuleBasedStateMachine):
    hashes = Bundle("hashes")

    def __init__(self) -> None:
        super().__init__()
        self.model: set[int] = set()
        self.rebuilds = 0

    @initialize(slots=st.sampled_from([4, 8, 16, 32]))
    def setup(self, slots: int) -> None:
        self.gs, self.ctrl, self.table = make_set(slots)
        self.reader = GroupSet(memoryview(self.ctrl), memoryview(self.table))

    @rule(target=hashes, h=_hash_pool())
    def new_hash(self, h: int) -> int:
        return h

    @rule(h=hashes)
    def add(self, h: int) -> None:
        before = seq(self.ctrl)
        if h not in self.model and len(self.model) == self.gs.slots // 2:
            snapshot = bytes(self.ctrl), bytes(self.table)
            with pytest.raises(OverflowError):
                self.gs.add(h)
            assert (bytes(self.ctrl), bytes(self.table)) == snapshot
            return
        self.gs.add(h)
        self.model.add(h)
        if seq(self.ctrl) != before:
            self.rebuilds += 1

    @rule(h=hashes)
    def discard(self, h: int) -> None:
        before = self.reader.changes
        self.gs.discard(h)
        # a reader that caches a snapshot re-reads when ``changes`` moves
        assert (self.reader.changes != before) == (h in self.model)
        self.model.discard(h)

    @rule(h=hashes)
    def churn(self, h: int) -> None:
        """Add then discard (a consumer joining and leaving): builds up tombstones."""
        if h in self.model or len(self.model) < self.gs.slots // 2:
            was = h in self.model
            self.gs.add(h)
            self.gs.discard(h)
            if was:
                self.model.discard(h)

    @rule()
    def clear(self) -> None:
        self.gs.clear()
        self.model.clear()

    @invariant()
    def matches_model(self) -> None:
        gs = self.gs
        assert sorted(gs.live()) == sorted(self.model)
        for h in self.model:  # never a false negative, for the owner or another reader
            assert gs.maybe_contains(h)
            assert self.reader.maybe_contains(h)
        assert seq(self.ctrl) % 2 == 0
        assert self.reader.snapshot() == self.model  # quiescent: exact
        assert len(self.model) <= gs.used <= gs.slots // 2  # always an empty slot left

    def teardown(self) -> None:
        # quiescent single-threaded answers are exact: no false positives either
        for i in range(0, 8):
            h = 2 + 64 * i
            assert self.gs.maybe_contains(h) == (h in self.model)


GroupSetVsSet.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestGroupSetVsSet = GroupSetVsSet.TestCase


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    slots=st.sampled_from([8, 16, 64]),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 40)), min_size=1, max_size=300),
)
def test_random_add_discard_sequences(slots: int, ops: list[tuple[bool, int]]) -> None:
    """A flat property over long sequences with names hashed by ``name_hash``."""
    gs, ctrl, _ = make_set(slots)
    model: set[int] = set()
    for is_add, n in ops:
        h = name_hash("g", f"group-{n}")
        if is_add:
            if h not in model and len(model) == slots // 2:
                with pytest.raises(OverflowError):
                    gs.add(h)
                continue
            gs.add(h)
            model.add(h)
        else:
            gs.discard(h)
            model.discard(h)
        assert all(gs.maybe_contains(m) for m in model)
    assert sorted(gs.live()) == sorted(model)
    assert seq(ctrl) % 2 == 0
