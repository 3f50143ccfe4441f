"""Unit and property tests for the pure MPSC byte ring (``hybrid_layer.shm.ring``).

Plain ``bytearray`` buffers only: no shared memory, no processes, no sleeps.
"""

from __future__ import annotations

import math
import struct
from collections import deque

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from hybrid_layer.shm import layout as L
from hybrid_layer.shm.ring import BadRecord, Record, Ring, RingCorrupt, record_size

CTRL_BYTES = 256
U64_MAX = 2**64 - 1


def make_ring(size: int = 256, start: int = 0) -> tuple[Ring, bytearray, bytearray]:
    """A ring over fresh bytearrays; ``start`` is the initial (aligned) head = tail."""
    ctrl = bytearray(CTRL_BYTES)
    data = bytearray(size)
    L.U64.pack_into(ctrl, L.CTRL_HEAD, start)
    L.U64.pack_into(ctrl, L.CTRL_TAIL, start)
    return Ring(memoryview(ctrl), memoryview(data)), ctrl, data


def set_positions(ctrl: bytearray, head: int, tail: int) -> None:
    L.U64.pack_into(ctrl, L.CTRL_HEAD, head)
    L.U64.pack_into(ctrl, L.CTRL_TAIL, tail)


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


# ====================================================================== basics
class TestConstruction:
    @pytest.mark.parametrize("size", [0, 16, 48, 63, 65, 100, 72])
    def test_rejects_bad_data_sizes(self, size: int) -> None:
        with pytest.raises(ValueError, match="multiple of 16"):
            Ring(memoryview(bytearray(CTRL_BYTES)), memoryview(bytearray(size)))

    @pytest.mark.parametrize("size", [64, 80, 4096])
    def test_accepts_multiples_of_16(self, size: int) -> None:
        ring, _, _ = make_ring(size)
        assert ring.size == size
        assert ring.used() == 0
        assert ring.free() == size

    def test_empty_ring_reads_none(self) -> None:
        ring, ctrl, _ = make_ring()
        before = bytes(ctrl)
        assert ring.try_read() is None
        assert bytes(ctrl) == before

    def test_record_size(self) -> None:
        assert record_size(0, 0) == 16
        assert record_size(1, 0) == 32
        assert record_size(10, 6) == 32
        assert record_size(10, 7) == 48
        for n in range(0, 100):
            assert record_size(n, 3) % L.ALIGN == 0
            assert record_size(n, 3) >= L.RECORD.size + n + 3


