"""Unit tests for CONFIG validation (``hybrid_layer.config``)."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import pytest

from hybrid_layer.config import (
    BROKER_KEYS,
    MIB,
    LayerConfig,
    default_host_id,
    parse_config,
)

_ID_RE = re.compile(r"h[0-9a-f]{10}")
_FIELDS = {f.name: f for f in dataclasses.fields(LayerConfig)}


def _field_default(name: str) -> Any:
    f = _FIELDS[name]
    assert f.default is not dataclasses.MISSING
    return f.default


def raises_for(key: str, **kwargs: Any) -> pytest.ExceptionInfo[ValueError]:
    """parse_config(**kwargs) raises a ValueError whose text names ``key``."""
    with pytest.raises(ValueError) as info:
        parse_config(**kwargs)
    assert f"'{key}'" in str(info.value), str(info.value)
    return info


# ====================================================================== defaults
class TestDefaults:
    def test_documented_defaults(self) -> None:
        c = parse_config()
        assert c.prefix == "asgi"
        assert c.expiry == 60.0
        assert c.group_expiry == 86400.0
        assert c.capacity == 100
        assert c.channel_capacity == ()
        assert c.shm_dir == "/dev/shm"
        assert c.mode == 0o600
        assert c.max_participants == 64
        assert c.channel_buckets == 4096
        assert c.max_groups_per_process == 16384
        assert c.max_message_bytes == _field_default("max_message_bytes")
        assert c.max_message_bytes >= 1 * MIB  # a 1 MB message must work by default
        assert c.host_id == default_host_id()

    def test_default_sizes(self) -> None:
        """Messages of up to 100 MiB by default (under RabbitMQ's 128 MiB), and a ring
        that does not grow with them: large records leave the ring (shm.spill)."""
        c = parse_config()
        assert c.max_message_bytes == 100 * MIB
        assert c.ring_bytes == 4 * MIB + 64 * 1024
        assert c.ring_bytes % 4096 == 0

    def test_none_and_empty_are_defaults(self) -> None:
        assert parse_config(None) == parse_config({}) == parse_config()

    def test_dataclass_defaults_agree_with_parse_config(self) -> None:
        """``LayerConfig()`` and ``parse_config({})`` should describe the same layer."""
        assert LayerConfig(host_id="x") == parse_config(host_id="x")

    def test_default_host_id(self) -> None:
        hid = default_host_id()
        assert _ID_RE.fullmatch(hid)
        assert default_host_id() == hid  # stable

    def test_frozen(self) -> None:
        c = parse_config()
        with pytest.raises(dataclasses.FrozenInstanceError):
            c.capacity = 5  # type: ignore[misc]

    def test_namespace_and_layout_key(self) -> None:
        c = parse_config(prefix="p1", host_id="h-2")
        assert c.namespace == "hl.p1.h-2"
        c2 = parse_config(
            prefix="p1",
            host_id="h-2",
            ring_bytes=8 * MIB,
            max_participants=8,
            channel_buckets=32,
            max_groups_per_process=64,
        )
        assert c2.layout_key() == (8 * MIB, 8, 32, 64)
        # values that need not agree across processes are not part of the key
        assert parse_config(capacity=3, expiry=5).layout_key() == parse_config().layout_key()


# ====================================================================== unknown / broker keys
class TestKeys:
    def test_unknown_key_is_named(self) -> None:
        with pytest.raises(ValueError, match="capactiy") as info:
            parse_config({"capactiy": 10})
        assert "capacity" in str(info.value)  # the known keys are listed

    def test_several_unknown_keys(self) -> None:
        with pytest.raises(ValueError) as info:
            parse_config(foo=1, bar=2)
        assert "foo" in str(info.value)
        assert "bar" in str(info.value)

    @pytest.mark.parametrize("key", sorted(BROKER_KEYS))
    def test_broker_keys_need_a_host(self, key: str) -> None:
        with pytest.raises(ValueError) as info:
            parse_config({key: "amqp://guest:guest@localhost/"})
        text = str(info.value)
        assert key in text
        assert "CONFIG['host']" in text

    def test_unknown_key_with_a_host(self) -> None:
        with pytest.raises(ValueError, match="nonsense"):
            parse_config(host="amqp://x", nonsense=1)

    def test_broker_keys_are_not_fields(self) -> None:
        assert "ssl_context" in BROKER_KEYS
        assert "host" not in _FIELDS  # stored as broker_urls

    def test_no_host_is_single_host(self) -> None:
        c = parse_config({})
        assert not c.broker and c.broker_urls == ()

    def test_host_url_and_defaults(self) -> None:
        c = parse_config(host="amqp://guest:guest@127.0.0.1:5672/")
        assert c.broker
        assert c.broker_urls == ("amqp://guest:guest@127.0.0.1:5672/",)
        assert c.groups_exchange == "groups"
        assert c.encryption_keys == ()
        assert c.on_disconnect is None and c.on_reconnect is None

    def test_host_list_is_a_cluster(self) -> None:
        urls = ["amqp://a:5672/", "amqps://b:5671/v"]
        assert parse_config(host=urls).broker_urls == tuple(urls)

    @pytest.mark.parametrize(
        "bad", ["", "http://x", "amqp://", "localhost:5672", [], ["amqp://x", 5], 42]
    )
    def test_bad_host(self, bad: Any) -> None:
        with pytest.raises(ValueError, match="CONFIG\\['host'\\]"):
            parse_config(host=bad)

    def test_ssl_context(self) -> None:
        import ssl

        ctx = ssl.create_default_context()
        assert parse_config(host="amqps://x/", ssl_context=ctx).ssl_context is ctx
        with pytest.raises(ValueError, match=r"ssl\.SSLContext"):
            parse_config(host="amqps://x/", ssl_context="yes")

    @pytest.mark.parametrize("bad", ["", "a b", "x" * 128, 5])
    def test_bad_groups_exchange(self, bad: Any) -> None:
        with pytest.raises(ValueError, match="groups_exchange"):
            parse_config(host="amqp://x/", groups_exchange=bad)

    def test_encryption_keys(self) -> None:
        c = parse_config(host="amqp://x/", symmetric_encryption_keys=["new", b"old"])
        assert c.encryption_keys == (b"new", b"old")

    @pytest.mark.parametrize("bad", ["one-key", [], [""], [3], None.__class__])
    def test_bad_encryption_keys(self, bad: Any) -> None:
        with pytest.raises(ValueError, match="symmetric_encryption_keys"):
            parse_config(host="amqp://x/", symmetric_encryption_keys=bad)

    @pytest.mark.parametrize(
        ("key", "bad"),
        [
            ("remote_capacity", 0),
            ("publish_batch", 0),
            ("publish_batch", 1025),
            ("publish_batch", 2.5),
            ("heartbeat", -1),
            ("heartbeat", 4000),
            ("connect_timeout", 0),
            ("on_disconnect", ""),
            ("on_reconnect", 5),
        ],
    )
    def test_bad_broker_numbers_and_types(self, key: str, bad: Any) -> None:
        with pytest.raises(ValueError, match=key):
            parse_config(host="amqp://x/", **{key: bad})

    def test_publish_batch(self) -> None:
        assert parse_config(host="amqp://x/").publish_batch == 128
        assert parse_config(host="amqp://x/", publish_batch=1).publish_batch == 1
        with pytest.raises(ValueError, match="publish_batch"):
            parse_config(publish_batch=4)  # a broker key without host

    def test_link_event_types(self) -> None:
        c = parse_config(host="amqp://x/", on_disconnect="link.down", on_reconnect="link.up")
        assert (c.on_disconnect, c.on_reconnect) == ("link.down", "link.up")

    def test_kwargs_override_dict(self) -> None:
        """channels passes CONFIG as keyword arguments; both forms combine."""
        c = parse_config({"capacity": 5, "expiry": 3}, capacity=7)
        assert (c.capacity, c.expiry) == (7, 3.0)

    def test_mapping_not_mutated(self) -> None:
        raw = {"capacity": 5}
        parse_config(raw)
        assert raw == {"capacity": 5}


# ====================================================================== identifiers
class TestIdentifiers:
    @pytest.mark.parametrize("key", ["prefix", "host_id"])
    @pytest.mark.parametrize("value", ["a", "A-z_09", "x" * 32])
    def test_valid(self, key: str, value: str) -> None:
        assert getattr(parse_config({key: value}), key) == value

    @pytest.mark.parametrize("key", ["prefix", "host_id"])
    @pytest.mark.parametrize(
        "value", ["", "x" * 33, "a.b", "a!b", "a b", "a/b", "é", 5, None, b"ab", ["a"]]
    )
    def test_invalid(self, key: str, value: Any) -> None:
        raises_for(key, **{key: value})

    @pytest.mark.parametrize("key", ["prefix", "host_id"])
    def test_trailing_newline_rejected(self, key: str) -> None:
        """BUG (reported): ``_ID_RE`` ends in ``$``, which also matches before a final
        newline, so ``"abc\\n"`` is accepted and ends up in shared-memory names (prefix)
        or in every minted channel name, which channels then rejects (host_id)."""
        raises_for(key, **{key: "abc\n"})


# ====================================================================== numbers
class TestNumbers:
    @pytest.mark.parametrize("key", ["expiry", "group_expiry"])
    def test_seconds_accept_int_and_float(self, key: str) -> None:
        c = parse_config({key: 5})
        assert getattr(c, key) == 5.0
        assert isinstance(getattr(c, key), float)
        assert getattr(parse_config({key: 0.5}), key) == 0.5
        assert getattr(parse_config({key: 0.001}), key) == 0.001

    @pytest.mark.parametrize("key", ["expiry", "group_expiry"])
    @pytest.mark.parametrize("value", [0, 0.0, -1, 0.0009, "60", None, True, False, [60]])
    def test_seconds_invalid(self, key: str, value: Any) -> None:
        raises_for(key, **{key: value})

    @pytest.mark.parametrize("key", ["expiry", "group_expiry"])
    def test_seconds_nan_rejected(self, key: str) -> None:
        """BUG (reported): NaN passes ``value < minimum`` (every comparison with NaN is
        false) and is accepted; with expiry=NaN nothing ever expires, silently."""
        raises_for(key, **{key: math.nan})

    @pytest.mark.parametrize(
        ("key", "minimum", "maximum"),
        [
            ("capacity", 1, None),
            ("max_participants", 2, 1024),
            ("channel_buckets", 16, 1 << 20),
            ("max_groups_per_process", 16, 1 << 22),
            ("receive_spin_us", 0, 10_000),
        ],
    )
    def test_integer_bounds(self, key: str, minimum: int, maximum: int | None) -> None:
        assert getattr(parse_config({key: minimum}), key) == minimum
        raises_for(key, **{key: minimum - 1})
        if maximum is not None:
            assert getattr(parse_config({key: maximum}), key) == maximum
            raises_for(key, **{key: maximum + 1})

    @pytest.mark.parametrize(
        "key",
        [
            "capacity",
            "max_participants",
            "channel_buckets",
            "max_groups_per_process",
            "max_message_bytes",
            "ring_bytes",
        ],
    )
    @pytest.mark.parametrize("value", [True, False, 100.0, 1e9, "100", None, math.nan])
    def test_integer_keys_reject_non_integers(self, key: str, value: Any) -> None:
        raises_for(key, **{key: value})

    def test_bool_message_says_number(self) -> None:
        with pytest.raises(ValueError, match="must be a number"):
            parse_config(capacity=True)

    def test_float_message_says_whole(self) -> None:
        with pytest.raises(ValueError, match="whole number"):
            parse_config(capacity=2.0)

    def test_below_minimum_message_says_at_least(self) -> None:
        with pytest.raises(ValueError, match="at least"):
            parse_config(capacity=0)


# ====================================================================== sizes
class TestSizes:
    def test_max_message_bytes_bounds(self) -> None:
        assert parse_config(max_message_bytes=1024).max_message_bytes == 1024
        raises_for("max_message_bytes", max_message_bytes=1023)
        big = parse_config(max_message_bytes=256 * MIB)
        assert big.max_message_bytes == 256 * MIB
        info = raises_for("max_message_bytes", max_message_bytes=256 * MIB + 1)
        assert "256 MiB" in str(info.value)

    def test_ring_does_not_depend_on_max_message_bytes(self) -> None:
        assert parse_config(max_message_bytes=256 * MIB).ring_bytes == 4 * MIB + 64 * 1024
        assert parse_config(max_message_bytes=1024).ring_bytes == 4 * MIB + 64 * 1024
        # a small ring with the largest messages: they travel out of it
        c = parse_config(ring_bytes=64 * 1024, max_message_bytes=256 * MIB)
        assert (c.ring_bytes, c.max_message_bytes) == (64 * 1024, 256 * MIB)

    def test_ring_bytes_minimum(self) -> None:
        raises_for("ring_bytes", ring_bytes=64 * 1024 - 1, max_message_bytes=1024)
        c = parse_config(ring_bytes=64 * 1024, max_message_bytes=1024)
        assert c.ring_bytes == 64 * 1024

    def test_ring_bytes_rounded_up_to_pages(self) -> None:
        c = parse_config(ring_bytes=65537, max_message_bytes=1024)
        assert c.ring_bytes == 69632


# ====================================================================== channel_capacity
class TestChannelCapacity:
    def test_globs_from_dict(self) -> None:
        c = parse_config(capacity=100, channel_capacity={"http.request": 200, "websocket.*": 20})
        assert c.capacity_for("http.request") == 200
        assert c.capacity_for("http.requests") == 100  # globs match whole names
        assert c.capacity_for("websocket.send!abc") == 20
        assert c.capacity_for("xwebsocket.send") == 100
        assert c.capacity_for("other") == 100

    def test_glob_wildcards(self) -> None:
        c = parse_config(channel_capacity={"chat?": 3, "[ab]x": 4})
        assert c.capacity_for("chat1") == 3
        assert c.capacity_for("chat12") == parse_config().capacity
        assert c.capacity_for("bx") == 4
        assert c.capacity_for("cx") == parse_config().capacity

    def test_compiled_regex_uses_match(self) -> None:
        c = parse_config(channel_capacity=[(re.compile(r"^http\.response.*"), 7)])
        assert c.capacity_for("http.response.abc!def") == 7
        assert c.capacity_for("xhttp.response") == 100
        # like channels_redis: re.match, anchored at the start only
        c2 = parse_config(channel_capacity=[(re.compile(r"web"), 9)])
        assert c2.capacity_for("websocket") == 9
        assert c2.capacity_for("my.web") == 100

    def test_first_match_wins_in_order(self) -> None:
        c = parse_config(channel_capacity=[("a.*", 1), ("a.b", 2)])
        assert c.capacity_for("a.b") == 1
        c2 = parse_config(channel_capacity=[("a.b", 2), ("a.*", 1)])
        assert c2.capacity_for("a.b") == 2
        assert c2.capacity_for("a.c") == 1

    def test_patterns_are_compiled(self) -> None:
        c = parse_config(channel_capacity={"x*": 5}, capacity=3)
        ((pattern, cap),) = c.channel_capacity
        assert isinstance(pattern, re.Pattern)
        assert cap == 5

    def test_none_means_no_patterns(self) -> None:
        assert parse_config(channel_capacity=None).channel_capacity == ()

    def test_empty_forms(self) -> None:
        assert parse_config(channel_capacity={}).channel_capacity == ()
        assert parse_config(channel_capacity=[]).channel_capacity == ()

    @pytest.mark.parametrize("value", ["http.*", 5, {"a", "b"}, object()])
    def test_not_a_mapping_or_list(self, value: Any) -> None:
        raises_for("channel_capacity", channel_capacity=value)

    @pytest.mark.parametrize("entry", [("a",), ("a", 1, 2), "ab", 5, None])
    def test_bad_entries(self, entry: Any) -> None:
        raises_for("channel_capacity", channel_capacity=[entry])

    @pytest.mark.parametrize("pattern", [5, None, b"http.*", 1.5])
    def test_bad_pattern_type(self, pattern: Any) -> None:
        raises_for("channel_capacity", channel_capacity=[(pattern, 5)])

    @pytest.mark.parametrize("cap", [0, -1, True, 2.5, "10", None])
    def test_bad_capacity_names_the_pattern(self, cap: Any) -> None:
        with pytest.raises(ValueError) as info:
            parse_config(channel_capacity={"http.*": cap})
        text = str(info.value)
        assert "channel_capacity" in text
        assert "http.*" in text


# ====================================================================== shm_dir, mode
class TestShmDirAndMode:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [("/dev/shm", "/dev/shm"), ("/tmp/x/", "/tmp/x"), ("/run//", "/run"), ("/", "/")],
    )
    def test_shm_dir(self, value: str, expected: str) -> None:
        assert parse_config(shm_dir=value).shm_dir == expected

    @pytest.mark.parametrize("value", ["dev/shm", "", "./x", 5, None, b"/dev/shm"])
    def test_shm_dir_invalid(self, value: Any) -> None:
        raises_for("shm_dir", shm_dir=value)

    @pytest.mark.parametrize("mode", [0o600, 0o640, 0o660, 0o700, 0o777])
    def test_mode(self, mode: int) -> None:
        assert parse_config(mode=mode).mode == mode

    @pytest.mark.parametrize(
        "mode", [0o400, 0o200, 0o500, 0o377, 0o1600, 0, -1, True, "0o600", 384.0, None]
    )
    def test_mode_invalid(self, mode: Any) -> None:
        raises_for("mode", mode=mode)

    def test_mode_without_owner_write_explains(self) -> None:
        with pytest.raises(ValueError, match="owner read and write"):
            parse_config(mode=0o444)
