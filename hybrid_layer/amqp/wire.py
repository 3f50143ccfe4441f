"""Pure: the body of every AMQP message hybrid_layer publishes, and its optional encryption.

One frame per message (several frames for the same destination may travel in one AMQP
message as a *batch*, see :func:`encode_batch`)::

    <B flags|version> <B kind> <B origin_len> <H name_len> <d expires_wall>
    origin   (the sending host's host_id; a host ignores the echo of its own group sends)
    name     (destination channel, or group)
    payload  (the msgpack message, or a Fernet token of it when encryption is on)

``expires_wall`` is a Unix time: hosts do not share a monotonic clock. Decoding checks
every field and raises :class:`WireError` naming the problem; the leader drops, counts
and logs such messages and keeps going.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import NamedTuple

HEADER = struct.Struct("<BBBHd")
VERSION = 1
#: a batch: ``<B BATCH_VERSION> <H count>`` then ``count`` times ``<I length> frame``
BATCH_VERSION = 2
BATCH_HEADER = struct.Struct("<BH")
FRAME_LEN = struct.Struct("<I")
MAX_BATCH = 0xFFFF
F_ENCRYPTED = 0x80

DIRECT = 1  # to a process channel of the destination host
GROUP = 2  # to every member of a group on the hosts bound to it
NORMAL = 3  # to a normal channel (any one reader on any host)
KINDS = frozenset({DIRECT, GROUP, NORMAL})


class WireError(ValueError):
    """A message from the broker that is not one of ours, or damaged."""


class Frame(NamedTuple):
    kind: int
    origin: str
    name: str
    expires_wall: float
    payload: bytes


class Crypter:
    """channels_redis-compatible symmetric encryption: the first key encrypts, every key
    decrypts, so keys rotate without downtime (add the new key first, drop the old one
    once every host runs with it)."""

    def __init__(self, keys: tuple[bytes, ...]) -> None:
        from cryptography.fernet import Fernet, MultiFernet

        self._f = MultiFernet(
            [Fernet(base64.urlsafe_b64encode(hashlib.sha256(k).digest())) for k in keys]
        )

    def encrypt(self, data: bytes) -> bytes:
        return self._f.encrypt(data)

    def decrypt(self, token: bytes) -> bytes:
        from cryptography.fernet import InvalidToken

        try:
            return self._f.decrypt(token)
        except InvalidToken:
            raise WireError("payload does not decrypt with any configured key") from None


def encode(
    kind: int,
    origin: str,
    name: str,
    expires_wall: float,
    payload: bytes | memoryview,
    crypter: Crypter | None = None,
) -> bytes:
    o = origin.encode()
    n = name.encode()
    flags = VERSION
    body = bytes(payload)
    if crypter is not None:
        body = crypter.encrypt(body)
        flags |= F_ENCRYPTED
    return b"".join((HEADER.pack(flags, kind, len(o), len(n), expires_wall), o, n, body))


def decode(data: bytes | memoryview, crypter: Crypter | None = None) -> Frame:
    if len(data) < HEADER.size:
        raise WireError(f"{len(data)} bytes is shorter than a frame header")
    flags, kind, olen, nlen, expires_wall = HEADER.unpack_from(data)
    if flags & 0x7F != VERSION:
        raise WireError(f"unknown frame version {flags & 0x7F}")
    if kind not in KINDS:
        raise WireError(f"unknown frame kind {kind}")
    end = HEADER.size + olen + nlen
    if end > len(data):
        raise WireError(f"names ({olen}+{nlen} bytes) overrun a {len(data)}-byte frame")
    if expires_wall != expires_wall:  # NaN
        raise WireError("expiry is not a number")
    try:
        origin = bytes(data[HEADER.size : HEADER.size + olen]).decode()
        name = bytes(data[HEADER.size + olen : end]).decode()
    except UnicodeDecodeError:
        raise WireError("names are not UTF-8") from None
    if not name:
        raise WireError("empty destination name")
    payload = bytes(data[end:])
    encrypted = bool(flags & F_ENCRYPTED)
    if crypter is not None:
        if not encrypted:
            raise WireError("unencrypted payload while symmetric_encryption_keys is set")
        payload = crypter.decrypt(payload)
    elif encrypted:
        raise WireError("encrypted payload but no symmetric_encryption_keys configured")
    return Frame(kind, origin, name, expires_wall, payload)


def encode_batch(frames: list[bytes]) -> bytes:
    """Several encoded frames as one AMQP body (one publish, one confirm, one delivery)."""
    if not 1 <= len(frames) <= MAX_BATCH:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH} frames, not {len(frames)}")
    parts = [BATCH_HEADER.pack(BATCH_VERSION, len(frames))]
    for f in frames:
        parts.append(FRAME_LEN.pack(len(f)))
        parts.append(f)
    return b"".join(parts)


def split(data: bytes) -> list[memoryview] | None:
    """The frames of a batch body, or ``None`` if ``data`` is a single frame. Raises
    :class:`WireError` if the batch envelope itself is damaged."""
    if not data or data[0] != BATCH_VERSION:
        return None
    if len(data) < BATCH_HEADER.size:
        raise WireError("batch shorter than its header")
    _, count = BATCH_HEADER.unpack_from(data)
    mv = memoryview(data)
    out = []
    pos = BATCH_HEADER.size
    for i in range(count):
        if pos + FRAME_LEN.size > len(data):
            raise WireError(f"batch ends before frame {i + 1} of {count}")
        (n,) = FRAME_LEN.unpack_from(data, pos)
        pos += FRAME_LEN.size
        if pos + n > len(data):
            raise WireError(f"frame {i + 1} of {count} ({n} bytes) overruns the batch")
        out.append(mv[pos : pos + n])
        pos += n
    if pos != len(data):
        raise WireError(f"{len(data) - pos} stray bytes after the batch's {count} frames")
    return out


# ---------------------------------------------------------------- AMQP 0-9-1 publish
# The three frames of one basic.publish (method, content header, one body frame), as
# pamqp marshals them for the properties the link sets: delivery-mode, expiration,
# message-id. Built with struct instead of pamqp's generic marshalling because it is on
# every message's way out; tests/unit/test_wire.py checks it against pamqp byte for byte.
_FRAME_HEAD = struct.Struct(">BHI")  # type, channel, payload size
_FRAME_END = b"\xce"
_PUBLISH_METHOD = struct.Struct(">HHH")  # class 60 (basic), method 40 (publish), ticket 0
_HEADER_START = struct.Struct(">HHQH")  # class 60, weight 0, body size, property flags
_PROPS = (1 << 12) | (1 << 8) | (1 << 7)  # delivery-mode, expiration, message-id


def _shortstr(s: str) -> bytes:
    b = s.encode()
    if len(b) > 255:
        raise WireError(f"AMQP short string over 255 bytes: {s[:40]!r}...")
    return bytes((len(b),)) + b


def publish_frames(
    channel: int,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    body: bytes,
    delivery_mode: int,
    expiration: str,
    message_id: str,
) -> bytes:
    """The wire bytes of a basic.publish of ``body`` in one body frame (the caller
    splits a body at or over the connection's frame size another way)."""
    method = b"".join(
        (
            _PUBLISH_METHOD.pack(60, 40, 0),
            _shortstr(exchange),
            _shortstr(routing_key),
            b"\x01" if mandatory else b"\x00",
        )
    )
    header = b"".join(
        (
            _HEADER_START.pack(60, 0, len(body), _PROPS),
            bytes((delivery_mode,)),
            _shortstr(expiration),
            _shortstr(message_id),
        )
    )
    return b"".join(
        (
            _FRAME_HEAD.pack(1, channel, len(method)),
            method,
            _FRAME_END,
            _FRAME_HEAD.pack(2, channel, len(header)),
            header,
            _FRAME_END,
            _FRAME_HEAD.pack(3, channel, len(body)),
            body,
            _FRAME_END,
        )
    )