class TestRoundTrip:
    def test_single_record(self) -> None:
        ring, _, _ = make_ring()
        assert ring.try_write(L.KIND_DIRECT, b"chan!x", 12.5, b"hello") >= 0
        assert ring.used() == record_size(6, 5)
        rec = ring.try_read()
        assert isinstance(rec, Record)
        assert rec.kind == L.KIND_DIRECT
        assert rec.name == "chan!x"
        assert rec.expires_at == 12.5
        assert rec.name_len == 6
        assert rec.body == b"chan!xhello"
        assert bytes(rec.message) == b"hello"
        assert ring.used() == 0
        assert ring.head == ring.tail == record_size(6, 5)
        assert ring.try_read() is None

    @pytest.mark.parametrize("kind", sorted(L.KINDS))
    def test_every_kind(self, kind: int) -> None:
        ring, _, _ = make_ring()
        assert ring.try_write(kind, b"n", 0.0, b"m") >= 0
        rec = ring.try_read()
        assert rec is not None
        assert rec.kind == kind

    def test_empty_name_and_message(self) -> None:
        ring, _, _ = make_ring(64)
        assert ring.try_write(L.KIND_CONTROL, b"", 1.0, b"") >= 0
        assert ring.used() == 16
        rec = ring.try_read()
        assert rec == Record(L.KIND_CONTROL, "", 1.0, b"", 0)
        assert bytes(rec.message) == b""

    def test_memoryview_message(self) -> None:
        ring, _, _ = make_ring()
        src = bytearray(b"xxpayloadxx")
        assert ring.try_write(L.KIND_NORMAL, b"q", 3.0, memoryview(src)[2:9]) >= 0
        src[:] = b"-" * len(src)  # the ring copied it
        rec = ring.try_read()
        assert rec is not None
        assert bytes(rec.message) == b"payload"

    def test_body_is_a_copy(self) -> None:
        """A record read out does not alias the ring: later writes cannot change it."""
        ring, _, data = make_ring(64)
        assert ring.try_write(L.KIND_DIRECT, b"a", 0.0, b"first") >= 0
        rec = ring.try_read()
        assert rec is not None
        data[:] = b"\xff" * len(data)
        assert rec.body == b"afirst"
        assert bytes(rec.message) == b"first"

    @pytest.mark.parametrize("expires_at", [0.0, -1.5, 1e300, math.inf, 123456.789, 5e-324])
    def test_expiry_is_exact(self, expires_at: float) -> None:
        ring, _, _ = make_ring()
        assert ring.try_write(L.KIND_DIRECT, b"n", expires_at, b"m") >= 0
        rec = ring.try_read()
        assert rec is not None
        assert rec.expires_at == expires_at

    def test_nan_expiry_survives(self) -> None:
        ring, _, _ = make_ring()
        assert ring.try_write(L.KIND_DIRECT, b"n", math.nan, b"m") >= 0
        rec = ring.try_read()
        assert rec is not None
        assert math.isnan(rec.expires_at)

    def test_longest_name(self) -> None:
        ring, _, _ = make_ring(8192)
        name = b"n" * L.NAME_MAX
        assert ring.try_write(L.KIND_GROUP, name, 0.0, b"body") >= 0
        rec = ring.try_read()
        assert rec is not None
        assert rec.name == "n" * L.NAME_MAX
        assert bytes(rec.message) == b"body"

    @pytest.mark.parametrize(
        "name",
        [
            "chat_\u0663",  # ARABIC-INDIC DIGIT THREE: channels' \d accepts it
            "jobs\u0663",
            "specific\u0663.h.1.1!0.abc",
            "\U0001d7d8" * 99,  # a 4-byte digit: the longest valid name, 396 bytes
        ],
    )
    def test_unicode_names_round_trip(self, name: str) -> None:
        """Names are UTF-8 (issue 12: an ASCII decode made the reader reset the inbox)."""
        ring, _, _ = make_ring(2048)
        for kind in (L.KIND_GROUP, L.KIND_NORMAL, L.KIND_DIRECT):
            assert ring.try_write(kind, name.encode(), 1.0, b"body") >= 0
            rec = ring.try_read()
            assert rec is not None
            assert (rec.kind, rec.name, bytes(rec.message)) == (kind, name, b"body")
            assert rec.name_len == len(name.encode())

    def test_name_longer_than_header_field_is_refused_without_publishing(self) -> None:
        """The header stores the name length in 12 bits; a longer name cannot be
        framed. The writer raises ValueError and publishes nothing."""
        ring, ctrl, _ = make_ring(8192)
        before = bytes(ctrl)
        with pytest.raises(ValueError, match="name"):
            ring.try_write(L.KIND_GROUP, b"n" * (L.NAME_MAX + 1), 0.0, b"body")
        assert bytes(ctrl) == before
        assert ring.try_read() is None


