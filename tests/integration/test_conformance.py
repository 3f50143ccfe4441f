"""Channels-contract conformance: one suite, two implementations.

Every test in the first part runs twice through the parametrized ``make_layer`` fixture:
against channels' own ``InMemoryChannelLayer`` (the oracle) and against
``HybridChannelLayer``. Both must show the same observable behaviour.

The second part ("hybrid only") covers what the oracle does not define or does
differently (it uses ``assert`` for non-dict messages, has no ``MessageTooLarge``, has no
participants, statistics or cross-thread use).

Timing: waits for something that must happen are generous (seconds); waits for
something that must *not* happen are short (``QUIET``); nothing asserts on speed.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
from asgiref.sync import async_to_sync
from channels.exceptions import ChannelFull as ChannelsChannelFull
from channels.layers import BaseChannelLayer, InMemoryChannelLayer

import hybrid_layer
from hybrid_layer import HybridChannelLayer
from hybrid_layer.names import parse

try:
    from channels.exceptions import MessageTooLarge as ChannelsMessageTooLarge
except ImportError:  # pragma: no cover - channels < 4.1
    ChannelsMessageTooLarge = None  # type: ignore[assignment,misc]

pytestmark = pytest.mark.timeout(60)

RECV_TIMEOUT = 5.0  # a message that must arrive
QUIET = 0.2  # how long we listen for a message that must not arrive
EXPIRY = 1  # expiry used by the expiry tests
PAST_EXPIRY = 1.2  # sleep that takes a message past EXPIRY
MB = 1_000_000

IMPLS = ["inmemory", "hybrid"]
KINDS = ["process", "normal"]

# A reference validator: the names the Channels spec accepts.
SPEC = BaseChannelLayer()


# ============================================================================ helpers
async def recv(layer: Any, channel: str, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
    """A receive that must succeed (fails the test instead of hanging)."""
    try:
        return await asyncio.wait_for(layer.receive(channel), timeout)
    except TimeoutError:
        pytest.fail(f"no message on {channel!r} within {timeout} s")


async def assert_nothing(layer: Any, channel: str, wait: float = QUIET) -> None:
    """Nothing is (or becomes, within ``wait``) receivable on ``channel``."""
    try:
        msg = await asyncio.wait_for(layer.receive(channel), wait)
    except TimeoutError:
        return
    pytest.fail(f"unexpected message on {channel!r}: {msg!r}")


async def make_channel(layer: Any, kind: str) -> str:
    """A process channel (``new_channel()``, has ``!``) or a normal one (no ``!``)."""
    if kind == "process":
        return str(await layer.new_channel())
    return f"normal.{uuid.uuid4().hex[:10]}"


async def cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# ============================================================================ fixtures
@pytest.fixture(params=IMPLS)
async def make_layer(
    request: pytest.FixtureRequest, layer_config: dict[str, Any]
) -> AsyncIterator[Callable[..., Any]]:
    """``make_layer(**overrides)`` -> a layer of the parametrized implementation.

    Overrides use the channels keyword names (``expiry``, ``capacity``,
    ``channel_capacity``, ``group_expiry``). Every layer made is closed at teardown.
    """
    impl = request.param
    made: list[Any] = []

    def make(**overrides: Any) -> Any:
        if impl == "inmemory":
            kw = {"expiry": layer_config["expiry"], **overrides}
            cc = kw.pop("channel_capacity", None)
            lay: Any = InMemoryChannelLayer(**kw)
            if cc is not None:
                # channels 4.3's InMemoryChannelLayer keeps the raw dict and never calls
                # compile_capacities() (its get_capacity then fails to unpack): the oracle
                # is given what BaseChannelLayer documents, compiled pairs.
                lay.channel_capacity = lay.compile_capacities(cc)
        else:
            lay = HybridChannelLayer(**{**layer_config, **overrides})
        made.append(lay)
        return lay

    make.impl = impl  # type: ignore[attr-defined]
    yield make
    for lay in made:
        await lay.close()


@pytest.fixture
def clayer(make_layer: Callable[..., Any]) -> Any:
    """The default layer of the parametrized implementation."""
    return make_layer()


@pytest.fixture
async def make_hybrid(layer_config: dict[str, Any]) -> AsyncIterator[Callable[..., Any]]:
    """Extra HybridChannelLayer objects on this test's namespace; all closed at teardown."""
    made: list[HybridChannelLayer] = []

    def make(**overrides: Any) -> HybridChannelLayer:
        lay = HybridChannelLayer(**{**layer_config, **overrides})
        made.append(lay)
        return lay

    yield make
    for lay in made:
        await lay.close()


# ############################################################################
# Part 1: conformance - the same assertions on InMemoryChannelLayer and hybrid
# ############################################################################


# ---------------------------------------------------------------------------- names
async def test_new_channel_names_are_valid_and_unique(clayer: Any) -> None:
    names = [await clayer.new_channel() for _ in range(300)]
    assert len(set(names)) == len(names), "new_channel() repeated a name"
    for n in names:
        assert isinstance(n, str)
        assert SPEC.require_valid_channel_name(n)
        assert "!" in n, f"a new_channel() name must be a process channel: {n!r}"
        assert n.startswith("specific."), n


async def test_new_channel_honours_prefix(clayer: Any) -> None:
    a = await clayer.new_channel("chat.")
    b = await clayer.new_channel("chat.")
    assert a != b
    for n in (a, b):
        assert n.startswith("chat."), n
        assert SPEC.require_valid_channel_name(n)
    # and the name works
    await clayer.send(a, {"type": "hello"})
    assert (await recv(clayer, a)) == {"type": "hello"}


# ---------------------------------------------------------------------------- send / receive
@pytest.mark.parametrize("kind", KINDS)
async def test_send_receive_round_trip(clayer: Any, kind: str) -> None:
    ch = await make_channel(clayer, kind)
    await clayer.send(ch, {"type": "test.message", "text": "hello"})
    assert await recv(clayer, ch) == {"type": "test.message", "text": "hello"}
    await assert_nothing(clayer, ch)


async def test_channels_are_independent(clayer: Any) -> None:
    a = await clayer.new_channel()
    b = await clayer.new_channel()
    await clayer.send(a, {"to": "a"})
    await clayer.send(b, {"to": "b"})
    await clayer.send("normal.x", {"to": "x"})
    assert await recv(clayer, b) == {"to": "b"}
    assert await recv(clayer, "normal.x") == {"to": "x"}
    assert await recv(clayer, a) == {"to": "a"}
    for ch in (a, b, "normal.x"):
        await assert_nothing(clayer, ch, 0.1)


