"""Unit and property tests of the broker wire frame (``hybrid_layer.amqp.wire``)."""

from __future__ import annotations

import contextlib
import itertools
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_layer.amqp import amqpframes, wire

names = st.text(min_size=1, max_size=120)
payloads = st.binary(max_size=4096)


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(sorted(wire.KINDS)),
    origin=st.text(max_size=32),
    name=names,
    expires=st.floats(allow_nan=False, allow_infinity=False),
    payload=payloads,
)
def test_round_trip(kind: int, origin: str, name: str, expires: float, payload: bytes) -> None:
    data = wire.encode(kind, origin, name, expires, payload)
    assert wire.decode(data) == wire.Frame(kind, origin, name, expires, payload)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_garbage_is_a_wire_error_or_a_frame(data: bytes) -> None:
    """Whatever arrives from the broker: a frame or WireError, never another exception."""
    try:
        frame = wire.decode(data)
    except wire.WireError:
        return
    assert frame.kind in wire.KINDS and frame.name


@settings(max_examples=100, deadline=None)
@given(name=names, payload=payloads, cut=st.integers(min_value=0, max_value=60))
def test_truncated_frames_are_rejected(name: str, payload: bytes, cut: int) -> None:
    data = wire.encode(wire.DIRECT, "h1", name, 1.0, payload)
    head = wire.HEADER.size + 2 + len(name.encode())
    short = data[: min(cut, head - 1)]
    with pytest.raises(wire.WireError):
        wire.decode(short)


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"", "shorter than a frame header"),
        (struct.pack("<BBBHd", 9, 1, 0, 1, 0.0) + b"x", "unknown frame version"),
        (struct.pack("<BBBHd", 1, 7, 0, 1, 0.0) + b"x", "unknown frame kind"),
        (struct.pack("<BBBHd", 1, 1, 5, 9, 0.0) + b"abc", "overrun"),
        (struct.pack("<BBBHd", 1, 1, 0, 0, 0.0), "empty destination"),
        (struct.pack("<BBBHd", 1, 1, 0, 1, float("nan")) + b"x", "not a number"),
        (struct.pack("<BBBHd", 1, 1, 0, 2, 0.0) + b"\xff\xfe", "UTF-8"),
    ],
)
def test_each_problem_is_named(data: bytes, text: str) -> None:
    with pytest.raises(wire.WireError, match=text):
        wire.decode(data)


QUEUE = "p.hb"
GX = "p.groups"


def route(frame: wire.Frame) -> tuple[str, str]:
    """The receiving host "hb"'s idea of a frame's route (as ``Link._route_of``)."""
    if frame.kind == wire.DIRECT:
        return "", QUEUE
    if frame.kind == wire.GROUP:
        return GX, f"p.g.{frame.name}"
    return "", f"p.n.{frame.name}"


def opened(
    body: bytes, c: wire.Crypter | None, ex: str = "", rk: str = QUEUE, now: float = 1000.0
) -> wire.Opened:
    return wire.open_delivery(body, ex, rk, None, c, now, route, 1 << 20)


def direct(payload: bytes = b"x", expires: float = 1010.0) -> bytes:
    return wire.encode(wire.DIRECT, "ha", "hb!1.2!abc", expires, payload)


def legacy_encrypted(c: wire.Crypter, payload: bytes) -> bytes:
    """A frame as hybrid_layer 0.1 encrypted it: only the payload was a token."""
    o, n = b"ha", b"hb!1.2!abc"
    head = wire.HEADER.pack(wire.VERSION | wire.F_ENCRYPTED, wire.DIRECT, len(o), len(n), 1010.0)
    return head + o + n + c.encrypt(payload)


