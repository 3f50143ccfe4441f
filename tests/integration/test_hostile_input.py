"""Issue 12 (points 1, 8, 9a) with real separate processes on one host namespace:
Unicode names, payloads outside the contract and crafted incarnation-0 names never
cost another message, and every drop is counted."""

from __future__ import annotations

import msgspec
import pytest

from hybrid_layer import names
from hybrid_layer.envelope import MAX_DEPTH
from tests.remote import wait_until

pytestmark = pytest.mark.slow

THREE = "\u0663"  # ARABIC-INDIC DIGIT THREE: channels' \d (and the tutorial's \w+) accept it


def test_unicode_names_and_their_neighbours_all_arrive(remotes) -> None:  # type: ignore[no-untyped-def]
    """A group ``chat_٣``, a normal channel ``jobs٣`` and a ``new_channel("specific٣.")``
    get their messages, interleaved with a plain neighbour's in the same inbox; nothing
    is dropped as corrupt (before the fix, the first such record reset the inbox)."""
    receiver, sender = remotes(2, capacity=1000)
    mine = receiver.call("new_channel", f"specific{THREE}.")
    assert mine.startswith(f"specific{THREE}.")
    plain = receiver.call("new_channel")
    receiver.call("group_add", f"chat_{THREE}", mine)
    n = 50
    receiver.call("collect", mine, 2 * n)  # direct + group copies
    receiver.call("collect", plain, n)
    receiver.call("collect", f"jobs{THREE}", n)
    assert wait_until(lambda: True, 0.3)  # the normal-channel reader registers
    for k in range(n):
        sender.call("send", plain, {"type": "m", "k": k})
        sender.call("send", mine, {"type": "direct", "k": k})
        sender.call("group_send", f"chat_{THREE}", {"type": "group", "k": k})
        sender.call("send", f"jobs{THREE}", {"type": "job", "k": k})
    got_plain = receiver.call("wait_collected", plain, 20)
    got_mine = receiver.call("wait_collected", mine, 20)
    got_jobs = receiver.call("wait_collected", f"jobs{THREE}", 20)
    assert [m["k"] for m in got_plain] == list(range(n))
    assert [m["k"] for m in got_mine if m["type"] == "direct"] == list(range(n))
    assert [m["k"] for m in got_mine if m["type"] == "group"] == list(range(n))
    assert [m["k"] for m in got_jobs] == list(range(n))
    stats = receiver.call("stats")
    assert stats.dropped.get("corrupt", 0) == 0, stats.dropped


def _deep(depth: int) -> bytes:
    """A msgpack map whose one value nests ``depth`` arrays: about ``depth`` bytes."""
    return b"\x81\xa1d" + b"\x91" * depth + b"\x00"


MALFORMED = [
    _deep(1000),  # 1 KB nested 1,000 deep: RecursionError out of receive() before
    _deep(MAX_DEPTH),  # one level past the limit (the map is level 1)
    msgspec.msgpack.encode({"type": "x", "e": msgspec.msgpack.Ext(5, b"ext")}),
    msgspec.msgpack.encode({"type": "x", 7: "int key"}),
    msgspec.msgpack.encode({"type": "x", "d": {b"k": 1}}),  # nested bytes key
    msgspec.msgpack.encode({"type": 12}),
    msgspec.msgpack.encode([1, 2]),  # not a map
    b"\xc1",  # not msgpack
]


def test_malformed_payloads_are_dropped_counted_and_the_next_one_arrives(remotes) -> None:  # type: ignore[no-untyped-def]
    """A peer that bypasses ``encode_message`` (another version, a bug, a hostile
    process of the same user) cannot end a consumer: each bad payload is one counted
    ``malformed`` drop and ``receive()`` returns the next good message."""
    receiver, sender = remotes(2)
    ch = receiver.call("new_channel")
    receiver.call("group_add", "room", ch)
    for payload in MALFORMED:
        assert sender.call("send_raw", ch, payload) == 0  # OK: it is in the inbox
    sender.call("group_send_raw", "room", _deep(1000))
    sender.call("send", ch, {"type": "good", "nested": {"a": [1, {"b": b"x"}]}})
    got = receiver.call("receive", ch, 10)
    assert got == {"type": "good", "nested": {"a": [1, {"b": b"x"}]}}
    stats = receiver.call("stats")
    assert stats.dropped.get("malformed") == len(MALFORMED) + 1, stats.dropped
    assert stats.received == 1


def test_send_refuses_what_a_receiver_would_drop(remotes) -> None:  # type: ignore[no-untyped-def]
    (proc,) = remotes(1)
    ch = proc.call("new_channel")
    deep: list[object] = []
    for _ in range(MAX_DEPTH):
        deep = [deep]
    for bad in (
        {"type": "x", "d": deep},
        {"type": "x", 1: 2},
        {"type": 3},
        {"type": "x", "e": msgspec.msgpack.Ext(1, b"")},
    ):
        with pytest.raises(Exception, match="TypeError"):
            proc.call("send", ch, bad)
        with pytest.raises(Exception, match="TypeError"):
            proc.call("group_send", "g", bad)


def test_incarnation_zero_name_reaches_nobody(remotes) -> None:  # type: ignore[no-untyped-def]
    """A crafted name with gen 0 for a live slot is no one's channel: dropped and
    counted as ``no_channel`` by the sender, never written into the slot holder's inbox
    (the ring writer takes gen 0 as "any incarnation")."""
    owner, sender = remotes(2)
    real = owner.call("new_channel")
    addr = names.parse(real)
    assert addr is not None and addr.gen > 0
    crafted = f"specific.{addr.host_id}.{addr.slot:x}.0!{addr.bucket:x}.abcdef"
    sender.call("send", crafted, {"type": "stray"})
    sender.call("send", real, {"type": "real"})
    assert owner.call("receive", real, 10) == {"type": "real"}
    s = sender.call("stats")
    assert s.sent == 1
    assert s.dropped.get("no_channel") == 1, s.dropped


async def test_overlong_name_from_the_broker_is_dropped_not_raised(layer) -> None:  # type: ignore[no-untyped-def]
    """A broker frame may carry a destination of up to 64 KiB; one that parses as a
    channel of this host but is no valid channels name (100+ characters, over the ring's
    name field) is a counted ``no_channel`` drop for the leader, not an exception."""
    real = await layer.new_channel()
    p = layer._p()
    addr = names.parse(real)
    forged = "x" * 5000 + real[real.index(".") :]
    assert names.parse(forged) == addr
    from hybrid_layer.shm.registry import NO_CHANNEL

    assert p.deliver_direct(forged, msgspec.msgpack.encode({"type": "x"}), 1e12) == NO_CHANNEL
    assert layer.statistics().dropped.get("no_channel") == 1