async def test_receive_waits_for_a_later_send(clayer: Any) -> None:
    ch = await clayer.new_channel()
    t = asyncio.create_task(clayer.receive(ch))
    await asyncio.sleep(0.1)
    assert not t.done()
    await clayer.send(ch, {"late": True})
    assert await asyncio.wait_for(t, RECV_TIMEOUT) == {"late": True}


@pytest.mark.parametrize("kind", KINDS)
async def test_fifo_per_channel(clayer: Any, kind: str) -> None:
    ch = await make_channel(clayer, kind)
    n = 80
    for i in range(n):
        await clayer.send(ch, {"seq": i})
    got = [(await recv(clayer, ch))["seq"] for _ in range(n)]
    assert got == list(range(n))
    await assert_nothing(clayer, ch)


async def test_fifo_survives_a_pause_before_the_first_receive(clayer: Any) -> None:
    """Messages sent before and after a pause, with nobody receiving yet, keep their order.

    The pause lets background housekeeping run between the two bursts: a worker started
    after messages were already sent to its queue. The pause is also longer than
    nothing: unexpired messages (expiry 10 s) survive it.
    """
    proc = await clayer.new_channel()
    normal = "normal.late-worker"
    for i in range(10):
        await clayer.send(proc, {"seq": i})
        await clayer.send(normal, {"seq": i})
    await asyncio.sleep(1.3)
    for i in range(10, 20):
        await clayer.send(proc, {"seq": i})
        await clayer.send(normal, {"seq": i})
    # (the normal channel first: receiving on it must not depend on a receive elsewhere)
    got_normal = [(await recv(clayer, normal))["seq"] for _ in range(20)]
    got_proc = [(await recv(clayer, proc))["seq"] for _ in range(20)]
    assert got_proc == list(range(20)), "process channel"
    assert got_normal == list(range(20)), "normal channel"


async def test_fifo_with_interleaved_receives(clayer: Any) -> None:
    ch = await clayer.new_channel()
    expect = 0
    for burst in range(10):
        for i in range(burst + 1):
            await clayer.send(ch, {"seq": expect + i})
        for _ in range(burst + 1):
            assert (await recv(clayer, ch))["seq"] == expect
            expect += 1
    await assert_nothing(clayer, ch)


async def test_concurrent_receivers_on_a_normal_channel_get_each_message_once(
    clayer: Any,
) -> None:
    ch = "workers.queue"
    n_readers, n_msgs = 4, 60
    got: list[tuple[int, int]] = []
    all_in = asyncio.Event()

    async def reader(i: int) -> None:
        while True:
            m = await clayer.receive(ch)
            got.append((i, m["n"]))
            if len(got) >= n_msgs:
                all_in.set()
            await asyncio.sleep(0)  # let the other readers in

    tasks = [asyncio.create_task(reader(i)) for i in range(n_readers)]
    try:
        await asyncio.sleep(0.1)  # every reader is waiting
        for k in range(n_msgs):
            await clayer.send(ch, {"n": k})
            if k % 10 == 9:
                await asyncio.sleep(0.01)  # arrivals while readers are awake and asleep
        await asyncio.wait_for(all_in.wait(), 10)
        await asyncio.sleep(QUIET)  # would a duplicate still show up?
    finally:
        await cancel_all(tasks)
    nums = sorted(n for _, n in got)
    assert nums == list(range(n_msgs)), "a message was lost or delivered twice"


# ---------------------------------------------------------------------------- groups
async def test_group_add_send_discard(clayer: Any) -> None:
    a = await clayer.new_channel()
    b = await clayer.new_channel()
    c = await clayer.new_channel()
    await clayer.group_add("room", a)
    await clayer.group_add("room", b)
    await clayer.group_send("room", {"n": 1})
    assert await recv(clayer, a) == {"n": 1}
    assert await recv(clayer, b) == {"n": 1}
    await assert_nothing(clayer, c, 0.1)

    await clayer.group_discard("room", b)
    await clayer.group_send("room", {"n": 2})
    assert await recv(clayer, a) == {"n": 2}
    await assert_nothing(clayer, b)
    await assert_nothing(clayer, a, 0.1)


async def test_group_add_twice_delivers_once(clayer: Any) -> None:
    a = await clayer.new_channel()
    await clayer.group_add("room", a)
    await clayer.group_add("room", a)
    await clayer.group_send("room", {"once": True})
    assert await recv(clayer, a) == {"once": True}
    await assert_nothing(clayer, a)
    # one discard is enough after two adds
    await clayer.group_discard("room", a)
    await clayer.group_send("room", {"once": False})
    await assert_nothing(clayer, a)


async def test_channel_in_several_groups(clayer: Any) -> None:
    a = await clayer.new_channel()
    b = await clayer.new_channel()
    await clayer.group_add("g1", a)
    await clayer.group_add("g2", a)
    await clayer.group_add("g2", b)
    await clayer.group_send("g1", {"g": 1})
    await clayer.group_send("g2", {"g": 2})
    assert [await recv(clayer, a), await recv(clayer, a)] == [{"g": 1}, {"g": 2}]
    assert await recv(clayer, b) == {"g": 2}
    await assert_nothing(clayer, a, 0.1)
    await assert_nothing(clayer, b, 0.1)

    await clayer.group_discard("g1", a)  # still in g2
    await clayer.group_send("g1", {"g": 11})
    await clayer.group_send("g2", {"g": 22})
    assert await recv(clayer, a) == {"g": 22}
    assert await recv(clayer, b) == {"g": 22}
    await assert_nothing(clayer, a)


async def test_group_messages_keep_order_per_member(clayer: Any) -> None:
    a = await clayer.new_channel()
    b = await clayer.new_channel()
    await clayer.group_add("room", a)
    await clayer.group_add("room", b)
    for i in range(30):
        await clayer.group_send("room", {"seq": i})
    for ch in (a, b):
        assert [(await recv(clayer, ch))["seq"] for _ in range(30)] == list(range(30))


async def test_group_send_and_direct_send_interleave_in_order(clayer: Any) -> None:
    a = await clayer.new_channel()
    await clayer.group_add("room", a)
    await clayer.send(a, {"seq": 0})
    await clayer.group_send("room", {"seq": 1})
    await clayer.send(a, {"seq": 2})
    await clayer.group_send("room", {"seq": 3})
    assert [(await recv(clayer, a))["seq"] for _ in range(4)] == [0, 1, 2, 3]


async def test_group_with_a_normal_channel_member(clayer: Any) -> None:
    await clayer.group_add("room", "normal.member")
    await clayer.group_send("room", {"to": "normal"})
    assert await recv(clayer, "normal.member") == {"to": "normal"}