class TestSealing:
    def test_round_trip_and_nothing_in_clear(self) -> None:
        c = wire.Crypter((b"k1",))
        body = wire.seal(c, 7, 9, "", QUEUE, direct(b"secret-payload", time.time() + 10))
        assert b"secret-payload" not in body and b"hb!1.2!abc" not in body
        o = opened(body, c, now=time.time())
        assert o.ids == (7, 9) and o.sealed
        (f,) = o.items
        assert isinstance(f, wire.Frame) and f.payload == b"secret-payload"

    def test_rotation_first_key_encrypts_all_decrypt(self) -> None:
        old = wire.Crypter((b"old",))
        both = wire.Crypter((b"new", b"old"))
        new_only = wire.Crypter((b"new",))
        now = time.time()
        from_old = wire.seal(old, 1, 1, "", QUEUE, direct(b"x", now + 10))
        from_both = wire.seal(both, 1, 2, "", QUEUE, direct(b"y", now + 10))
        assert opened(from_old, both, now=now).items[0].payload == b"x"  # type: ignore[union-attr]
        assert opened(from_both, new_only, now=now).items[0].payload == b"y"  # type: ignore[union-attr]
        with pytest.raises(wire.Unauthenticated, match="does not decrypt"):
            opened(from_both, old, now=now)

    def test_compatible_with_channels_redis_key_derivation(self) -> None:
        """Same derivation as channels_redis: sha256(key) -> urlsafe base64 Fernet key."""
        import base64
        import hashlib

        from cryptography.fernet import Fernet

        token = Fernet(base64.urlsafe_b64encode(hashlib.sha256(b"k").digest())).encrypt(b"m")
        assert wire.Crypter((b"k",)).decrypt(token) == b"m"

    def test_plain_and_sealed_do_not_mix(self) -> None:
        c = wire.Crypter((b"k",))
        now = time.time()
        with pytest.raises(wire.Unauthenticated, match="not sealed"):
            opened(direct(), c, now=now)
        with pytest.raises(wire.Unauthenticated, match="no symmetric_encryption_keys"):
            opened(wire.seal(c, 1, 1, "", QUEUE, direct()), None, now=now)

    def test_a_0_1_encrypted_frame_is_refused_as_unauthenticated(self) -> None:
        c = wire.Crypter((b"k",))
        with pytest.raises(wire.Unauthenticated, match=r"0\.1"):
            opened(legacy_encrypted(c, b"x"), c, now=time.time())
        o = opened(legacy_encrypted(c, b"x"), None)  # and without keys, per frame
        assert isinstance(o.items[0], wire.Unauthenticated)

    def test_redirected_to_another_route_is_refused(self) -> None:
        c = wire.Crypter((b"k",))
        now = time.time()
        group = wire.encode(wire.GROUP, "ha", "staff", now + 10, b"x")
        body = wire.seal(c, 1, 1, GX, "p.g.staff", group)
        assert isinstance(opened(body, c, GX, "p.g.staff", now).items[0], wire.Frame)
        for ex, rk in (("", QUEUE), (GX, "p.g.other"), ("", "p.hc")):
            with pytest.raises(wire.Unauthenticated, match="arrived through"):
                opened(body, c, ex, rk, now)
        # a sender with the key that seals a frame for a route not its own
        odd = wire.seal(c, 1, 2, GX, "p.g.other", group)
        (item,) = opened(odd, c, GX, "p.g.other", now).items
        assert isinstance(item, wire.Unauthenticated) and "not its route" in str(item)

    def test_a_token_replayed_after_its_expiry_is_refused(self) -> None:
        c = wire.Crypter((b"k",))
        now = time.time()
        body = wire.seal(c, 1, 1, "", QUEUE, direct(b"x", now + 10))
        assert isinstance(opened(body, c, now=now + 9).items[0], wire.Frame)
        # just past its expiry the frame is only expired (the link counts that)
        assert isinstance(opened(body, c, now=now + 10 + wire.CLOCK_SKEW - 1).items[0], wire.Frame)
        (item,) = opened(body, c, now=now + 11 + wire.CLOCK_SKEW).items
        assert isinstance(item, wire.Unauthenticated) and "past its expiry" in str(item)

    def test_a_token_from_the_future_is_refused(self) -> None:
        c = wire.Crypter((b"k",))
        now = time.time()
        body = wire.seal(c, 1, 1, "", QUEUE, direct(b"x", now + 10))
        with pytest.raises(wire.Unauthenticated, match="future"):
            opened(body, c, now=now - wire.CLOCK_SKEW - 5)

    def test_a_sealed_batch_round_trips(self) -> None:
        c = wire.Crypter((b"k",))
        now = time.time()
        frames = [direct(bytes([i]), now + 10) for i in range(5)]
        body = wire.seal(c, 3, 4, "", QUEUE, wire.encode_batch(frames))
        items = opened(body, c, now=now).items
        assert [f.payload for f in items] == [bytes([i]) for i in range(5)]  # type: ignore[union-attr]


