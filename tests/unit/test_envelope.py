"""Unit and property tests for message encoding (``hybrid_layer.envelope``)."""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid_layer.envelope import (
    MAX_DEPTH,
    MalformedMessage,
    decode_args,
    decode_message,
    encode_args,
    encode_message,
)

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
_messages = st.dictionaries(st.text(max_size=12), _values, max_size=6).filter(
    lambda m: isinstance(m.get("type", ""), str)  # the contract: a str type if present
)


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


# ====================================================================== issue 12: the contract
def _nest(depth: int) -> Any:
    """``depth`` nested lists: inside a message they reach level ``depth + 1``."""
    v: Any = 0
    for _ in range(depth):
        v = [v]
    return v


class TestContract:
    """Whatever arrives is a message of the contract or ``MalformedMessage`` (dropped and
    counted by receive()); what a receiver would drop, ``encode_message`` refuses."""

    def test_1kb_nested_1000_deep_is_malformed_not_recursion_error(self) -> None:
        data = b"\x81\xa1d" + b"\x91" * 1000 + b"\x00"
        with pytest.raises(MalformedMessage):
            decode_message(data)

    def test_depth_limit_exact(self) -> None:
        ok = {"type": "x", "d": _nest(MAX_DEPTH - 1)}
        assert decode_message(encode_message(ok)) == ok
        bad = {"type": "x", "d": _nest(MAX_DEPTH)}
        with pytest.raises(MalformedMessage, match="deeper"):
            decode_message(msgspec.msgpack.encode(bad))
        with pytest.raises(TypeError, match=f"deeper than {MAX_DEPTH}"):
            encode_message(bad)
        deep_dicts: Any = 0
        for _ in range(MAX_DEPTH):
            deep_dicts = {"k": deep_dicts}
        with pytest.raises(TypeError, match="deeper"):
            encode_message({"d": deep_dicts})

    def test_far_too_deep_to_encode_is_a_type_error(self) -> None:
        with pytest.raises(TypeError, match="deeper"):
            encode_message({"d": _nest(5000)})

    @pytest.mark.parametrize(
        ("message", "why"),
        [
            ({"type": "x", 1: "v"}, "int key"),
            ({"type": "x", "d": {2.5: "v"}}, "float key"),
            ({"type": "x", "l": [{b"k": 1}]}, "bytes key"),
            ({"type": "x", "e": msgspec.msgpack.Ext(1, b"x")}, "Ext value"),
            ({"type": "x", "l": [1, msgspec.msgpack.Ext(2, b"")]}, "Ext value"),
            ({"type": 5}, "'type' is a int"),
            ({"type": None}, "'type' is a NoneType"),
            ({"type": b"bytes"}, "'type' is a bytes"),
            ({"type": ["x"]}, "'type' is a list"),
        ],
    )
    def test_outside_the_contract(self, message: dict[Any, Any], why: str) -> None:
        with pytest.raises(MalformedMessage, match=why):
            decode_message(msgspec.msgpack.encode(message))
        with pytest.raises(TypeError, match=why):
            encode_message(message)

    def test_timestamp_ext_is_refused(self) -> None:
        import datetime

        message = {"type": "x", "at": datetime.datetime.now(datetime.UTC)}
        with pytest.raises(MalformedMessage, match="datetime"):
            decode_message(msgspec.msgpack.encode(message))
        with pytest.raises(TypeError, match="datetime"):
            encode_message(message)

    def test_malformed_is_a_decode_error(self) -> None:
        """(receive() and older callers catch msgspec.DecodeError)"""
        assert issubclass(MalformedMessage, msgspec.DecodeError)

    def test_flat_and_nested_fast_and_slow_paths_agree(self) -> None:
        flat = {"type": "chat.message", "message": "hi", "n": 3, "f": 1.5, "ok": True}
        assert _same(decode_message(encode_message(flat)), flat)
        with_bytes = {"type": "websocket.send", "bytes": b"\x00", "text": None}
        assert _same(decode_message(encode_message(with_bytes)), with_bytes)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=200))