async def test_group_send_to_empty_or_unknown_group(clayer: Any) -> None:
    a = await clayer.new_channel()
    await clayer.group_send("nobody-here", {"lost": True})  # no error
    await clayer.group_add("room", a)
    await clayer.group_discard("room", a)
    await clayer.group_send("room", {"lost": True})  # emptied group: no error
    await assert_nothing(clayer, a)


async def test_group_discard_of_non_member_is_harmless(clayer: Any) -> None:
    a = await clayer.new_channel()
    b = await clayer.new_channel()
    await clayer.group_discard("never-created", a)  # no error
    await clayer.group_add("room", a)
    await clayer.group_discard("room", b)  # b never joined: no error, a stays
    await clayer.group_send("room", {"still": "there"})
    assert await recv(clayer, a) == {"still": "there"}
    await assert_nothing(clayer, b, 0.1)


# ---------------------------------------------------------------------------- capacity
@pytest.mark.parametrize("kind", KINDS)
async def test_capacity_exactly_capacity_messages_fit(
    make_layer: Callable[..., Any], kind: str
) -> None:
    lay = make_layer(capacity=3)
    ch = await make_channel(lay, kind)
    for i in range(3):
        await lay.send(ch, {"n": i})
    with pytest.raises(ChannelsChannelFull):
        await lay.send(ch, {"n": 3})
    with pytest.raises(ChannelsChannelFull):  # still full, raising again
        await lay.send(ch, {"n": 4})
    # one out, one more fits, and the rejected ones never arrive
    assert (await recv(lay, ch))["n"] == 0
    await lay.send(ch, {"n": 5})
    with pytest.raises(ChannelsChannelFull):
        await lay.send(ch, {"n": 6})
    assert [(await recv(lay, ch))["n"] for _ in range(3)] == [1, 2, 5]
    await assert_nothing(lay, ch)


async def test_capacity_is_per_channel(make_layer: Callable[..., Any]) -> None:
    lay = make_layer(capacity=2)
    a = await lay.new_channel()
    b = await lay.new_channel()
    for ch in (a, b, "normal.a"):
        await lay.send(ch, {"n": 1})
        await lay.send(ch, {"n": 2})
    for ch in (a, b, "normal.a"):
        with pytest.raises(ChannelsChannelFull):
            await lay.send(ch, {"n": 3})


async def test_channel_capacity_with_a_glob(make_layer: Callable[..., Any]) -> None:
    lay = make_layer(capacity=5, channel_capacity={"tiny.*": 2})
    small = await lay.new_channel("tiny.")
    big = await lay.new_channel("large.")
    for ch, cap in ((small, 2), ("tiny.worker", 2), (big, 5), ("other.worker", 5)):
        for i in range(cap):
            await lay.send(ch, {"n": i})
        with pytest.raises(ChannelsChannelFull):
            await lay.send(ch, {"n": cap})


async def test_channel_capacity_with_a_compiled_regex(make_layer: Callable[..., Any]) -> None:
    lay = make_layer(capacity=4, channel_capacity={re.compile(r"^http\.(request|body)"): 1})
    for ch, cap in (("http.request", 1), ("http.body.x", 1), ("http.response", 4)):
        for i in range(cap):
            await lay.send(ch, {"n": i})
        with pytest.raises(ChannelsChannelFull):
            await lay.send(ch, {"n": cap})
    proc = await lay.new_channel("http.request.")
    await lay.send(proc, {"n": 0})
    with pytest.raises(ChannelsChannelFull):
        await lay.send(proc, {"n": 1})


async def test_group_send_never_raises_channel_full(make_layer: Callable[..., Any]) -> None:
    lay = make_layer(capacity=2)
    full = await lay.new_channel()
    free = await lay.new_channel()
    await lay.send(full, {"n": "a"})
    await lay.send(full, {"n": "b"})
    await lay.group_add("room", full)
    await lay.group_add("room", free)
    for i in range(2):
        await lay.group_send("room", {"n": i})  # must not raise
    # the member with room got everything, the full one its own two and nothing more
    # (both copies have reached `free`, so both were placed while `full` was still full;
    # a third could be placed later, after `full` is read, and rightly be delivered)
    assert [(await recv(lay, free))["n"] for _ in range(2)] == [0, 1]
    assert [(await recv(lay, full))["n"] for _ in range(2)] == ["a", "b"]
    await assert_nothing(lay, full)
    # the full member is still a member: new group messages reach it now it has room
    await lay.group_send("room", {"n": "after"})
    assert (await recv(lay, full))["n"] == "after"


# ---------------------------------------------------------------------------- expiry
async def test_expired_messages_are_not_received(make_layer: Callable[..., Any]) -> None:
    lay = make_layer(expiry=EXPIRY)
    proc = await lay.new_channel()
    member = await lay.new_channel()
    normal = "normal.expiring"
    await lay.group_add("room", member)
    for ch in (proc, normal):
        await lay.send(ch, {"old": 1})
        await lay.send(ch, {"old": 2})
    await lay.group_send("room", {"old": "group"})
    await asyncio.sleep(PAST_EXPIRY)
    # (InMemory also drops a channel from its groups when one of its messages expires,
    # so the fresh message for the group member goes direct.)
    for ch in (proc, normal, member):
        await lay.send(ch, {"fresh": ch})
    for ch in (proc, normal, member):
        assert await recv(lay, ch) == {"fresh": ch}
    for ch in (proc, normal, member):
        await assert_nothing(lay, ch, 0.1)


async def test_group_expiry_removes_old_memberships(make_layer: Callable[..., Any]) -> None:
    lay = make_layer(group_expiry=0.5)
    a = await lay.new_channel()
    await lay.group_add("room", a)
    await lay.group_send("room", {"n": 1})
    assert await recv(lay, a) == {"n": 1}
    # InMemory compares join times with int(time.time()) - group_expiry: 1.6 s is always
    # enough for group_expiry=0.5
    await asyncio.sleep(1.6)
    await lay.group_send("room", {"n": 2})
    await assert_nothing(lay, a)
    # joining again works
    await lay.group_add("room", a)
    await lay.group_send("room", {"n": 3})
    assert await recv(lay, a) == {"n": 3}


# ---------------------------------------------------------------------------- names
BAD_NAMES: list[Any] = [
    "a" * 100,  # length must be < 100
    "a" * 150,
    "",
    "has space",
    "slash/name",
    "colon:name",
    "unicodé",
    "two!bangs!x",
    123,
    None,
    b"bytes.name",
    ["list"],
]
BAD_GROUPS: list[Any] = [*BAD_NAMES, "group!bang"]


