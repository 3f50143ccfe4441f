"""Encoding of users' messages (msgspec msgpack), apart from the routing header.

The routing facts (destination name, kind, expiry) travel in the ring record header
(``shm.layout.RECORD``), never inside the user's dict. One encoder and one decoder per
module, reused (msgspec's advice). ``bytes`` stay ``bytes``; tuples arrive as lists.
"""

from __future__ import annotations

from typing import Any

import msgspec

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def encode_message(message: Any) -> bytes:
    """msgpack bytes of a message dict; ``TypeError`` naming the problem otherwise."""
    if not isinstance(message, dict):
        raise TypeError(f"message must be a dict, got {type(message).__name__}")
    try:
        return _encoder.encode(message)
    except (TypeError, OverflowError, ValueError) as exc:
        raise TypeError(
            f"message cannot be encoded ({exc}); messages may hold str, bytes, int "
            "(64-bit), float, bool, None, list and dict values"
        ) from exc


def decode_message(data: bytes | memoryview) -> dict[str, Any]:
    out = _decoder.decode(data)
    if not isinstance(out, dict):
        raise msgspec.DecodeError("message is not a map")
    return out


def encode_args(*args: Any) -> bytes:
    return _encoder.encode(list(args))


def decode_args(data: bytes | memoryview) -> list[Any]:
    out = _decoder.decode(data)
    if not isinstance(out, list):
        raise msgspec.DecodeError("control arguments are not a list")
    return out