class TestFifoAndFull:
    def test_fifo_order(self) -> None:
        ring, _, _ = make_ring(1024)
        sent = [(f"c{i}".encode(), pattern(i, i)) for i in range(20)]
        for name, msg in sent:
            assert ring.try_write(L.KIND_DIRECT, name, float(len(msg)), msg) >= 0
        got = []
        while (rec := ring.try_read()) is not None:
            got.append((rec.name.encode(), bytes(rec.message)))
        assert got == sent

    def test_full_detection_and_exact_fit(self) -> None:
        ring, ctrl, data = make_ring(128)
        # 16 + align(4 + 12) = 32 bytes each: exactly four fit
        for i in range(4):
            assert ring.try_write(L.KIND_DIRECT, b"name", float(i), pattern(12, i)) >= 0
        assert ring.used() == 128
        assert ring.free() == 0
        ctrl_before, data_before = bytes(ctrl), bytes(data)
        assert ring.try_write(L.KIND_DIRECT, b"", 0.0, b"") == -1  # even the smallest
        assert (bytes(ctrl), bytes(data)) == (ctrl_before, data_before)
        # consuming one frees exactly one slot's worth
        rec = ring.try_read()
        assert rec is not None
        assert rec.expires_at == 0.0
        assert ring.free() == 32
        assert ring.try_write(L.KIND_DIRECT, b"name", 9.0, pattern(13)) == -1  # 48 > 32
        assert ring.try_write(L.KIND_DIRECT, b"name", 9.0, pattern(12, 9)) >= 0
        assert [r.expires_at for r in iter(ring.try_read, None)] == [1.0, 2.0, 3.0, 9.0]

    def test_refused_write_does_not_touch_data(self) -> None:
        ring, ctrl, data = make_ring(64)
        assert ring.try_write(L.KIND_DIRECT, b"a", 0.0, b"b" * 20) >= 0  # 16 + 32 = 48
        snapshot = bytes(ctrl), bytes(data)
        assert ring.try_write(L.KIND_DIRECT, b"a", 0.0, b"b") == -1  # needs 32, 16 free
        assert (bytes(ctrl), bytes(data)) == snapshot


class TestWraparound:
    @pytest.mark.parametrize("start", [0, 16, 32, 48, 64, 96, 112])
    @pytest.mark.parametrize("body_len", [0, 1, 15, 16, 17, 47, 48, 95, 112])
    def test_record_straddling_the_end(self, start: int, body_len: int) -> None:
        size = 128
        ring, _, _ = make_ring(size, start=start + 10 * size)  # positions do not start at 0
        name = b"grp"[: min(3, body_len)]
        msg = pattern(body_len - len(name), start)
        need = record_size(len(name), len(msg))
        assert (ring.try_write(L.KIND_GROUP, name, 1.0, msg) >= 0) == (need <= size)
        if need > size:
            return
        rec = ring.try_read()
        assert rec is not None
        assert rec.name == name.decode()
        assert bytes(rec.message) == msg
        assert ring.head == ring.tail == start + 10 * size + need

    def test_body_wraps_bytes_land_at_the_front(self) -> None:
        ring, _, data = make_ring(64, start=32)
        msg = bytes(range(1, 41))  # header at 32..48, body 48..64 then 0..24
        assert ring.try_write(L.KIND_DIRECT, b"", 0.0, msg) >= 0
        assert bytes(data[48:64]) == msg[:16]
        assert bytes(data[0:24]) == msg[16:]
        rec = ring.try_read()
        assert rec is not None
        assert bytes(rec.message) == msg

    def test_name_wraps(self) -> None:
        ring, _, _ = make_ring(64, start=48)
        name = b"abcdefghijklmnopqrstu"  # header 48..64, the whole name at the front
        assert ring.try_write(L.KIND_DIRECT, name, 0.0, b"zz") >= 0
        ring2, _, _ = make_ring(64, start=32)
        # header 32..48; name 48..64 then 0..5
        assert ring2.try_write(L.KIND_DIRECT, name, 0.0, b"zz") >= 0
        for r in (ring, ring2):
            rec = r.try_read()
            assert rec is not None
            assert rec.name == name.decode()
            assert bytes(rec.message) == b"zz"

    def test_many_laps(self) -> None:
        ring, _, _ = make_ring(80)
        for i in range(500):
            msg = pattern(i % 50, i)
            assert ring.try_write(L.KIND_DIRECT, b"c", float(i), msg) >= 0
            rec = ring.try_read()
            assert rec is not None
            assert (rec.expires_at, bytes(rec.message)) == (float(i), msg)
        assert ring.head == ring.tail > 80 * 50
        assert ring.used() == 0

    @pytest.mark.parametrize("start", range(0, 256, 16))
    def test_record_as_large_as_the_ring(self, start: int) -> None:
        size = 256
        ring, _, _ = make_ring(size, start=start)
        name = b"specific.h.1.2!3.abc"
        msg = pattern(size - L.RECORD.size - len(name), start)
        assert record_size(len(name), len(msg)) == size
        assert ring.try_write(L.KIND_DIRECT, name, 2.0, msg) >= 0
        assert ring.free() == 0
        assert ring.try_write(L.KIND_DIRECT, b"", 0.0, b"") == -1
        rec = ring.try_read()
        assert rec is not None
        assert rec.name == name.decode()
        assert bytes(rec.message) == msg
        # one byte more than the ring can ever hold: refused even when empty
        assert ring.try_write(L.KIND_DIRECT, name, 2.0, msg + b"x") == -1
        assert ring.used() == 0

    def test_large_record_behind_a_small_one(self) -> None:
        ring, _, _ = make_ring(4096)
        assert ring.try_write(L.KIND_DIRECT, b"a", 0.0, b"x") >= 0  # 32 bytes
        big = pattern(4096 - 32 - 16 - 1, 5)
        assert ring.try_write(L.KIND_DIRECT, b"b", 0.0, big) >= 0  # exactly the rest
        assert ring.free() == 0
        assert ring.try_read() is not None
        assert ring.try_write(L.KIND_DIRECT, b"c", 0.0, b"y" * 15) >= 0  # the freed 32 bytes
        rec = ring.try_read()
        assert rec is not None
        assert bytes(rec.message) == big
        rec = ring.try_read()
        assert rec is not None
        assert (rec.name, bytes(rec.message)) == ("c", b"y" * 15)