async def test_invalid_channel_names_raise_type_error(clayer: Any) -> None:
    good = await clayer.new_channel()
    for bad in BAD_NAMES:
        with pytest.raises(TypeError):
            await clayer.send(bad, {"x": 1})
        with pytest.raises(TypeError):
            await asyncio.wait_for(clayer.receive(bad), RECV_TIMEOUT)
        with pytest.raises(TypeError):
            await clayer.group_add("room", bad)
        with pytest.raises(TypeError):
            await clayer.group_discard("room", bad)
    # nothing half-done: the good channel still works and got nothing
    await clayer.group_send("room", {"x": 2})
    await assert_nothing(clayer, good, 0.1)


async def test_invalid_group_names_raise_type_error(clayer: Any) -> None:
    ch = await clayer.new_channel()
    for bad in BAD_GROUPS:
        with pytest.raises(TypeError):
            await clayer.group_add(bad, ch)
        with pytest.raises(TypeError):
            await clayer.group_discard(bad, ch)
        with pytest.raises(TypeError):
            await clayer.group_send(bad, {"x": 1})


async def test_names_just_under_the_limit_work(clayer: Any) -> None:
    ch = "c" * 99
    group = "g" * 99
    await clayer.send(ch, {"n": 1})
    assert await recv(clayer, ch) == {"n": 1}
    await clayer.group_add(group, ch)
    await clayer.group_send(group, {"n": 2})
    assert await recv(clayer, ch) == {"n": 2}
    await clayer.group_discard(group, ch)


# ---------------------------------------------------------------------------- flush
async def test_flush_empties_channels_and_groups(clayer: Any) -> None:
    a = await clayer.new_channel()
    b = await clayer.new_channel()
    for i in range(5):
        await clayer.send(a, {"old": i})
        await clayer.send("normal.flushme", {"old": i})
    await clayer.group_add("room", a)
    await clayer.group_add("room", b)
    await clayer.group_send("room", {"old": "group"})
    await clayer.flush()

    await assert_nothing(clayer, a)
    await assert_nothing(clayer, b, 0.1)
    await assert_nothing(clayer, "normal.flushme")
    await clayer.group_send("room", {"after": "flush"})  # the group is gone
    await assert_nothing(clayer, a, 0.1)
    await assert_nothing(clayer, b, 0.1)
    # the layer is fully usable afterwards
    await clayer.send(a, {"new": 1})
    await clayer.send("normal.flushme", {"new": 2})
    assert await recv(clayer, a) == {"new": 1}
    assert await recv(clayer, "normal.flushme") == {"new": 2}
    await clayer.group_add("room", b)
    await clayer.group_send("room", {"new": 3})
    assert await recv(clayer, b) == {"new": 3}


async def test_flush_frees_capacity(make_layer: Callable[..., Any]) -> None:
    lay = make_layer(capacity=2)
    ch = await lay.new_channel()
    await asyncio.sleep(0.2)  # let start-up housekeeping pass: what follows must not need it
    await lay.send(ch, {"n": 1})
    await lay.send(ch, {"n": 2})
    with pytest.raises(ChannelsChannelFull):
        await lay.send(ch, {"n": 3})
    await lay.flush()
    await lay.send(ch, {"n": 4})
    await lay.send(ch, {"n": 5})
    assert [(await recv(lay, ch))["n"] for _ in range(2)] == [4, 5]


# ---------------------------------------------------------------------------- message values
ALL_TYPES: dict[str, Any] = {
    "type": "all.types",
    "text": "héllo wörld ✓ \x00 nul",
    "empty_str": "",
    "bytes": b"\x00\x01\xfe\xff binary",
    "empty_bytes": b"",
    "int_small": 7,
    "int_neg": -7,
    "int_zero": 0,
    "int_max64": 2**63 - 1,
    "int_min64": -(2**63),
    "int_big32": 2**32 + 5,
    "float": 0.1,
    "float_neg_zero": -0.0,
    "float_big": 1.7976931348623157e308,
    "float_tiny": 5e-324,
    "float_inf": math.inf,
    "float_ninf": -math.inf,
    "true": True,
    "false": False,
    "none": None,
    "list": [1, "two", b"three", None, 4.5, [6, [7, {"eight": 8}]]],
    "empty_list": [],
    "dict": {"a": {"b": {"c": [b"deep", {"d": None}]}}},
    "empty_dict": {},
    "": "empty key",
}


def assert_same_value(got: Any, want: Any, path: str = "msg") -> None:
    """Equal, with exact types (bool is not int, bytes stay bytes, floats stay floats)."""
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, dict):
        assert set(got) == set(want), f"{path}: keys {set(got)} != {set(want)}"
        for k in want:
            assert_same_value(got[k], want[k], f"{path}[{k!r}]")
    elif isinstance(want, list):
        assert len(got) == len(want), f"{path}: length"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_value(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), path
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"
        if isinstance(want, float):
            assert math.copysign(1, got) == math.copysign(1, want), f"{path}: sign"


@pytest.mark.parametrize("kind", KINDS)
async def test_message_values_round_trip_with_types(clayer: Any, kind: str) -> None:
    ch = await make_channel(clayer, kind)
    await clayer.send(ch, ALL_TYPES)
    assert_same_value(await recv(clayer, ch), ALL_TYPES)


async def test_message_values_round_trip_through_a_group(clayer: Any) -> None:
    ch = await clayer.new_channel()
    await clayer.group_add("room", ch)
    await clayer.group_send("room", ALL_TYPES)
    assert_same_value(await recv(clayer, ch), ALL_TYPES)


async def test_nan_round_trips(clayer: Any) -> None:
    ch = await clayer.new_channel()
    await clayer.send(ch, {"nan": math.nan})
    assert math.isnan((await recv(clayer, ch))["nan"])


async def test_message_is_copied_at_send(clayer: Any) -> None:
    ch = await clayer.new_channel()
    msg: dict[str, Any] = {"list": [1, 2], "d": {"k": "v"}}
    await clayer.send(ch, msg)
    msg["list"].append(3)
    msg["d"]["k"] = "changed"
    msg["added"] = True
    assert await recv(clayer, ch) == {"list": [1, 2], "d": {"k": "v"}}


# ---------------------------------------------------------------------------- cancellation
@pytest.mark.parametrize("kind", KINDS)
async def test_cancelled_waiting_receive_loses_nothing(clayer: Any, kind: str) -> None:
    ch = await make_channel(clayer, kind)
    t = asyncio.create_task(clayer.receive(ch))
    await asyncio.sleep(0.1)
    assert not t.done()
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    await clayer.send(ch, {"after": "cancel"})
    assert await recv(clayer, ch) == {"after": "cancel"}
    await assert_nothing(clayer, ch)


