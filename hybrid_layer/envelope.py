"""Encoding of users' messages (msgspec msgpack), apart from the routing header.

The routing facts (destination name, kind, expiry) travel in the ring record header
(``shm.layout.RECORD``), never inside the user's dict. One encoder and one decoder per
module, reused (msgspec's advice). ``bytes`` stay ``bytes``; tuples arrive as lists.

The contract (checked here on both sides, with the same code): a message is a dict with
``str`` keys, a ``str`` ``type`` if it has one, and values of str, bytes, int (64-bit),
float, bool, None, list and dict (``str`` keys), nested at most ``MAX_DEPTH`` containers
deep. ``encode_message`` raises ``TypeError`` for anything else, so a sender learns at
once; ``decode_message`` raises :class:`MalformedMessage` for what another process or
the broker sent outside it, and the receiver drops and counts it.

Cost: a flat message of str/int/float/bool/None values is checked by msgspec's typed
decoder in C (no Python walk: about the cost of the untyped decode). Only a message with
a list, a dict or bytes values falls back to an untyped decode and a walk.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

#: containers nested deeper than this (the message dict itself is depth 1) are refused
MAX_DEPTH = 64

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()
# the fast path: a flat message (msgspec refuses str and bytes in one union: bytes
# values, like containers, take the walk)
_flat = msgspec.msgpack.Decoder(dict[str, Union[str, int, float, bool, None]])  # noqa: UP007
_LEAF = frozenset({str, bytes, int, float, bool, type(None)})


class MalformedMessage(msgspec.DecodeError):
    """Bytes from another process or the broker that are not a message of the contract."""


def encode_message(message: Any) -> bytes:
    """msgpack bytes of a message dict; ``TypeError`` naming the problem otherwise."""
    if not isinstance(message, dict):
        raise TypeError(f"message must be a dict, got {type(message).__name__}")
    try:
        data = _encoder.encode(message)
    except RecursionError:
        raise TypeError(f"message nests deeper than {MAX_DEPTH} levels") from None
    except (TypeError, OverflowError, ValueError) as exc:
        raise TypeError(
            f"message cannot be encoded ({exc}); messages may hold str, bytes, int "
            "(64-bit), float, bool, None, list and dict values"
        ) from exc
    try:  # walk the dict instead of decoding what was just encoded (a decode copies
        # every str and bytes value: for a 1 MB message, a megabyte)
        if message.get("type", "").__class__ is not str:
            raise MalformedMessage("its 'type' is not a str")
        _check(message)
    except MalformedMessage:
        # a class the walk does not take (an enum or another subclass, UUID, ...) or
        # a real problem: the receiver's own check of the bytes decides
        try:
            decode_message(data)
        except MalformedMessage as exc:
            raise TypeError(f"message refused: {exc}") from None
    return data


def decode_message(data: bytes | memoryview) -> dict[str, Any]:
    """The message in ``data``; :class:`MalformedMessage` if it is outside the contract
    (never another exception)."""
    try:
        out = _flat.decode(data)
    except msgspec.ValidationError:
        out = _slow_decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise MalformedMessage(f"not a msgpack message: {exc}") from None
    t = out.get("type", "")
    if t.__class__ is not str:
        raise MalformedMessage(f"its 'type' is a {type(t).__name__}, not a str")
    return out


def _slow_decode(data: bytes | memoryview) -> dict[str, Any]:
    try:
        out = _decoder.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise MalformedMessage(f"not a msgpack message: {exc}") from None
    if out.__class__ is not dict:
        raise MalformedMessage(f"not a map but a {type(out).__name__}")
    _check(out)
    return out


def _check(message: dict[Any, Any]) -> None:
    """Walk a message (no recursion): keys, value types and depth. Exact classes only,
    so that what passes encodes to an equal message the receiver accepts (tuples travel
    as lists); the sender walks the user's dict with it too."""
    stack: list[tuple[Any, int]] = [(message, 1)]
    while stack:
        node, depth = stack.pop()
        if node.__class__ is dict or depth == 1:
            for k in node:
                if k.__class__ is not str:
                    raise MalformedMessage(
                        f"a {type(k).__name__} key ({k!r:.40}): keys must be str"
                    )
            values = node.values()
        else:
            values = node
        for v in values:
            cls = v.__class__
            if cls is dict or cls is list or cls is tuple:
                if depth >= MAX_DEPTH:
                    raise MalformedMessage(f"nests deeper than {MAX_DEPTH} levels")
                stack.append((v, depth + 1))
            elif cls not in _LEAF:
                raise MalformedMessage(
                    f"a {cls.__name__} value: messages may hold str, bytes, int, float, "
                    "bool, None, list and dict values"
                )


def encode_args(*args: Any) -> bytes:
    return _encoder.encode(list(args))


def decode_args(data: bytes | memoryview) -> list[Any]:
    out = _decoder.decode(data)
    if not isinstance(out, list):
        raise msgspec.DecodeError("control arguments are not a list")
    return out