class TestReset:
    def test_reset_drops_unread(self) -> None:
        ring, _, _ = make_ring(256, start=64)
        for i in range(3):
            assert ring.try_write(L.KIND_DIRECT, b"c", float(i), b"m" * i) >= 0
        used = ring.used()
        assert ring.reset() == used
        assert ring.used() == 0
        assert ring.head == ring.tail == 64 + used
        assert ring.try_read() is None
        assert ring.reset() == 0

    def test_reset_recovers_from_corruption(self) -> None:
        ring, _, data = make_ring(128)
        assert ring.try_write(L.KIND_DIRECT, b"c", 0.0, b"m") >= 0
        data[0:16] = b"\xee" * 16  # smash the header
        with pytest.raises(RingCorrupt):
            ring.try_read()
        with pytest.raises(RingCorrupt):  # stays corrupt: head did not move
            ring.try_read()
        assert ring.reset() == 32
        assert ring.try_read() is None
        assert ring.try_write(L.KIND_DIRECT, b"d", 1.0, b"after") >= 0
        rec = ring.try_read()
        assert rec is not None
        assert (rec.name, bytes(rec.message)) == ("d", b"after")

    def test_reset_recovers_from_impossible_positions(self) -> None:
        ring, ctrl, _ = make_ring(128)
        set_positions(ctrl, 1000, 64)  # tail behind head
        with pytest.raises(RingCorrupt):
            ring.try_read()
        # reset moves head to tail; the ring is usable again from there
        ring.reset()
        assert ring.used() == 0
        assert ring.try_write(L.KIND_NORMAL, b"q", 0.0, b"ok") >= 0
        rec = ring.try_read()
        assert rec is not None
        assert bytes(rec.message) == b"ok"