@pytest.mark.parametrize("kind", KINDS)
async def test_many_timed_out_receives_lose_nothing(clayer: Any, kind: str) -> None:
    ch = await make_channel(clayer, kind)
    for _ in range(20):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(clayer.receive(ch), 0.005)
    for i in range(5):
        await clayer.send(ch, {"seq": i})
    assert [(await recv(clayer, ch))["seq"] for _ in range(5)] == list(range(5))


@pytest.mark.parametrize("kind", KINDS)
async def test_receive_cancelled_as_its_message_arrives_loses_nothing(
    clayer: Any, kind: str
) -> None:
    """Cancel a receive right after the message it waits for was sent (before or after
    the receiver's wake-up ran): the message is either returned by that receive or by
    the next one - never lost, never twice."""
    ch = await make_channel(clayer, kind)
    received: list[int] = []
    for i in range(24):
        t = asyncio.create_task(clayer.receive(ch))
        await asyncio.sleep(0.02)  # t is asleep
        await clayer.send(ch, {"seq": i})
        for _ in range(i % 3):  # 0, 1 or 2 turns of the loop before the cancel
            await asyncio.sleep(0)
        t.cancel()
        try:
            received.append((await t)["seq"])
        except asyncio.CancelledError:
            received.append((await recv(clayer, ch))["seq"])
    assert received == list(range(24))
    await assert_nothing(clayer, ch)


async def test_cancelled_receiver_does_not_steal_from_other_receivers(clayer: Any) -> None:
    ch = "normal.shared"
    t1 = asyncio.create_task(clayer.receive(ch))
    t2 = asyncio.create_task(clayer.receive(ch))
    await asyncio.sleep(0.1)
    await clayer.send(ch, {"n": 1})
    t1.cancel()
    res = await asyncio.gather(t1, asyncio.wait_for(t2, RECV_TIMEOUT), return_exceptions=True)
    got = [r for r in res if isinstance(r, dict)]
    if not got:  # t1 was cancelled after it had been woken: the message stays queued
        got = [await recv(clayer, ch)]
    assert got == [{"n": 1}]
    await assert_nothing(clayer, ch)