# ---------------------------------------------------------------- fuzz of the decoder
# The invariant (issue 12): whatever body arrives, ``open_delivery`` either refuses the
# whole delivery with a WireError (counted once) or returns, per frame, a valid frame or
# a WireError (each counted) - never another exception; and in a plain batch a damaged
# frame never costs its neighbours.

CRYPTER = wire.Crypter((b"fuzz",))
kinds = st.sampled_from(sorted(wire.KINDS))
frame_st = st.builds(
    lambda k, n, p, e: wire.encode(k, "ha", n, e, p),
    kinds,
    st.text(min_size=1, max_size=20),
    st.binary(max_size=64),
    st.floats(allow_nan=False, min_value=-1e12, max_value=1e12),
)


def _check(o: wire.Opened) -> None:
    for item in o.items:
        if isinstance(item, wire.Frame):
            assert item.kind in wire.KINDS and item.name
            assert item.expires_wall == item.expires_wall
        else:
            assert isinstance(item, wire.WireError)


def _mutate(body: bytes, data: st.DataObject) -> bytes:
    ops = data.draw(
        st.lists(
            st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.binary(max_size=8)), max_size=4
        )
    )
    b = bytearray(body)
    for op, pos, junk in ops:
        at = pos % (len(b) + 1)
        if op == 0 and b:
            b[at % len(b)] ^= 1 << (pos % 8)
        elif op == 1:
            b[at:at] = junk
        elif op == 2:
            del b[at : at + len(junk) + 1]
        else:
            b = b[:at]
    return bytes(b)


@settings(max_examples=400, deadline=None)
@given(
    frames=st.lists(frame_st, min_size=1, max_size=6),
    batch=st.booleans(),
    sealed=st.booleans(),
    ex=st.sampled_from(["", GX]),
    rk=st.sampled_from([QUEUE, "p.g.x", "p.n.x", "p.hc"]),
    data=st.data(),
)
def test_fuzz_open_delivery(
    frames: list[bytes], batch: bool, sealed: bool, ex: str, rk: str, data: st.DataObject
) -> None:
    body = wire.encode_batch(frames) if batch or len(frames) > 1 else frames[0]
    c = CRYPTER if sealed else None
    if c is not None:
        body = wire.seal(c, 5, 6, ex, rk, body)
    body = _mutate(body, data)
    now = time.time()
    try:
        o = opened(body, c, ex, rk, now)
    except wire.WireError:
        return
    _check(o)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), sealed=st.booleans())
def test_fuzz_random_bodies(data: bytes, sealed: bool) -> None:
    try:
        o = opened(data, CRYPTER if sealed else None)
    except wire.WireError:
        return
    _check(o)


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(frame_st, min_size=2, max_size=6),
    victim=st.integers(0, 5),
    data=st.data(),
)
def test_fuzz_a_damaged_frame_never_costs_its_neighbours(
    frames: list[bytes], victim: int, data: st.DataObject
) -> None:
    """Damage inside one frame of a (plain) batch, its length word intact: every other
    frame still comes out as it went in."""
    victim %= len(frames)
    bad = _mutate(frames[victim], data)
    frames2 = [*frames[:victim], bad, *frames[victim + 1 :]]
    o = opened(wire.encode_batch(frames2), None)
    _check(o)
    assert len(o.items) == len(frames)
    for i, f in enumerate(frames):
        if i != victim:
            assert o.items[i] == wire.decode(f)


# ---------------------------------------------------------------------------- batches
@settings(max_examples=150, deadline=None)
@given(
    frames=st.lists(
        st.tuples(st.sampled_from(sorted(wire.KINDS)), names, payloads), min_size=2, max_size=20
    )
)
def test_batch_round_trip(frames: list[tuple[int, str, bytes]]) -> None:
    encoded = [wire.encode(k, "ha", n, 1.5, p) for k, n, p in frames]
    body = wire.encode_batch(encoded)
    parts = wire.split(body)
    assert parts is not None
    assert [wire.decode(p) for p in parts] == [wire.Frame(k, "ha", n, 1.5, p) for k, n, p in frames]


