"""Unit and property tests for message encoding (``hybrid_layer.envelope``)."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid_layer.envelope import decode_args, decode_message, encode_args, encode_message

I64_MIN = -(2**63)
U64_MAX = 2**64 - 1


def round_trip(message: dict[str, Any]) -> dict[str, Any]:
    data = encode_message(message)
    assert isinstance(data, bytes)
    return decode_message(data)


# ====================================================================== TypeError texts
class TestRejects:
    @pytest.mark.parametrize(
        ("value", "type_name"),
        [
            ([("type", "x")], "list"),
            ("hello", "str"),
            (b"hello", "bytes"),
            (None, "NoneType"),
            (42, "int"),
            ((("a", 1),), "tuple"),
        ],
    )
    def test_not_a_dict(self, value: Any, type_name: str) -> None:
        with pytest.raises(TypeError) as info:
            encode_message(value)
        assert str(info.value) == f"message must be a dict, got {type_name}"

    @pytest.mark.parametrize(
        "value",
        [
            2**70,
            U64_MAX + 1,
            I64_MIN - 1,
            -(2**70),
        ],
    )
    def test_int_out_of_64_bits(self, value: int) -> None:
        with pytest.raises(TypeError) as info:
            encode_message({"type": "x", "n": value})
        text = str(info.value)
        assert text.startswith("message cannot be encoded (")
        assert "64-bit" in text
        assert isinstance(info.value.__cause__, OverflowError)  # chained, not swallowed

    @pytest.mark.parametrize("value", [object(), lambda: None, Exception("x"), ...])
    def test_unencodable_object(self, value: Any) -> None:
        with pytest.raises(TypeError) as info:
            encode_message({"type": "x", "v": value})
        text = str(info.value)
        assert "message cannot be encoded" in text
        assert "str, bytes, int" in text  # says what is allowed
        assert info.value.__cause__ is not None

    def test_nested_unencodable(self) -> None:
        with pytest.raises(TypeError, match="message cannot be encoded"):
            encode_message({"a": [{"b": [1, 2, object()]}]})
        with pytest.raises(TypeError, match="message cannot be encoded"):
            encode_message({"a": {"b": 2**64}})

    def test_dict_subclass_is_a_dict(self) -> None:
        assert round_trip(OrderedDict(type="x", n=1)) == {"type": "x", "n": 1}


# ====================================================================== round trips
class TestRoundTrip:
    def test_typical_websocket_message(self) -> None:
        msg = {"type": "websocket.send", "text": "hello", "bytes": None}
        assert round_trip(msg) == msg

    def test_bytes_stay_bytes(self) -> None:
        out = round_trip({"type": "x", "bytes": b"\x00\xff\x80binary", "empty": b""})
        assert type(out["bytes"]) is bytes
        assert out["bytes"] == b"\x00\xff\x80binary"
        assert type(out["empty"]) is bytes
        assert out["empty"] == b""

    def test_str_and_bytes_are_distinct(self) -> None:
        out = round_trip({"s": "abc", "b": b"abc"})
        assert type(out["s"]) is str
        assert type(out["b"]) is bytes

    @pytest.mark.parametrize(
        "value", [0, 1, -1, 127, 128, -33, 255, 2**31, 2**32, I64_MIN, 2**63 - 1, 2**63, U64_MAX]
    )
    def test_64_bit_ints(self, value: int) -> None:
        out = round_trip({"n": value})
        assert type(out["n"]) is int
        assert out["n"] == value

    @pytest.mark.parametrize(
        "value", [0.0, -0.0, 1.5, -2.25, 1e-300, 1e300, 5e-324, math.inf, -math.inf, 0.1]
    )
    def test_floats_exact(self, value: float) -> None:
        out = round_trip({"f": value})
        assert type(out["f"]) is float
        assert out["f"] == value
        assert math.copysign(1.0, out["f"]) == math.copysign(1.0, value)

    def test_nan(self) -> None:
        assert math.isnan(round_trip({"f": math.nan})["f"])

    def test_none_and_bools_keep_their_type(self) -> None:
        out = round_trip({"n": None, "t": True, "f": False, "zero": 0, "one": 1})
        assert out["n"] is None
        assert out["t"] is True
        assert out["f"] is False
        assert type(out["zero"]) is int
        assert type(out["one"]) is int

    def test_nested(self) -> None:
        msg = {
            "type": "chat.message",
            "payload": {
                "list": [1, "two", b"three", None, True, 4.5, [[], {}], {"k": [b"v"]}],
                "deep": {"a": {"b": {"c": {"d": [U64_MAX, I64_MIN]}}}},
            },
            "unicode": "héllo ☃ \U0001f600",
            "": "empty key",
        }
        assert round_trip(msg) == msg

    def test_tuples_arrive_as_lists(self) -> None:
        assert round_trip({"t": (1, (2, b"3"))}) == {"t": [1, [2, b"3"]]}

    def test_large_message(self) -> None:
        blob = bytes(range(256)) * 4096  # 1 MiB
        out = round_trip({"type": "big", "bytes": blob, "text": "x" * 100_000})
        assert out["bytes"] == blob
        assert len(out["text"]) == 100_000

    def test_decode_from_memoryview(self) -> None:
        data = encode_message({"a": b"b"})
        buf = bytearray(b"nn" + data)
        assert decode_message(memoryview(buf)[2:]) == {"a": b"b"}

    def test_encoding_is_deterministic(self) -> None:
        msg = {"type": "x", "a": [1, 2], "b": {"c": b"d"}}
        assert encode_message(msg) == encode_message(dict(msg))


class TestDecodeRejects:
    @pytest.mark.parametrize("value", [[1, 2], "str", 5, None, b"x"])
    def test_decode_message_requires_a_map(self, value: Any) -> None:
        with pytest.raises(msgspec.DecodeError, match="not a map"):
            decode_message(msgspec.msgpack.encode(value))

    @pytest.mark.parametrize("data", [b"", b"\xc1", b"\x81", b"\x81\xa1a"])
    def test_decode_message_garbage(self, data: bytes) -> None:
        with pytest.raises(msgspec.DecodeError):
            decode_message(data)

    def test_args_round_trip(self) -> None:
        assert decode_args(encode_args()) == []
        assert decode_args(encode_args("group", "chan!x", 12.5, None, b"b")) == [
            "group",
            "chan!x",
            12.5,
            None,
            b"b",
        ]

    @pytest.mark.parametrize("value", [{"a": 1}, "str", 5])
    def test_decode_args_requires_a_list(self, value: Any) -> None:
        with pytest.raises(msgspec.DecodeError, match="not a list"):
            decode_args(msgspec.msgpack.encode(value))


# ====================================================================== property
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=I64_MIN, max_value=U64_MAX),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
    ),
    max_leaves=20,
)
_messages = st.dictionaries(st.text(max_size=12), _values, max_size=6)


def _same(a: Any, b: Any) -> bool:
    """Equality that also tells bool from int and bytes from str, at every depth."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return bool(a == b)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=_messages)
def test_round_trip_property(message: dict[str, Any]) -> None:
    assert _same(round_trip(message), message)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    message=_messages,
    bad=st.one_of(
        st.integers(min_value=U64_MAX + 1),
        st.integers(max_value=I64_MIN - 1),
        st.builds(object),
    ),
    key=st.text(max_size=5),
)
def test_any_bad_value_is_a_type_error(message: dict[str, Any], bad: Any, key: str) -> None:
    message = dict(message)
    message[key] = [bad]
    with pytest.raises(TypeError, match="message cannot be encoded"):
        encode_message(message)