# ---------------------------------------------------------------------------- large messages
@pytest.mark.parametrize("kind", KINDS)
async def test_one_megabyte_messages_round_trip(clayer: Any, kind: str) -> None:
    ch = await make_channel(clayer, kind)
    blob = bytes(range(256)) * (MB // 256) + b"end!"
    text = "x" * (MB - 1) + "é"
    await clayer.send(ch, {"blob": blob})
    await clayer.send(ch, {"text": text})
    got1 = await recv(clayer, ch)
    got2 = await recv(clayer, ch)
    assert [list(got1), list(got2)] == [["blob"], ["text"]], "FIFO: order of arrival"
    assert type(got1["blob"]) is bytes and got1["blob"] == blob
    assert got2["text"] == text


async def test_one_megabyte_group_message(clayer: Any) -> None:
    a = await clayer.new_channel()
    b = await clayer.new_channel()
    await clayer.group_add("big", a)
    await clayer.group_add("big", b)
    blob = b"\xab" * MB
    await clayer.group_send("big", {"blob": blob})
    for ch in (a, b):
        got = await recv(clayer, ch)
        assert got["blob"] == blob


async def test_several_queued_one_megabyte_messages(clayer: Any) -> None:
    ch = await clayer.new_channel()
    n = 6
    for i in range(n):
        await clayer.send(ch, {"i": i, "blob": bytes([i]) * MB})
    for i in range(n):
        got = await recv(clayer, ch)
        assert got["i"] == i and got["blob"] == bytes([i]) * MB


# ############################################################################
# Part 2: hybrid only - where the oracle does not define the behaviour
# ############################################################################


# ---------------------------------------------------------------------------- bad messages
NOT_DICTS: list[Any] = [None, [], ["type", "x"], "text", b"bytes", 1, ("a", "b")]
UNENCODABLE: list[dict[str, Any]] = [
    {"x": object()},
    {"x": 2**70},
    {"x": -(2**70)},
    {"x": 2**64},
    {"x": [1, object()]},
    {"x": {"y": {"z": 2**100}}},
    {"x": complex(1, 2)},
]


async def test_hybrid_non_dict_message_is_type_error(layer: HybridChannelLayer) -> None:
    ch = await layer.new_channel()
    await layer.group_add("room", ch)
    for bad in NOT_DICTS:
        with pytest.raises(TypeError, match="dict"):
            await layer.send(ch, bad)
        with pytest.raises(TypeError, match="dict"):
            await layer.group_send("room", bad)
    await assert_nothing(layer, ch)


async def test_hybrid_unencodable_values_are_type_error(layer: HybridChannelLayer) -> None:
    ch = await layer.new_channel()
    await layer.group_add("room", ch)
    for bad in UNENCODABLE:
        with pytest.raises(TypeError) as ei:
            await layer.send(ch, bad)
        assert "encode" in str(ei.value) or "int" in str(ei.value), str(ei.value)
        with pytest.raises(TypeError):
            await layer.group_send("room", bad)
    await assert_nothing(layer, ch)  # nothing half-sent
    await layer.send(ch, {"ok": True})  # still usable
    assert await recv(layer, ch) == {"ok": True}


async def test_hybrid_unsigned_64_bit_boundary(layer: HybridChannelLayer) -> None:
    """Encodable 64-bit extremes: msgpack's uint64 top and int64 bottom."""
    ch = await layer.new_channel()
    msg = {"umax": 2**64 - 1, "imin": -(2**63)}
    await layer.send(ch, msg)
    assert await recv(layer, ch) == msg


async def test_hybrid_tuples_arrive_as_lists(layer: HybridChannelLayer) -> None:
    ch = await layer.new_channel()
    await layer.send(ch, {"t": (1, (2, 3))})
    assert await recv(layer, ch) == {"t": [1, [2, 3]]}


# ---------------------------------------------------------------------------- too large
def _message_of_encoded_size(size: int) -> dict[str, Any]:
    """A message whose msgpack encoding is exactly ``size`` bytes."""
    n = size - 64
    while True:
        m = {"type": "big", "b": b"x" * n}
        got = len(msgspec.msgpack.encode(m))
        if got == size:
            return m
        n += size - got


async def test_hybrid_message_over_max_message_bytes(make_hybrid: Callable[..., Any]) -> None:
    limit = 64 * 1024
    lay = make_hybrid(max_message_bytes=limit)
    ch = await lay.new_channel()
    await lay.group_add("room", ch)
    at_limit = _message_of_encoded_size(limit)
    over = _message_of_encoded_size(limit + 1)

    await lay.send(ch, at_limit)
    assert await recv(lay, ch) == at_limit
    with pytest.raises(hybrid_layer.MessageTooLarge) as ei:
        await lay.send(ch, over)
    if ChannelsMessageTooLarge is not None:
        assert isinstance(ei.value, ChannelsMessageTooLarge)
    assert str(limit) in str(ei.value)
    with pytest.raises(hybrid_layer.MessageTooLarge):
        await lay.group_send("room", over)
    await assert_nothing(lay, ch)
    assert lay.statistics().raised["too_large"] == 2
    # a 1 MB message is over this limit too, and the layer is still fine afterwards
    with pytest.raises(hybrid_layer.MessageTooLarge):
        await lay.send("normal.q", {"b": b"x" * MB})
    await lay.group_send("room", at_limit)
    assert await recv(lay, ch) == at_limit


async def test_hybrid_too_large_counted_even_as_first_call(
    make_hybrid: Callable[..., Any],
) -> None:
    lay = make_hybrid(max_message_bytes=4096)
    with pytest.raises(hybrid_layer.MessageTooLarge):
        await lay.send("normal.q", {"b": b"x" * 10_000})
    assert lay.statistics().raised["too_large"] == 1


# ---------------------------------------------------------------------------- participants
async def test_hybrid_two_layers_in_one_process_are_two_participants(
    make_hybrid: Callable[..., Any],
) -> None:
    a = make_hybrid()
    b = make_hybrid()
    ca = await a.new_channel()
    cb = await b.new_channel()
    sa, sb = a.statistics(), b.statistics()
    assert sa.slot != sb.slot
    assert sa.participants == 2 and sb.participants == 2
    for i in range(20):
        await a.send(cb, {"from": "a", "seq": i})
        await b.send(ca, {"from": "b", "seq": i})
    assert [(await recv(b, cb))["seq"] for _ in range(20)] == list(range(20))
    assert [(await recv(a, ca))["seq"] for _ in range(20)] == list(range(20))
    await assert_nothing(a, ca, 0.1)
    await assert_nothing(b, cb, 0.1)


async def test_hybrid_receive_wakes_on_a_send_from_another_participant(
    make_hybrid: Callable[..., Any],
) -> None:
    a = make_hybrid()
    b = make_hybrid()
    cb = await b.new_channel()
    for i in range(10):
        t = asyncio.create_task(b.receive(cb))
        await asyncio.sleep(0.02)
        await a.send(cb, {"seq": i})
        assert (await asyncio.wait_for(t, RECV_TIMEOUT))["seq"] == i


async def test_hybrid_groups_span_two_participants(make_hybrid: Callable[..., Any]) -> None:
    a = make_hybrid()
    b = make_hybrid()
    ca1, ca2 = await a.new_channel(), await a.new_channel()
    cb = await b.new_channel()
    await a.group_add("room", ca1)
    await a.group_add("room", ca2)
    await b.group_add("room", cb)
    for sender in (a, b):
        await sender.group_send("room", {"from": repr(sender)})
    for lay, ch in ((a, ca1), (a, ca2), (b, cb)):
        got = [await recv(lay, ch), await recv(lay, ch)]
        assert got == [{"from": repr(a)}, {"from": repr(b)}]
        await assert_nothing(lay, ch, 0.1)
    # discard on b: a's members still get it, b's does not
    await b.group_discard("room", cb)
    await b.group_send("room", {"n": 2})
    assert await recv(a, ca1) == {"n": 2}
    assert await recv(a, ca2) == {"n": 2}
    await assert_nothing(b, cb)


async def test_hybrid_group_member_added_by_one_participant_for_anothers_channel(
    make_hybrid: Callable[..., Any],
) -> None:
    """group_add(g, channel-of-b) called through a, group_send through b."""
    a = make_hybrid()
    b = make_hybrid()
    cb = await b.new_channel()
    await a.group_add("room", cb)
    await b.group_send("room", {"n": 1})
    assert await recv(b, cb) == {"n": 1}
    await assert_nothing(b, cb)


async def test_hybrid_group_discard_through_another_participant(
    make_hybrid: Callable[..., Any],
) -> None:
    """Channels' contract: group_discard(g, ch) ends ch's membership, whoever calls it
    (a management command or Celery task removing a user from a room)."""
    a = make_hybrid()
    b = make_hybrid()
    ca = await a.new_channel()
    await a.group_add("room", ca)
    await b.group_discard("room", ca)
    await b.group_send("room", {"should": "not arrive"})
    await a.group_send("room", {"should": "not arrive"})
    await assert_nothing(a, ca)


async def test_hybrid_normal_channel_readers_in_two_participants_share_the_work(
    make_hybrid: Callable[..., Any],
) -> None:
    a = make_hybrid()
    b = make_hybrid()
    sender = make_hybrid()
    ch = "workers.shared"
    n = 60
    got: list[tuple[str, int]] = []
    all_in = asyncio.Event()

    async def reader(name: str, lay: HybridChannelLayer) -> None:
        while True:
            m = await lay.receive(ch)
            got.append((name, m["n"]))
            if len(got) >= n:
                all_in.set()

    tasks = [asyncio.create_task(reader("a", a)), asyncio.create_task(reader("b", b))]
    try:
        await asyncio.sleep(0.2)  # both are readers
        for k in range(n):
            await sender.send(ch, {"n": k})
        await asyncio.wait_for(all_in.wait(), 10)
        await asyncio.sleep(QUIET)
    finally:
        await cancel_all(tasks)
    assert sorted(k for _, k in got) == list(range(n)), "lost or duplicated"
    # per reader, the messages it got are in send order (per sender FIFO)
    for name in ("a", "b"):
        seq = [k for who, k in got if who == name]
        assert seq == sorted(seq), f"reader {name} got {seq}"


async def test_hybrid_send_to_a_closed_participants_channel_is_dropped_and_counted(
    make_hybrid: Callable[..., Any],
) -> None:
    a = make_hybrid()
    b = make_hybrid()
    cb = await b.new_channel()
    await b.group_add("room", cb)
    await a.send(cb, {"before": "close"})
    await b.close()
    await a.send(cb, {"after": "close"})  # at-most-once: no error, no delivery
    await a.group_send("room", {"after": "close"})  # b's memberships went with it
    s = a.statistics()
    assert s.dropped["no_channel"] == 1
    assert s.participants == 1


async def test_hybrid_normal_channel_fifo_when_the_reader_appears_later_elsewhere(
    make_hybrid: Callable[..., Any],
) -> None:
    """Per sender FIFO on a normal channel whose first reader is another participant and
    starts while the sender keeps sending (messages sent before it existed wait for it)."""
    a = make_hybrid()
    b = make_hybrid()
    ch = "jobs.late"
    for i in range(10):
        await a.send(ch, {"seq": i})
    t = asyncio.create_task(b.receive(ch))  # b becomes a reader
    await asyncio.sleep(0.05)
    for i in range(10, 20):
        await a.send(ch, {"seq": i})
    got = [(await asyncio.wait_for(t, RECV_TIMEOUT))["seq"]]
    got += [(await recv(b, ch))["seq"] for _ in range(19)]
    assert got == list(range(20))


async def test_hybrid_flush_reaches_every_participant(make_hybrid: Callable[..., Any]) -> None:
    a = make_hybrid()
    b = make_hybrid()
    cb = await b.new_channel()
    await b.group_add("room", cb)
    for i in range(3):
        await a.send(cb, {"old": i})  # still in b's inbox ring
    await b.send("normal.q", {"old": "normal"})
    await a.flush()
    await a.group_send("room", {"after": "flush"})  # b's membership is gone
    await assert_nothing(b, cb)
    await assert_nothing(b, "normal.q")
    await a.send(cb, {"new": 1})
    assert await recv(b, cb) == {"new": 1}


async def test_hybrid_close_fails_a_waiting_receive(make_hybrid: Callable[..., Any]) -> None:
    lay = make_hybrid()
    ch = await lay.new_channel()
    t = asyncio.create_task(lay.receive(ch))
    await asyncio.sleep(0.1)
    await lay.close()
    with pytest.raises(hybrid_layer.LayerClosed):
        await asyncio.wait_for(t, RECV_TIMEOUT)


async def test_hybrid_close_leaves_no_thread_behind(make_hybrid: Callable[..., Any]) -> None:
    lay = make_hybrid()
    ch = await lay.new_channel()
    await lay.send(ch, {"x": 1})
    assert await recv(lay, ch) == {"x": 1}
    ours = [th for th in threading.enumerate() if th.name.startswith("hybrid-layer")]
    assert ours, "expected the layer's host thread while open"
    await lay.close()
    alive = [th.name for th in ours if th.is_alive()]
    assert not alive, f"threads still alive after close(): {alive}"


# ---------------------------------------------------------------------------- sync / threads
async def test_hybrid_async_to_sync_from_plain_threads(layer: HybridChannelLayer) -> None:
    ch = await layer.new_channel()
    n_threads, per_thread = 4, 25
    errors: list[BaseException] = []
    received: list[dict[str, Any]] = []
    start = threading.Barrier(n_threads + 1)

    def sender(t: int) -> None:
        try:
            start.wait(10)
            for i in range(per_thread):
                async_to_sync(layer.send)(ch, {"t": t, "i": i})
        except BaseException as exc:
            errors.append(exc)

    def receiver() -> None:
        async def one() -> dict[str, Any]:
            return await asyncio.wait_for(layer.receive(ch), RECV_TIMEOUT)

        try:
            start.wait(10)
            for _ in range(n_threads * per_thread):
                received.append(async_to_sync(one)())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(t,)) for t in range(n_threads)]
    threads.append(threading.Thread(target=receiver))
    for th in threads:
        th.start()
    await asyncio.to_thread(lambda: [th.join(30) for th in threads])
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not errors, errors
    assert len(received) == n_threads * per_thread
    for t in range(n_threads):
        assert [m["i"] for m in received if m["t"] == t] == list(range(per_thread))
    await assert_nothing(layer, ch)