def test_fuzz_decode_message(data: bytes) -> None:
    """Arbitrary bytes: a message of the contract, or MalformedMessage; nothing else."""
    try:
        out = decode_message(data)
    except MalformedMessage:
        return
    _assert_contract(out, 1)
    assert isinstance(out.get("type", ""), str)


_wild_scalars = st.one_of(
    _scalars,
    st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=4)),
)
_wild = st.recursive(
    _wild_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers(0, 3)), inner, max_size=3),
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=st.dictionaries(st.one_of(st.text(max_size=5), st.integers(0, 3)), _wild))
def test_fuzz_send_refuses_exactly_what_receive_drops(message: dict[Any, Any]) -> None:
    """encode_message refuses (TypeError) exactly the messages whose bytes the receiver
    would call malformed; what it accepts arrives equal."""
    _send_refuses_exactly_what_receive_drops(message)


def _send_refuses_exactly_what_receive_drops(message: dict[Any, Any]) -> None:
    raw = msgspec.msgpack.encode(message)
    try:
        got = decode_message(raw)
    except MalformedMessage:
        with pytest.raises(TypeError):
            encode_message(message)
        return
    assert _same(decode_message(encode_message(message)), got)


def _assert_contract(v: Any, depth: int) -> None:
    if type(v) in (dict, list):
        assert depth <= MAX_DEPTH
    if type(v) is dict:
        for k, x in v.items():
            assert type(k) is str
            _assert_contract(x, depth + 1)
    elif type(v) is list:
        for x in v:
            _assert_contract(x, depth + 1)
    else:
        assert type(v) in (str, bytes, int, float, bool, type(None))


class _Str(enum.StrEnum):  # a str subclass msgspec encodes (as its value)
    A = "a"
    TYPE = "type"


class _Int(enum.IntEnum):
    ONE = 1


def _nest_mixed(depth: int, leaf: Any, use_tuple: bool) -> Any:
    v = leaf
    for i in range(depth):
        v = (v,) if use_tuple and i % 2 else [v]
    return v


_odd_scalars = st.one_of(
    _scalars,
    st.sampled_from(list(_Str)),
    st.sampled_from(list(_Int)),
    st.integers(2**63, U64_MAX),
)


def _odd_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(
            st.one_of(st.text(max_size=4), st.sampled_from(list(_Str))), inner, max_size=3
        ),
        st.dictionaries(st.text(max_size=2), inner, max_size=2).map(OrderedDict),
    )


_odd = st.recursive(_odd_scalars, _odd_containers, max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    message=st.dictionaries(st.one_of(st.text(max_size=5), st.sampled_from(list(_Str))), _odd),
    depth=st.integers(MAX_DEPTH - 3, MAX_DEPTH + 1),
    use_tuple=st.booleans(),
)
def test_the_senders_walk_refuses_exactly_what_the_receiver_drops(
    message: dict[Any, Any], depth: int, use_tuple: bool
) -> None:
    """encode_message checks a plain message by walking it, not by decoding what it
    encoded: the walk must agree with the receiver's check for tuples, str and int
    enums (keys and values), OrderedDicts, uint64 ints and nesting around MAX_DEPTH."""
    _send_refuses_exactly_what_receive_drops({**message, "deep": _nest_mixed(depth, 1, use_tuple)})


def test_a_plain_large_message_is_not_decoded_to_be_checked(monkeypatch: Any) -> None:
    """A 5 MB bytes value: encode_message walks the dict (one encode, no decode: a
    decode would copy the 5 MB once more on every send)."""
    import hybrid_layer.envelope as env

    calls: list[int] = []
    real = env.decode_message
    monkeypatch.setattr(env, "decode_message", lambda d: calls.append(1) or real(d))
    msg = {"type": "big", "payload": b"x" * 5_000_000, "meta": {"n": [1, 2, (3, "a")]}}
    data = env.encode_message(msg)
    assert calls == []
    assert real(data)["payload"] == msg["payload"]
    # what the walk does not know is still checked by the receiver's own code
    env.encode_message({"type": _Str.A, "v": 1})
    assert calls == [1]