def test_a_single_frame_is_not_a_batch() -> None:
    for flags_frame in (wire.encode(wire.DIRECT, "ha", "x!y", 1.0, b"m"),):
        assert wire.split(flags_frame) is None
    assert wire.split(b"") is None


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"\x02", "shorter than its header"),
        (struct.pack("<BH", 2, 2) + struct.pack("<I", 1) + b"x", "ends before frame 2 of 2"),
        (struct.pack("<BH", 2, 1) + struct.pack("<I", 9) + b"x", "overruns the batch"),
        (struct.pack("<BH", 2, 1) + struct.pack("<I", 1) + b"xy", "1 stray bytes"),
    ],
)
def test_damaged_batch_names_the_problem(body: bytes, problem: str) -> None:
    with pytest.raises(wire.WireError, match=problem):
        wire.split(body)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_garbage_batch_is_a_wire_error_or_frames(data: bytes) -> None:
    try:
        parts = wire.split(b"\x02" + data)
    except wire.WireError:
        return
    assert parts is not None
    for p in parts:  # each one: a frame or WireError, nothing else
        with contextlib.suppress(wire.WireError):
            assert wire.decode(p).kind in wire.KINDS


def test_batch_size_is_bounded() -> None:
    with pytest.raises(ValueError, match="1 to"):
        wire.encode_batch([])


# ---------------------------------------------------------------- basic.publish frames
def _pamqp_publish(
    channel: int, exchange: str, rk: str, mandatory: bool, body: bytes, exp: str, mid: str
) -> bytes:
    from pamqp import commands as spec
    from pamqp import frame
    from pamqp.body import ContentBody
    from pamqp.header import ContentHeader

    props = spec.Basic.Properties(delivery_mode=1, expiration=exp, message_id=mid)
    return (
        frame.marshal(
            spec.Basic.Publish(exchange=exchange, routing_key=rk, mandatory=mandatory), channel
        )
        + frame.marshal(ContentHeader(0, len(body), props), channel)
        + frame.marshal(ContentBody(body), channel)
    )


# (pamqp accepts only these in an exchange name; host ids and prefixes are names too)
_short = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:", max_size=127
)


@settings(max_examples=300, deadline=None)
@given(
    channel=st.integers(1, 65535),
    exchange=_short,
    rk=_short,
    mandatory=st.booleans(),
    body=st.binary(min_size=1, max_size=3000),
    exp=st.integers(1, 2**31).map(str),
    mid=st.integers(1, 2**63).map(str),
)
def test_publish_frames_match_pamqp_byte_for_byte(
    channel: int, exchange: str, rk: str, mandatory: bool, body: bytes, exp: str, mid: str
) -> None:
    got = amqpframes.publish_frames(channel, exchange, rk, mandatory, body, 1, exp, mid)
    assert got == _pamqp_publish(channel, exchange, rk, mandatory, body, exp, mid)


def test_publish_frames_reject_a_name_over_255_bytes() -> None:
    with pytest.raises(wire.WireError, match="255"):
        amqpframes.publish_frames(1, "", "q" * 256, True, b"x", 1, "1000", "1")


# ---------------------------------------------------------------- large bodies, one copy
def _pamqp_publish_split(
    channel: int,
    exchange: str,
    rk: str,
    mandatory: bool,
    body: bytes,
    exp: str,
    mid: str,
    max_content: int,
) -> bytes:
    """What aiormq sends for ``body``: its ``_split_body`` (one frame under
    ``max_content``, else frames of ``max_content``), marshalled by pamqp."""
    from pamqp import commands as spec
    from pamqp import frame
    from pamqp.body import ContentBody
    from pamqp.header import ContentHeader

    props = spec.Basic.Properties(delivery_mode=1, expiration=exp, message_id=mid)
    if not body:
        chunks = []
    elif len(body) < max_content:
        chunks = [body]
    else:
        chunks = [body[i : i + max_content] for i in range(0, len(body), max_content)]
    out = frame.marshal(
        spec.Basic.Publish(exchange=exchange, routing_key=rk, mandatory=mandatory), channel
    ) + frame.marshal(ContentHeader(0, len(body), props), channel)
    return out + b"".join(frame.marshal(ContentBody(c), channel) for c in chunks)