class TestCorruptionDetected:
    def _one(self, size: int = 128) -> tuple[Ring, bytearray, bytearray]:
        ring, ctrl, data = make_ring(size)
        assert ring.try_write(L.KIND_DIRECT, b"name", 0.0, b"message") >= 0
        return ring, ctrl, data

    def _assert_corrupt_and_unchanged(self, ring: Ring, ctrl: bytearray) -> None:
        before = bytes(ctrl)
        with pytest.raises(RingCorrupt):
            ring.try_read()
        assert bytes(ctrl) == before

    def test_bad_magic(self) -> None:
        ring, ctrl, data = self._one()
        data[4:6] = b"\x00\x00"
        self._assert_corrupt_and_unchanged(ring, ctrl)

    def _assert_skipped(self, ring: Ring) -> None:
        head = ring.head
        with pytest.raises(BadRecord):
            ring.try_read()
        assert ring.head == head + 32  # exactly that record consumed
        assert ring.try_read() is None

    @pytest.mark.parametrize("kind", [0, 8, 15])
    def test_unknown_kind_skips_the_record(self, kind: int) -> None:
        ring, _, data = self._one()
        struct.pack_into("<H", data, 6, 4 << L.KIND_BITS | kind)
        self._assert_skipped(ring)

    def test_name_longer_than_body_skips_the_record(self) -> None:
        ring, _, data = self._one()
        struct.pack_into("<H", data, 6, 12 << L.KIND_BITS | L.KIND_DIRECT)  # body is 11
        self._assert_skipped(ring)

    def test_body_longer_than_published(self) -> None:
        ring, ctrl, data = self._one()
        struct.pack_into("<I", data, 0, 17)  # needs 48 bytes, 32 published
        self._assert_corrupt_and_unchanged(ring, ctrl)

    def test_huge_body_len(self) -> None:
        ring, ctrl, data = self._one()
        struct.pack_into("<I", data, 0, 0xFFFFFFFF)
        self._assert_corrupt_and_unchanged(ring, ctrl)

    def test_non_utf8_name_skips_the_record(self) -> None:
        ring, _, _ = make_ring(128)
        assert ring.try_write(L.KIND_DIRECT, b"\xff\xfe", 0.0, b"m") >= 0
        self._assert_skipped(ring)

    @pytest.mark.parametrize(
        ("head", "tail"),
        [
            (0, 8),  # less than a header published
            (0, 129),  # more than the ring published
            (8, 40),  # head not aligned
            (100, 50),  # tail behind head
            (U64_MAX, 0),
            (0, U64_MAX),
        ],
    )
    def test_impossible_positions(self, head: int, tail: int) -> None:
        ring, ctrl, _ = self._one()
        set_positions(ctrl, head, tail)
        self._assert_corrupt_and_unchanged(ring, ctrl)


class TestBadRecordBetweenGoodOnes:
    """Issue 12: one bad record costs that record only, never its neighbours."""

    @pytest.mark.parametrize(
        "damage",
        [
            lambda data, off: data.__setitem__(slice(off + 16, off + 18), b"\xff\xfe"),
            lambda data, off: struct.pack_into("<H", data, off + 6, 0 << L.KIND_BITS | 9),
            lambda data, off: struct.pack_into("<H", data, off + 6, 200 << L.KIND_BITS | 1),
        ],
        ids=["name-not-utf8", "unknown-kind", "name-past-body"],
    )
    @pytest.mark.parametrize("start", [0, 64, 224])  # 224: records wrap the 256-byte end
    def test_both_neighbours_read(self, damage, start: int) -> None:  # type: ignore[no-untyped-def]
        ring, _, data = make_ring(256, start=start)
        assert ring.try_write(L.KIND_GROUP, "chat_\u0663".encode(), 1.0, b"before") >= 0
        bad_at = ring.tail % ring.size
        assert ring.try_write(L.KIND_DIRECT, b"xx", 2.0, b"bad") >= 0
        assert ring.try_write(L.KIND_NORMAL, "jobs\u0663".encode(), 3.0, b"after") >= 0
        damage(data, bad_at)
        first = ring.try_read()
        assert first is not None
        assert (first.name, bytes(first.message)) == ("chat_\u0663", b"before")
        with pytest.raises(BadRecord):
            ring.try_read()
        last = ring.try_read()
        assert last is not None
        assert (last.name, bytes(last.message)) == ("jobs\u0663", b"after")
        assert ring.try_read() is None


