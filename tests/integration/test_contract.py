"""The Channels contract with no footnote (issue 13): group copies respect capacity
whenever they are fanned out, a process channel this process does not own is refused
at once, and a layer dropped without ``close()`` releases everything."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import uuid
from typing import Any

import pytest

from hybrid_layer import HybridChannelLayer
from hybrid_layer.errors import ChannelNotOwned
from tests.remote import Remote

pytestmark = pytest.mark.asyncio


async def _drain(layer: HybridChannelLayer, channel: str, wait: float = 0.3) -> list[str]:
    got = []
    while True:
        try:
            got.append((await asyncio.wait_for(layer.receive(channel), wait))["type"])
        except TimeoutError:
            return got


async def test_group_copy_over_capacity_is_dropped_even_after_the_host_thread_fanned_out_some(
    layer_config: dict[str, Any],
) -> None:
    """channels' test_group_send_capacity, made deterministic: the host thread's sweep
    fans out the first copies, the last copy is still in the inbox when receive() starts
    taking. It must be checked against capacity before anything is taken."""
    layer = HybridChannelLayer(**{**layer_config, "capacity": 3})
    try:
        chans = [await layer.new_channel() for _ in range(2)]
        for ch in chans:
            await layer.group_add("g", ch)
        p = layer._p()
        for i in range(3):
            await layer.group_send("g", {"type": f"m{i}"})
        p.drain(None)  # what the host thread's sweep does at any moment
        await layer.group_send("g", {"type": "m3"})
        for ch in chans:
            assert await _drain(layer, ch) == ["m0", "m1", "m2"]
        assert layer.statistics().dropped["full"] == 2
    finally:
        await layer.close()


async def test_group_copy_from_another_process_respects_a_full_member(
    layer_config: dict[str, Any],
) -> None:
    cfg = {**layer_config, "capacity": 2}
    layer = HybridChannelLayer(**cfg)
    other = Remote(cfg)
    try:
        full, free = await layer.new_channel(), await layer.new_channel()
        await layer.group_add("g", full)
        await layer.group_add("g", free)
        other.call("send", full, {"type": "d0"})
        other.call("send", full, {"type": "d1"})
        other.call("group_send", "g", {"type": "g0"})  # never raises
        other.call("group_send", "g", {"type": "g1"})
        assert await _drain(layer, full) == ["d0", "d1"]
        assert await _drain(layer, free) == ["g0", "g1"]
        assert layer.statistics().dropped["full"] == 2
    finally:
        other.close()
        await layer.close()


async def test_receive_on_a_process_channel_of_someone_else_is_refused_at_once(
    layer_config: dict[str, Any],
) -> None:
    layer = HybridChannelLayer(**layer_config)
    other = Remote(layer_config)
    try:
        theirs = other.call("new_channel")
        mine = await layer.new_channel()
        for name in ("not-client-prefix!local_part", theirs, mine.replace("!", "x!", 1)):
            with pytest.raises(ChannelNotOwned, match="did not create that channel"):
                await asyncio.wait_for(layer.receive(name), 2)
        with pytest.raises(ValueError):  # (it is a ValueError too)
            await asyncio.wait_for(layer.receive(theirs), 2)
        # one's own channel still waits, and gets what is sent
        await layer.send(mine, {"type": "ok"})
        assert (await asyncio.wait_for(layer.receive(mine), 2))["type"] == "ok"
    finally:
        other.close()
        await layer.close()


def _ours(prefix: str) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if f".{prefix}." in n]


async def test_layers_dropped_without_close_release_everything(ns_prefix: str) -> None:
    """A test suite (or Django's override_settings) builds a layer per test and never
    closes it: more layers than max_participants over a process's life, no leak."""
    cfg = {"prefix": ns_prefix, "host_id": "gc", "max_participants": 4}
    keeper = HybridChannelLayer(**cfg)  # keeps the namespace alive throughout
    try:
        await keeper.new_channel()
        for i in range(12):  # 3 x max_participants
            layer = HybridChannelLayer(**cfg)
            ch = await layer.new_channel()
            await keeper.send(ch, {"type": "x", "i": i})
            assert (await asyncio.wait_for(layer.receive(ch), 2))["i"] == i
            del layer
            gc.collect()
            for _ in range(100):  # the release runs on a thread of its own
                if keeper.global_statistics().participants == 1:
                    break
                await asyncio.sleep(0.02)
            assert keeper.global_statistics().participants == 1
        assert not [t for t in threading.enumerate() if t.name.startswith("hybrid-layer-host")][1:]
    finally:
        await keeper.close()
    for _ in range(100):
        if not _ours(ns_prefix):
            break
        await asyncio.sleep(0.02)
    assert _ours(ns_prefix) == []


async def test_a_collected_layer_in_broker_mode_closes_its_link(ns_prefix: str) -> None:
    cfg = {
        "prefix": ns_prefix,
        "host_id": "gc" + uuid.uuid4().hex[:6],
        "host": "amqp://guest:guest@127.0.0.1:5672/",
    }
    layer = HybridChannelLayer(**cfg)
    await layer.new_channel()
    for _ in range(250):
        if layer.statistics().broker.get("link") == "up":
            break
        await asyncio.sleep(0.02)
    del layer
    gc.collect()
    for _ in range(300):
        if not [t for t in threading.enumerate() if t.name.startswith("hybrid-layer")]:
            break
        await asyncio.sleep(0.02)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("hybrid-layer")]
    assert _ours(ns_prefix) == []


async def test_a_normal_channel_reader_that_stops_receiving_gives_its_messages_back(
    layer_config: dict[str, Any],
) -> None:
    """Process A receives from "jobs" once and stops; B keeps receiving. What is sent
    afterwards reaches B (round-robin gave some to A: A hands them back), none waits
    in A until expiry."""
    a, b = Remote(layer_config), Remote(layer_config)
    sender = HybridChannelLayer(**layer_config)
    try:
        await sender.send("jobs", {"type": "first"})
        assert a.call("receive", "jobs", 5)["type"] == "first"  # A is a reader now
        b.call("collect", "jobs", 20)  # B receives for ever (20 messages)
        await asyncio.sleep(0.2)
        for i in range(20):
            await sender.send("jobs", {"type": "job", "i": i})
        got = b.call("wait_collected", "jobs", 10)
        assert sorted(m["i"] for m in got) == list(range(20))
        assert a.call("stats").received == 1
    finally:
        a.close()
        b.close()
        await sender.close()


async def test_a_lone_reader_that_comes_back_gets_what_was_handed_back(
    layer_config: dict[str, Any],
) -> None:
    a = Remote(layer_config)
    sender = HybridChannelLayer(**layer_config)
    try:
        await sender.send("jobs", {"type": "job", "i": -1})
        assert a.call("receive", "jobs", 5)["i"] == -1
        for i in range(5):
            await sender.send("jobs", {"type": "job", "i": i})
        await asyncio.sleep(1.5)  # A idles: its queue goes back (to the leader's park)
        assert [a.call("receive", "jobs", 5)["i"] for _ in range(5)] == list(range(5))
        assert sum(sender.global_statistics().dropped.values()) == 0
    finally:
        a.close()
        await sender.close()