@settings(max_examples=300, deadline=None)
@given(
    channel=st.integers(1, 65535),
    exchange=_short,
    rk=_short,
    mandatory=st.booleans(),
    body=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 600), max_size=4),
    max_content=st.integers(1, 200),
    exp=st.integers(1, 2**31).map(str),
    mid=st.integers(1, 2**63).map(str),
)
def test_publish_frames_parts_match_aiormq_and_pamqp_byte_for_byte(
    channel: int,
    exchange: str,
    rk: str,
    mandatory: bool,
    body: bytes,
    cuts: list[int],
    max_content: int,
    exp: str,
    mid: str,
) -> None:
    # the body in parts (bytes and views, some empty), cut anywhere
    at = sorted({min(c, len(body)) for c in cuts})
    bounds = [0, *at, len(body)]
    parts = tuple(
        memoryview(body)[a:b] if i % 2 else body[a:b]
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
    )
    got = amqpframes.publish_frames_parts(
        channel, exchange, rk, mandatory, parts, 1, exp, mid, max_content
    )
    assert got == _pamqp_publish_split(
        channel, exchange, rk, mandatory, body, exp, mid, max_content
    )


def test_publish_frames_parts_refuse_a_frame_size_of_zero() -> None:
    with pytest.raises(ValueError, match="max_content"):
        amqpframes.publish_frames_parts(1, "", "q", True, (b"x",), 1, "1000", "1", 0)


def test_a_large_frame_in_parts_is_the_frame_and_decodes_to_a_view() -> None:
    payload = bytes(range(256)) * 300  # over wire.LARGE
    parts = wire.encode_parts(wire.DIRECT, "ha", "specific.x!y", 123.5, memoryview(payload))
    assert len(parts) == len(parts.join())
    assert parts.join() == wire.encode(wire.DIRECT, "ha", "specific.x!y", 123.5, payload)
    f = wire.decode(parts.join())
    assert isinstance(f.payload, memoryview)  # not copied out of the delivered body
    assert f.payload == payload
    small = wire.decode(wire.encode(wire.DIRECT, "ha", "c", 1.0, b"abc"))
    assert type(small.payload) is bytes and small.payload == b"abc"


def test_sealing_parts_is_sealing_the_joined_frame() -> None:
    crypter = wire.Crypter((b"key",))
    parts = wire.encode_parts(wire.DIRECT, "ha", "c", time.time() + 60, b"p" * 70_000)
    now = time.time()
    a = wire.unseal(crypter, wire.seal(crypter, 7, 9, "", "rk", parts), now)
    b = wire.unseal(crypter, wire.seal(crypter, 7, 9, "", "rk", parts.join()), now)
    assert a.body == b.body == parts.join()
    assert (a.nonce, a.seq, a.routing_key) == (b.nonce, b.seq, b.routing_key) == (7, 9, "rk")


class _Channel:
    """The two members of an aiormq channel that ``aiormq_shortcuts._join_content`` relies on."""

    def __init__(self, frames: list[object]) -> None:
        self.frames = list(frames)

    async def _get_frame(self) -> object:
        return self.frames.pop(0)

    async def _read_content(self, frame: object, header: object) -> object:
        raise AssertionError("replaced")


def test_a_delivered_body_is_joined_once_from_its_frames() -> None:
    import asyncio

    from pamqp import commands as spec
    from pamqp.body import ContentBody
    from pamqp.header import ContentHeader

    from hybrid_layer.amqp.aiormq_shortcuts import _join_content

    deliver = spec.Basic.Deliver(consumer_tag="t", delivery_tag=1, routing_key="q")
    chunks = [b"a" * 10, b"b" * 10, b"c" * 3]
    ch = _Channel([ContentBody(c) for c in chunks])
    _join_content(ch)
    msg = asyncio.run(ch._read_content(deliver, ContentHeader(0, 23)))
    assert msg.body == b"".join(chunks) and msg.delivery is deliver and msg.channel is ch
    one = b"x" * 5
    ch = _Channel([ContentBody(one)])
    _join_content(ch)
    assert asyncio.run(ch._read_content(deliver, ContentHeader(0, 5))).body is one  # no copy
    ch = _Channel([])
    _join_content(ch)
    assert asyncio.run(ch._read_content(deliver, ContentHeader(0, 0))).body == b""
    ch = _Channel([spec.Basic.Ack()])
    _join_content(ch)
    with pytest.raises(ValueError, match="Unexpected frame"):
        asyncio.run(ch._read_content(deliver, ContentHeader(0, 5)))

    class Other:  # an aiormq that reads content another way: left alone
        pass

    other = Other()
    _join_content(other)
    assert not hasattr(other, "_read_content")