async def test_hybrid_async_to_sync_group_send_from_a_thread(layer: HybridChannelLayer) -> None:
    """The Celery / management-command shape: sync code only sends to a group."""
    ch = await layer.new_channel()
    await layer.group_add("room", ch)

    def job() -> None:
        for i in range(5):
            async_to_sync(layer.group_send)("room", {"i": i})

    await asyncio.to_thread(job)
    assert [(await recv(layer, ch))["i"] for _ in range(5)] == list(range(5))


async def test_hybrid_sync_layer_used_only_from_threads(make_hybrid: Callable[..., Any]) -> None:
    """A layer first touched (attached) from a sync thread, then used from async code."""
    lay = make_hybrid()

    def sync_part() -> str:
        ch = async_to_sync(lay.new_channel)()
        async_to_sync(lay.send)(ch, {"from": "sync"})
        return ch

    ch = await asyncio.to_thread(sync_part)
    assert await recv(lay, ch) == {"from": "sync"}


async def test_hybrid_two_event_loops_in_two_threads_at_once(layer: HybridChannelLayer) -> None:
    ping = await layer.new_channel()
    pong = await layer.new_channel()
    n = 60
    errors: list[BaseException] = []
    got: list[int] = []

    async def player_a() -> None:
        for i in range(n):
            await layer.send(ping, {"i": i})
            m = await asyncio.wait_for(layer.receive(pong), RECV_TIMEOUT)
            got.append(m["i"])

    async def player_b() -> None:
        for _ in range(n):
            m = await asyncio.wait_for(layer.receive(ping), RECV_TIMEOUT)
            await layer.send(pong, {"i": m["i"] * 10})

    def run(coro_fn: Callable[[], Any]) -> None:
        try:
            asyncio.run(coro_fn())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f,)) for f in (player_b, player_a)]
    for th in threads:
        th.start()
    # this test's own loop receives on a third channel meanwhile
    own = await layer.new_channel()
    await layer.send(own, {"main": True})
    assert await recv(layer, own) == {"main": True}
    await asyncio.to_thread(lambda: [th.join(30) for th in threads])
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not errors, errors
    assert got == [i * 10 for i in range(n)]


async def test_hybrid_receive_in_one_loop_send_from_another(layer: HybridChannelLayer) -> None:
    """A receiver asleep in this loop is woken by a send made in another thread's loop."""
    ch = await layer.new_channel()

    def later() -> None:
        time.sleep(0.2)
        asyncio.run(layer.send(ch, {"from": "other loop"}))

    th = threading.Thread(target=later)
    th.start()
    try:
        assert await recv(layer, ch) == {"from": "other loop"}
    finally:
        await asyncio.to_thread(th.join, 10)


# ---------------------------------------------------------------------------- statistics
async def test_hybrid_statistics_sent_received_full_pending(
    make_hybrid: Callable[..., Any],
) -> None:
    lay = make_hybrid(capacity=3)
    ch = await lay.new_channel()
    await asyncio.sleep(0.2)  # let start-up housekeeping pass: what follows must not need it
    s0 = lay.statistics()
    assert (s0.sent, s0.received, s0.pending) == (0, 0, 0)
    assert s0.raised["full"] == 0
    for i in range(3):
        await lay.send(ch, {"n": i})
    with pytest.raises(ChannelsChannelFull):
        await lay.send(ch, {"n": 3})
    s1 = lay.statistics()
    assert s1.sent == 3
    assert s1.raised["full"] == 1
    assert s1.received == 0
    cs = lay.channel_statistics(ch)
    assert (cs.channel, cs.pending, cs.capacity, cs.local) == (ch, 3, 3, True)
    # three messages wait for this process: its statistics must say so
    assert s1.pending == 3, f"statistics().pending is {s1.pending} with 3 messages waiting"

    for _ in range(2):
        await recv(lay, ch)
    s2 = lay.statistics()
    assert s2.received == 2
    assert s2.pending == 1
    assert lay.channel_statistics(ch).pending == 1
    await recv(lay, ch)
    s3 = lay.statistics()
    assert (s3.sent, s3.received, s3.pending) == (3, 3, 0)
    assert lay.channel_statistics(ch).pending == 0