# ====================================================================== property: deque model
_names = (
    st.text(max_size=40)
    .map(lambda t: t.encode("utf-8", "surrogatepass"))
    .filter(lambda b: _utf8(b))
)


def _utf8(b: bytes) -> bool:
    try:
        b.decode()
    except UnicodeDecodeError:
        return False
    return True


_messages = st.binary(min_size=0, max_size=300)
_expiry = st.floats(allow_nan=False)


class RingVsDeque(RuleBasedStateMachine):
    """The ring against a deque of records plus a byte count (the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.model: deque[tuple[int, bytes, float, bytes]] = deque()
        self.model_used = 0
        self.start = 0

    @initialize(
        size=st.sampled_from([64, 80, 128, 256, 512, 1024]),
        start_blocks=st.integers(min_value=0, max_value=2**40),
    )
    def setup(self, size: int, start_blocks: int) -> None:
        self.start = start_blocks * L.ALIGN
        self.ring, self.ctrl, self.data = make_ring(size, start=self.start)

    @rule(
        kind=st.sampled_from(sorted(L.KINDS)),
        name=_names,
        expires_at=_expiry,
        message=_messages,
    )
    def write(self, kind: int, name: bytes, expires_at: float, message: bytes) -> None:
        need = record_size(len(name), len(message))
        fits = self.model_used + need <= self.ring.size
        ctrl_before = bytes(self.ctrl)
        assert (self.ring.try_write(kind, name, expires_at, message) >= 0) is fits
        if fits:
            self.model.append((kind, name, expires_at, message))
            self.model_used += need
        else:
            assert bytes(self.ctrl) == ctrl_before

    @rule()
    def read(self) -> None:
        rec = self.ring.try_read()
        if not self.model:
            assert rec is None
            return
        kind, name, expires_at, message = self.model.popleft()
        self.model_used -= record_size(len(name), len(message))
        assert rec is not None
        assert rec.kind == kind
        assert rec.name == name.decode()
        assert rec.name_len == len(name)
        assert rec.expires_at == expires_at
        assert bytes(rec.message) == message
        assert rec.body == name + message

    @precondition(lambda self: len(self.model) > 0)
    @rule()
    def drain(self) -> None:
        while self.model:
            self.read()
        assert self.ring.try_read() is None

    @rule()
    def reset(self) -> None:
        assert self.ring.reset() == self.model_used
        self.model.clear()
        self.model_used = 0

    @invariant()
    def positions_consistent(self) -> None:
        ring = self.ring
        assert ring.used() == self.model_used
        assert 0 <= ring.used() <= ring.size
        assert ring.free() == ring.size - self.model_used
        assert ring.head % L.ALIGN == 0
        assert ring.tail % L.ALIGN == 0
        assert ring.head >= self.start


RingVsDeque.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRingVsDeque = RingVsDeque.TestCase


# ====================================================================== fuzz invariant
def _check_read(ring: Ring, ctrl: bytearray) -> None:
    """The invariant: a Record, None, BadRecord (one record skipped, to be counted) or
    RingCorrupt (to be reset and counted); never anything else.

    Also: ``RingCorrupt`` changes nothing, and a record or a skip moves ``head`` forward
    by exactly one aligned record that lies inside the published range.
    """
    head, tail = ring.head, ring.tail
    before = bytes(ctrl)
    try:
        rec = ring.try_read()
    except RingCorrupt:
        assert bytes(ctrl) == before
        return
    except BadRecord:
        new_head = ring.head
        assert head < new_head <= tail
        assert (new_head - head) % L.ALIGN == 0
        assert new_head - head <= ring.size
        assert ring.tail == tail
        return
    if rec is None:
        assert head == tail
        assert bytes(ctrl) == before
        return
    assert isinstance(rec, Record)
    assert rec.kind in L.KINDS
    assert 0 <= rec.name_len <= len(rec.body)
    assert rec.name.encode() == rec.body[: rec.name_len]
    new_head = ring.head
    assert new_head == head + record_size(rec.name_len, len(rec.body) - rec.name_len)
    assert head < new_head <= tail
    assert new_head - head <= ring.size  # no record is larger than the ring
    assert ring.tail == tail


_sizes = st.integers(min_value=4, max_value=40).map(lambda n: n * L.ALIGN)
_fuzz_settings = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@_fuzz_settings
@given(
    size=_sizes,
    data=st.data(),
    head=st.integers(min_value=0, max_value=U64_MAX),
    tail=st.integers(min_value=0, max_value=U64_MAX),
)
def test_fuzz_arbitrary_positions_and_bytes(
    size: int, data: st.DataObject, head: int, tail: int
) -> None:
    ring, ctrl, buf = make_ring(size)
    buf[:] = data.draw(st.binary(min_size=size, max_size=size))
    set_positions(ctrl, head, tail)
    _check_read(ring, ctrl)


@_fuzz_settings
@given(
    size=_sizes,
    data=st.data(),
    head_block=st.integers(min_value=0, max_value=(U64_MAX >> 4)),
    misalign=st.one_of(st.just(0), st.integers(min_value=0, max_value=L.ALIGN - 1)),
    delta=st.integers(min_value=-64, max_value=700),
)
def test_fuzz_plausible_positions(
    size: int, data: st.DataObject, head_block: int, misalign: int, delta: int
) -> None:
    """Head (mostly aligned) with tail close to it: reaches the header checks, not just
    the position checks."""
    head = head_block * L.ALIGN + misalign
    tail = min(max(head + delta, 0), U64_MAX)
    ring, ctrl, buf = make_ring(size)
    buf[:] = data.draw(st.binary(min_size=size, max_size=size))
    set_positions(ctrl, head, tail)
    _check_read(ring, ctrl)


@_fuzz_settings
@given(
    size=_sizes,
    data=st.data(),
    head_block=st.integers(min_value=0, max_value=2**20),
    avail_blocks=st.integers(min_value=1, max_value=90),
    body_len=st.one_of(
        st.integers(min_value=0, max_value=700), st.integers(min_value=0, max_value=2**32 - 1)
    ),
    kind_name=st.integers(min_value=0, max_value=0xFFFF),
    expires_at=st.floats(),
    good_magic=st.booleans(),
)
def test_fuzz_forged_headers(
    size: int,
    data: st.DataObject,
    head_block: int,
    avail_blocks: int,
    body_len: int,
    kind_name: int,
    expires_at: float,
    good_magic: bool,
) -> None:
    """A header with the right magic (mostly) and arbitrary fields over arbitrary bytes."""
    ring, ctrl, buf = make_ring(size)
    buf[:] = data.draw(st.binary(min_size=size, max_size=size))
    head = head_block * L.ALIGN
    avail = avail_blocks * L.ALIGN  # may exceed the ring: must be refused
    magic = L.RECORD_MAGIC if good_magic else data.draw(st.integers(0, 0xFFFF))
    L.RECORD.pack_into(buf, head % size, body_len, magic, kind_name, expires_at)
    set_positions(ctrl, head, head + avail)
    _check_read(ring, ctrl)


_records = st.lists(
    st.tuples(st.sampled_from(sorted(L.KINDS)), _names, st.binary(max_size=60)),
    min_size=0,
    max_size=5,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start_block=st.integers(min_value=0, max_value=2**30),
    before=_records,
    after=_records,
    bad_name=st.binary(max_size=40),
    bad_msg=st.binary(max_size=60),
    kind_name=st.integers(min_value=0, max_value=0xFFFF),
    content=st.data(),
)
def test_fuzz_bad_record_never_costs_a_neighbour(
    start_block: int,
    before: list[tuple[int, bytes, bytes]],
    after: list[tuple[int, bytes, bytes]],
    bad_name: bytes,
    bad_msg: bytes,
    kind_name: int,
    content: st.DataObject,
) -> None:
    """Well-framed records around one whose content (kind, name length, name and
    message bytes: everything but magic and body length) is arbitrary: every neighbour
    is read intact, in order, and the bad one is a record or exactly one skip."""
    ring, _, buf = make_ring(4096, start=start_block * L.ALIGN)
    for kind, name, msg in before:
        assert ring.try_write(kind, name, 1.0, msg) >= 0
    bad_pos = ring.tail
    assert ring.try_write(L.KIND_DIRECT, bad_name, 2.0, bad_msg) >= 0
    for kind, name, msg in after:
        assert ring.try_write(kind, name, 3.0, msg) >= 0
    # rewrite the bad record's content, keeping its frame (magic, body length)
    body_len = len(bad_name) + len(bad_msg)
    struct.pack_into("<H", buf, (bad_pos + 6) % ring.size, kind_name)
    garbage = content.draw(st.binary(min_size=body_len, max_size=body_len))
    for k, b in enumerate(garbage):
        buf[(bad_pos + L.RECORD.size + k) % ring.size] = b
    got = []
    skips = 0
    for _ in range(len(before) + len(after) + 2):
        try:
            rec = ring.try_read()
        except BadRecord:
            skips += 1
            continue
        if rec is None:
            break
        got.append((rec.kind, rec.name.encode(), bytes(rec.message)))
    assert ring.try_read() is None
    want = [(k, n, m) for k, n, m in before]
    assert got[: len(want)] == want
    assert got[len(got) - len(after) :] == [(k, n, m) for k, n, m in after]
    assert skips + (len(got) - len(before) - len(after)) == 1  # the bad one: read or skipped


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=_sizes,
    start_block=st.integers(min_value=0, max_value=2**30),
    records=st.lists(st.tuples(_names, st.binary(max_size=120)), max_size=12),
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=8),
    reads=st.integers(min_value=1, max_value=20),
)
def test_fuzz_valid_ring_with_flipped_bytes(
    size: int,
    start_block: int,
    records: list[tuple[bytes, bytes]],
    flips: list[tuple[int, int]],
    reads: int,
) -> None:
    """Real records, then random bytes of the data area overwritten: repeated reads keep
    the invariant (and after ``RingCorrupt`` a reset makes the ring usable again)."""
    ring, ctrl, buf = make_ring(size, start=start_block * L.ALIGN)
    for name, msg in records:
        ring.try_write(L.KIND_DIRECT, name, 0.0, msg)
    assume(ring.used() > 0)
    for pos, value in flips:
        buf[pos % size] = value
    for _ in range(reads):
        head = ring.head
        _check_read(ring, ctrl)
        try:
            ring.q[L.Q_HEAD] = head  # read again, to see which outcome that was
            rec = ring.try_read()
        except RingCorrupt:
            assert ring.head == head
            ring.reset()  # as the reader does: usable again
            assert ring.try_read() is None
            break
        except BadRecord:
            assert ring.head > head
            continue
        if rec is None:
            break
        assert rec.kind in L.KINDS
        assert 0 <= ring.used() <= ring.size
    ring.reset()
    assert ring.try_write(L.KIND_NORMAL, b"x", 0.0, b"y") >= 0
    rec = ring.try_read()
    assert rec is not None
    assert bytes(rec.message) == b"y"
