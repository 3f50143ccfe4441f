"""Unit and property tests of the broker wire frame (``hybrid_layer.amqp.wire``)."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_layer.amqp import wire
from hybrid_layer.amqp.link import _safe, group_key, host_queue, normal_queue

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


class TestEncryption:
    def test_round_trip_and_payload_not_in_clear(self) -> None:
        c = wire.Crypter((b"k1",))
        data = wire.encode(wire.GROUP, "h", "room", 5.0, b"secret-payload", c)
        assert b"secret-payload" not in data
        assert wire.decode(data, c).payload == b"secret-payload"

    def test_rotation_first_key_encrypts_all_decrypt(self) -> None:
        old = wire.Crypter((b"old",))
        both = wire.Crypter((b"new", b"old"))
        new_only = wire.Crypter((b"new",))
        from_old = wire.encode(wire.DIRECT, "h", "c", 5.0, b"x", old)
        from_both = wire.encode(wire.DIRECT, "h", "c", 5.0, b"y", both)
        assert wire.decode(from_old, both).payload == b"x"
        assert wire.decode(from_both, new_only).payload == b"y"
        with pytest.raises(wire.WireError, match="does not decrypt"):
            wire.decode(from_both, old)

    def test_compatible_with_channels_redis_key_derivation(self) -> None:
        """Same derivation as channels_redis: sha256(key) -> urlsafe base64 Fernet key."""
        import base64
        import hashlib

        from cryptography.fernet import Fernet

        token = Fernet(base64.urlsafe_b64encode(hashlib.sha256(b"k").digest())).encrypt(b"m")
        assert wire.Crypter((b"k",)).decrypt(token) == b"m"

    def test_plain_and_encrypted_do_not_mix(self) -> None:
        c = wire.Crypter((b"k",))
        plain = wire.encode(wire.DIRECT, "h", "c", 5.0, b"x")
        enc = wire.encode(wire.DIRECT, "h", "c", 5.0, b"x", c)
        with pytest.raises(wire.WireError, match="unencrypted"):
            wire.decode(plain, c)
        with pytest.raises(wire.WireError, match="no symmetric_encryption_keys"):
            wire.decode(enc)


def test_broker_names() -> None:
    assert host_queue("asgi", "h1") == "asgi.h1"
    assert group_key("asgi", 0xAB) == "asgi.g.00000000000000ab"
    assert normal_queue("asgi", 0xCD) == "asgi.n.00000000000000cd"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:secret@127.0.0.1:5672/", "amqp://guest@127.0.0.1:5672/"),
        ("amqps://u:p@w@host/v", "amqps://u@host/v"),
        ("amqp://host/", "amqp://host/"),
    ],
)
def test_passwords_never_logged(url: str, shown: str) -> None:
    assert _safe(url) == shown


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
    got = wire.publish_frames(channel, exchange, rk, mandatory, body, 1, exp, mid)
    assert got == _pamqp_publish(channel, exchange, rk, mandatory, body, exp, mid)


def test_publish_frames_reject_a_name_over_255_bytes() -> None:
    with pytest.raises(wire.WireError, match="255"):
        wire.publish_frames(1, "", "q" * 256, True, b"x", 1, "1000", "1")
