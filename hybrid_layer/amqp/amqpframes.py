"""Pure: the AMQP 0-9-1 frames of one ``basic.publish``, marshalled in one go.

The three frames of one publish (method, content header, body frames), exactly as pamqp
marshals them for the properties the link sets (delivery-mode, expiration, message-id),
built with ``struct`` instead of pamqp's generic marshalling because they are on every
message's way out. A large body is cut into body frames of ``max_content`` bytes from its
parts with one copy (pamqp and aiormq's ``_split_body`` copy it several times).
``tests/unit/test_wire.py`` checks both against pamqp and aiormq byte for byte.

Who calls it: ``amqp/aiormq_shortcuts._publish_frame`` (the link's host thread), with
what ``amqp/wire`` encoded. State: none. Hot: ``publish_frames`` runs once per AMQP
message published.
"""

from __future__ import annotations

import struct

from .wire import WireError

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


def _method_and_header(
    exchange: str,
    routing_key: str,
    mandatory: bool,
    size: int,
    delivery_mode: int,
    expiration: str,
    message_id: str,
) -> tuple[bytes, bytes]:
    """The basic.publish method and the content header of a body of ``size`` bytes."""
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
            _HEADER_START.pack(60, 0, size, _PROPS),
            bytes((delivery_mode,)),
            _shortstr(expiration),
            _shortstr(message_id),
        )
    )
    return method, header


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
    method, header = _method_and_header(
        exchange, routing_key, mandatory, len(body), delivery_mode, expiration, message_id
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


def publish_frames_parts(
    channel: int,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    body: tuple[bytes | memoryview, ...],
    delivery_mode: int,
    expiration: str,
    message_id: str,
    max_content: int,
) -> bytes:
    """:func:`publish_frames` for a body of any size, given as ``body``'s parts joined:
    body frames of ``max_content`` bytes (the connection's ``frame_max`` less a frame's
    8 bytes of framing) and a shorter last one, as aiormq cuts them. One join: the body
    is copied once, however many parts and frames (aiormq copies it four times)."""
    if max_content < 1:
        raise ValueError(f"max_content must be positive, not {max_content}")
    size = sum(len(part) for part in body)
    method, header = _method_and_header(
        exchange, routing_key, mandatory, size, delivery_mode, expiration, message_id
    )
    out: list[bytes | memoryview] = [
        _FRAME_HEAD.pack(1, channel, len(method)),
        method,
        _FRAME_END,
        _FRAME_HEAD.pack(2, channel, len(header)),
        header,
        _FRAME_END,
    ]
    views = [memoryview(part).cast("B") for part in body if len(part)]
    i = off = 0  # the next byte: views[i][off]
    left = size
    while left:
        n = min(max_content, left)
        left -= n
        out.append(_FRAME_HEAD.pack(3, channel, n))
        while n:
            v = views[i]
            take = min(n, len(v) - off)
            out.append(v[off : off + take])
            n -= take
            off += take
            if off == len(v):
                i += 1
                off = 0
        out.append(_FRAME_END)
    return b"".join(out)
