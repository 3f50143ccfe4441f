"""Pure: the body of every AMQP message hybrid_layer publishes, and its optional sealing.

One frame per message (several frames for the same destination may travel in one AMQP
message as a *batch*, see :func:`encode_batch`)::

    <B flags|version> <B kind> <B origin_len> <H name_len> <d expires_wall>
    origin   (the sending host's host_id; a host ignores the echo of its own group sends)
    name     (destination channel, or group)
    payload  (the msgpack message)

``expires_wall`` is a Unix time: hosts do not share a monotonic clock. Decoding checks
every field and raises :class:`WireError` naming the problem; the leader drops, counts
and logs such messages and keeps going.

Sealing (``symmetric_encryption_keys``)
---------------------------------------
With keys, the whole AMQP body - the frame or the batch, so every frame's kind, origin,
destination, expiry and payload - is one Fernet token (AES-128-CBC + HMAC-SHA256), and
the token's plaintext starts with where the message was published to and its id::

    <B SEALED> token( <B SEAL_VERSION> <Q nonce> <Q seq> <B len> exchange <B len> routing_key
                      frame-or-batch )

:func:`unseal` authenticates all of it; the receiving leader then checks that the
message arrived through the exchange and routing key it was sealed for, that each frame
matches that route (a direct frame on this host's queue, a group frame under its
group's key, a normal-channel frame on its channel's queue), and deduplicates by the
*sealed* id, not by the AMQP ``message-id`` property. A frame whose token is older
than its own expiry plus :data:`CLOCK_SKEW` is refused as a replay. Everything refused
for those reasons raises :class:`Unauthenticated` (``dropped["unauthenticated"]``).

A frame encrypted by hybrid_layer 0.1 (flag ``F_ENCRYPTED``: only its payload was a
token, the header was not authenticated) is refused the same way: with keys, every host
must run this version (see the README's upgrade notes).
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Callable
from typing import NamedTuple

HEADER = struct.Struct("<BBBHd")
VERSION = 1
#: a batch: ``<B BATCH_VERSION> <H count>`` then ``count`` times ``<I length> frame``
BATCH_VERSION = 2
BATCH_HEADER = struct.Struct("<BH")
FRAME_LEN = struct.Struct("<I")
MAX_BATCH = 0xFFFF
F_ENCRYPTED = 0x80  # hybrid_layer 0.1: only the payload was a token; refused now
#: the first byte of a sealed body (neither a frame's version nor BATCH_VERSION)
SEALED = 3
SEAL_VERSION = 1
SEAL_HEADER = struct.Struct("<BQQ")  # seal version, publisher nonce, sequence number
#: seconds a frame's sealed token may arrive after the frame's own expiry (clocks of two
#: hosts may differ by this much) before it is refused as a replay; and how far in the
#: future a token's timestamp may be
CLOCK_SKEW = 60.0

DIRECT = 1  # to a process channel of the destination host
GROUP = 2  # to every member of a group on the hosts bound to it
NORMAL = 3  # to a normal channel (any one reader on any host)
KINDS = frozenset({DIRECT, GROUP, NORMAL})


class WireError(ValueError):
    """A message from the broker that is not one of ours, or damaged."""


class Unauthenticated(WireError):
    """With ``symmetric_encryption_keys``: a message whose origin, route or age cannot be
    trusted (no valid token, a token for another route, a replay, or plaintext)."""


class Frame(NamedTuple):
    kind: int
    origin: str
    name: str
    expires_wall: float
    payload: bytes | memoryview  # a view of the delivered body for a large one


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
            raise Unauthenticated(
                "does not decrypt with any configured key (another key, or altered)"
            ) from None


class Sealed(NamedTuple):
    """What :func:`unseal` authenticated: the publisher's id of the AMQP message, where
    it was published to, when (the sender's clock), and the frame or batch."""

    nonce: int
    seq: int
    exchange: str
    routing_key: str
    sealed_wall: float
    body: bytes


def seal(
    crypter: Crypter,
    nonce: int,
    seq: int,
    exchange: str,
    routing_key: str,
    body: bytes | Parts,
) -> bytes:
    """``body`` (a frame or a batch) as one token bound to its route and id."""
    e, r = exchange.encode(), routing_key.encode()
    if len(e) > 255 or len(r) > 255:
        raise WireError("exchange or routing key over 255 bytes")
    head = SEAL_HEADER.pack(SEAL_VERSION, nonce, seq)
    rest = (body.head, body.payload) if isinstance(body, Parts) else (body,)
    plain = b"".join((head, bytes((len(e),)), e, bytes((len(r),)), r, *rest))
    return bytes((SEALED,)) + crypter.encrypt(plain)


def unseal(crypter: Crypter, data: bytes | memoryview, now: float) -> Sealed:
    """Authenticate a sealed body; raises :class:`Unauthenticated` for anything that is
    not a valid token of one of the keys, or whose token is from the future."""
    if not len(data) or data[0] != SEALED:
        if len(data) and data[0] & 0x7F == VERSION and data[0] & F_ENCRYPTED:
            raise Unauthenticated(
                "a frame encrypted by hybrid_layer 0.1 (its header is not authenticated): "
                "every host with symmetric_encryption_keys must run the same version"
            )
        raise Unauthenticated("not sealed while symmetric_encryption_keys is set")
    token = bytes(data[1:])
    plain = crypter.decrypt(token)
    # the token is authentic: its timestamp (Fernet: version byte, then u64 seconds)
    try:
        sealed_wall = float(struct.unpack(">Q", base64.urlsafe_b64decode(token[:12])[1:9])[0])
    except (ValueError, struct.error):  # (cannot happen for a token that decrypted)
        raise Unauthenticated("token timestamp unreadable") from None
    if sealed_wall > now + CLOCK_SKEW:
        raise Unauthenticated(
            f"token sealed {sealed_wall - now:.0f} s in the future (clocks differ by "
            f"more than {CLOCK_SKEW:g} s?)"
        )
    if len(plain) < SEAL_HEADER.size + 2:
        raise Unauthenticated("sealed header too short")
    version, nonce, seq = SEAL_HEADER.unpack_from(plain)
    if version != SEAL_VERSION:
        raise Unauthenticated(f"unknown seal version {version}")
    pos = SEAL_HEADER.size
    try:
        elen = plain[pos]
        exchange = plain[pos + 1 : pos + 1 + elen].decode()
        pos += 1 + elen
        rlen = plain[pos]
        routing_key = plain[pos + 1 : pos + 1 + rlen].decode()
        pos += 1 + rlen
    except (IndexError, UnicodeDecodeError):
        raise Unauthenticated("sealed route damaged") from None
    if pos > len(plain):
        raise Unauthenticated("sealed route overruns the token")
    return Sealed(nonce, seq, exchange, routing_key, sealed_wall, plain[pos:])


def check_age(expires_wall: float, now: float) -> None:
    """Raise :class:`Unauthenticated` for a sealed frame more than :data:`CLOCK_SKEW`
    past its own expiry (a replay; a frame just past it is merely expired)."""
    if now > expires_wall + CLOCK_SKEW:
        raise Unauthenticated(
            f"a frame {now - expires_wall:.0f} s past its expiry: replayed, or clocks "
            f"differ by more than {CLOCK_SKEW:g} s"
        )


def encode(
    kind: int, origin: str, name: str, expires_wall: float, payload: bytes | memoryview
) -> bytes:
    """One frame (plain: with keys, the AMQP body is sealed as a whole, :func:`seal`)."""
    o = origin.encode()
    n = name.encode()
    head = HEADER.pack(VERSION, kind, len(o), len(n), expires_wall)
    return b"".join((head, o, n, payload))


class Parts:
    """A frame not joined: its header (:func:`encode`'s ``head + origin + name``) and
    its payload. A large message travels like this from the link's queue to the socket
    write: :func:`publish_frames_parts` cuts the AMQP body frames straight from the two,
    so its payload is copied once on its way out, however many frames carry it.
    ``len()`` is the frame's length; :meth:`join` is the frame (for sealing, and for
    aiormq's own ``basic_publish``)."""

    __slots__ = ("head", "payload")

    def __init__(self, head: bytes, payload: bytes | memoryview) -> None:
        self.head, self.payload = head, payload

    def __len__(self) -> int:
        return len(self.head) + len(self.payload)

    def join(self) -> bytes:
        return b"".join((self.head, self.payload))


#: a payload at least this long is kept as :class:`Parts` on its way out (never in a
#: batch: the link batches up to 256 KiB) and decoded as a view of the delivered body
#: (:func:`decode`) instead of a copy
LARGE = 64 * 1024


def encode_parts(
    kind: int, origin: str, name: str, expires_wall: float, payload: bytes | memoryview
) -> Parts:
    """:func:`encode`, not joined."""
    o = origin.encode()
    n = name.encode()
    return Parts(
        b"".join((HEADER.pack(VERSION, kind, len(o), len(n), expires_wall), o, n)), payload
    )


def decode(data: bytes | memoryview) -> Frame:
    if len(data) < HEADER.size:
        raise WireError(f"{len(data)} bytes is shorter than a frame header")
    flags, kind, olen, nlen, expires_wall = HEADER.unpack_from(data)
    if flags & 0x7F != VERSION:
        raise WireError(f"unknown frame version {flags & 0x7F}")
    if flags & F_ENCRYPTED:
        raise Unauthenticated(
            "a frame encrypted by hybrid_layer 0.1 (its header is not authenticated); "
            "set the same symmetric_encryption_keys and version on every host"
        )
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
    if len(data) - end >= LARGE:  # a view: the delivered body is immutable bytes
        return Frame(kind, origin, name, expires_wall, memoryview(data)[end:])
    return Frame(kind, origin, name, expires_wall, bytes(data[end:]))


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
    :class:`WireError` if the batch envelope itself is damaged, :class:`Unauthenticated`
    for a sealed body (this host has no keys to open it)."""
    if not data or data[0] != BATCH_VERSION:
        if data and data[0] == SEALED:
            raise Unauthenticated("a sealed message but no symmetric_encryption_keys set")
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


class Opened(NamedTuple):
    """One delivery, opened: the publisher's ``(nonce, seq)`` (sealed, or the AMQP
    ``message-id`` without keys; ``None`` if it has none) and, per frame in order, the
    frame or why it is refused. One bad frame never costs its neighbours."""

    ids: tuple[int, int] | None
    sealed: bool
    items: list[Frame | WireError]


def open_delivery(
    body: bytes,
    exchange: str,
    routing_key: str,
    ids: tuple[int, int] | None,
    crypter: Crypter | None,
    now: float,
    route: Callable[[Frame], tuple[str, str]],
    max_frame: int,
) -> Opened:
    """What the leader does with a delivered body before it hands frames on (pure).

    Raises :class:`WireError` (:class:`Unauthenticated`) when the whole message is
    refused: not sealed for this route, no valid token, a damaged batch envelope.
    ``route(frame)`` is where a frame of its kind and name is published to (exchange,
    routing key); with keys a frame sealed for another route is refused."""
    sealed = crypter is not None
    if crypter is not None:
        s = unseal(crypter, body, now)
        if s.exchange != exchange or s.routing_key != routing_key:
            raise Unauthenticated(
                f"sealed for {s.exchange or '(default exchange)'} / {s.routing_key!r} "
                f"but arrived through {exchange or '(default exchange)'} / {routing_key!r}"
            )
        body, ids = s.body, (s.nonce, s.seq)
    parts = split(body)
    items: list[Frame | WireError] = []
    for data in parts if parts is not None else (body,):
        if len(data) > max_frame:
            items.append(TooLarge(len(data)))
            continue
        try:
            frame = decode(data)
            if sealed:
                check_age(frame.expires_wall, now)
                if route(frame) != (exchange, routing_key):
                    raise Unauthenticated(
                        f"a frame for {frame.name!r} (kind {frame.kind}) sealed for "
                        f"routing key {routing_key!r}, which is not its route"
                    )
        except WireError as exc:
            items.append(exc)
            continue
        items.append(frame)
    return Opened(ids, sealed, items)


class TooLarge(WireError):
    """A frame over this host's ``max_message_bytes`` (every host must use the same)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"a {size}-byte frame")
        self.size = size