async def test_hybrid_statistics_counts_expired(make_hybrid: Callable[..., Any]) -> None:
    lay = make_hybrid(expiry=EXPIRY)
    ch = await lay.new_channel()
    for i in range(3):
        await lay.send(ch, {"n": i})
    await asyncio.sleep(PAST_EXPIRY)
    await lay.send(ch, {"fresh": True})
    assert await recv(lay, ch) == {"fresh": True}
    s = lay.statistics()
    assert s.dropped["expired"] == 3
    assert s.sent == 4 and s.received == 1
    assert lay.channel_statistics(ch).pending == 0
    assert s.pending == 0


async def test_hybrid_statistics_expired_on_an_idle_channel_are_counted(
    make_hybrid: Callable[..., Any],
) -> None:
    """Nobody ever receives again on the channel: housekeeping drops and counts them."""
    lay = make_hybrid(expiry=EXPIRY)
    ch = await lay.new_channel()
    for i in range(2):
        await lay.send(ch, {"n": i})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and lay.statistics().dropped["expired"] < 2:
        await asyncio.sleep(0.1)
    assert lay.statistics().dropped["expired"] == 2
    assert lay.channel_statistics(ch).pending == 0


async def test_hybrid_statistics_groups(make_hybrid: Callable[..., Any]) -> None:
    lay = make_hybrid(capacity=1)
    a = await lay.new_channel()
    b = await lay.new_channel()
    await lay.group_add("room", a)
    await lay.group_add("room", b)
    await lay.send(b, {"fills": "b"})
    await lay.group_send("room", {"n": 1})
    assert await recv(lay, a) == {"n": 1}
    assert await recv(lay, b) == {"fills": "b"}
    await assert_nothing(lay, b, 0.1)
    s = lay.statistics()
    assert s.group_sends == 1
    assert s.group_copies == 1  # a only: b was full
    assert s.dropped["full"] == 1
    assert s.raised["full"] == 0  # group_send never raises


async def test_hybrid_channel_statistics_capacity_and_normal_channels(
    make_hybrid: Callable[..., Any],
) -> None:
    lay = make_hybrid(capacity=7, channel_capacity={"tiny.*": 2, re.compile(r"^re\."): 4})
    assert lay.channel_statistics("tiny.x").capacity == 2
    assert lay.channel_statistics("re.x").capacity == 4
    assert lay.channel_statistics("other").capacity == 7
    proc = await lay.new_channel("tiny.")
    assert lay.channel_statistics(proc).capacity == 2
    # normal channel without a reader yet: its messages wait (parked) and are counted
    for i in range(3):
        await lay.send("jobs", {"n": i})
    assert lay.channel_statistics("jobs").pending == 3
    assert [(await recv(lay, "jobs"))["n"] for _ in range(3)] == [0, 1, 2]
    assert lay.channel_statistics("jobs").pending == 0
    with pytest.raises(TypeError):
        lay.channel_statistics("bad name")


async def test_hybrid_global_statistics_sum_over_participants(
    make_hybrid: Callable[..., Any],
) -> None:
    a = make_hybrid()
    b = make_hybrid()
    cb = await b.new_channel()
    for i in range(3):
        await a.send(cb, {"n": i})
    for _ in range(3):
        await recv(b, cb)
    await a.send(cb, {"n": "left"})  # pending
    deadline = time.monotonic() + 5
    g = a.global_statistics()
    while time.monotonic() < deadline and not (g.sent == 4 and g.received == 3):
        await asyncio.sleep(0.1)
        g = a.global_statistics()
    assert (g.sent, g.received) == (4, 3)
    assert g.participants == 2
    assert g.raised["full"] == 0
    # own counters are visible at once from b's side as well (b published them itself)
    gb = b.global_statistics()
    assert gb.received >= 3


async def test_hybrid_use_after_close_attaches_a_fresh_participant(
    make_hybrid: Callable[..., Any],
) -> None:
    # like channels_redis (pools re-created after close), the object stays usable: a
    # use after close() attaches anew; the old incarnation's channels are dead
    lay = make_hybrid()
    old = await lay.new_channel()
    await lay.close()
    new = await lay.new_channel()
    a_new, a_old = parse(new), parse(old)
    assert a_new is not None and a_old is not None
    assert (a_new.slot, a_new.gen) != (a_old.slot, a_old.gen), "a new incarnation"
    await lay.send(old, {"x": 1})
    assert lay.statistics().dropped["no_channel"] == 1
    await lay.send(new, {"x": 2})
    assert await asyncio.wait_for(lay.receive(new), 5) == {"x": 2}


async def test_hybrid_a_closed_layer_attaches_again_with_new_channels(
    make_hybrid: Callable[..., Any],
) -> None:
    """close() then use: a new participant (a cached get_channel_layer() survives a
    teardown); the old channels are gone, and a message to one is dropped and counted."""
    lay = make_hybrid()
    old = await lay.new_channel()
    await lay.close()
    await lay.send(old, {"x": 1})
    assert lay.statistics().dropped["no_channel"] == 1
    new = await lay.new_channel()
    assert new != old
    await lay.send(new, {"x": 2})
    assert await recv(lay, new) == {"x": 2}
    await lay.close()


async def test_hybrid_a_receiver_cancelled_after_its_wake_up_passes_it_on(
    make_hybrid: Callable[..., Any],
) -> None:
    """Two receives wait on one channel; the message wakes A, and A is cancelled before
    it runs: B must get the message (not sleep until the next one)."""
    lay = make_hybrid()
    p = lay._p()
    a = asyncio.create_task(lay.receive("work"))
    await asyncio.sleep(0.05)
    b = asyncio.create_task(lay.receive("work"))
    await asyncio.sleep(0.05)
    await lay.send("work", {"n": 1})
    while not p.queues.get("work"):  # drained into the local queue: A's wait is over
        await asyncio.sleep(0)
    a.cancel()
    assert await asyncio.wait_for(b, RECV_TIMEOUT) == {"n": 1}
    with pytest.raises(asyncio.CancelledError):
        await a
    await lay.close()
