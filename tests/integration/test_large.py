"""Messages of any size with the default settings: records over ``ring_bytes // 4``
travel in a shared-memory segment of their own (``hybrid_layer.shm.spill``).

Real separate processes, real shared memory; every test checks ``/dev/shm`` for the
segments (``<ns>.x<slot>.<gen>.<random>``), and the ``ns_prefix`` fixture fails a test
that leaves any name behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from hybrid_layer import HybridChannelLayer
from hybrid_layer.config import parse_config
from hybrid_layer.shm import spill
from tests.remote import Remote, wait_until

pytestmark = pytest.mark.timeout(180)

MB = 1000 * 1000
SHM = "/dev/shm"


def spill_names(cfg: dict[str, Any]) -> list[str]:
    stem = spill.stem(parse_config(cfg).namespace)
    return sorted(n for n in os.listdir(SHM) if n.startswith(stem))


@pytest.mark.parametrize("size", [5 * MB, 20 * MB, 100 * MB])
def test_large_messages_between_processes_with_default_settings(
    remotes: Callable[..., list[Remote]], layer_config: dict[str, Any], size: int
) -> None:
    """Direct, group and normal-channel messages of 5, 20 and 100 MB between separate
    processes, with no size setting at all (``layer_config``: prefix, host_id, expiry)."""
    a, b = remotes(2)
    ch = b.call("new_channel", "big.")
    b.call("group_add", "room", ch)
    for k, (cmd, dest, src) in enumerate(
        [("send_big", ch, ch), ("group_send_big", "room", ch), ("send_big", "jobs", "jobs")]
    ):
        if dest == "jobs":  # a normal channel: B reads it (registered before the send)
            b.start_call("receive_digest", "jobs", 60.0)
            time.sleep(0.3)
            digest = a.call(cmd, dest, size, k, timeout=60)
            got = b.result(timeout=90)
        else:
            digest = a.call(cmd, dest, size, k, timeout=60)
            got = b.call("receive_digest", src, 60.0, timeout=90)
        assert got == [k, size, digest] or got == (k, size, digest)
    assert spill_names(layer_config) == []
    assert sum(b.call("stats").dropped.values()) == 0


async def test_spilled_message_that_expires_or_is_flushed_leaves_no_name(
    layer_config: dict[str, Any],
) -> None:
    lay = HybridChannelLayer(**{**layer_config, "expiry": 0.3})
    try:
        ch = await lay.new_channel()
        await lay.send(ch, {"type": "big", "b": b"e" * 2 * MB})
        assert len(spill_names(layer_config)) == 1  # in flight: out of the ring
        await asyncio.sleep(0.6)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(lay.receive(ch), 0.3)
        assert spill_names(layer_config) == []
        assert lay.statistics().dropped["expired"] == 1

        await lay.send(ch, {"type": "big", "b": b"f" * 2 * MB})
        assert len(spill_names(layer_config)) == 1
        await lay.flush()
        assert wait_until(lambda: spill_names(layer_config) == [], 5)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(lay.receive(ch), 0.3)
        assert lay.statistics().dropped["flushed"] == 1
        # and a normal one still works afterwards
        await lay.send(ch, {"type": "big", "b": b"g" * 2 * MB})
        assert (await asyncio.wait_for(lay.receive(ch), 5))["b"] == b"g" * 2 * MB
        assert spill_names(layer_config) == []
    finally:
        await lay.close()


def test_receiver_killed_with_large_messages_unread_leaks_nothing(
    remotes: Callable[..., list[Remote]], layer_config: dict[str, Any]
) -> None:
    """SIGKILL of the reader while large messages for it are in flight: the reclaim of
    its slot removes their segments."""
    leader, sender, reader = remotes(3)
    assert wait_until(lambda: leader.call("internals")["is_leader"], 5)
    ch = reader.call("new_channel", "big.")
    os.kill(reader.pid, signal.SIGSTOP)  # it cannot take them out of its ring
    try:
        for k in range(3):
            sender.call("send_big", ch, 20 * MB, k, timeout=60)
        assert len(spill_names(layer_config)) == 3
    finally:
        reader.kill()  # SIGKILL (a stopped process dies too)
    assert wait_until(lambda: leader.call("stats").participants == 2, 10)
    assert wait_until(lambda: spill_names(layer_config) == [], 5), spill_names(layer_config)


def test_sender_killed_mid_transfer_leaks_nothing(
    remotes: Callable[..., list[Remote]], layer_config: dict[str, Any]
) -> None:
    """SIGKILL of a sender: while it writes a 100 MB message, and (deterministically)
    after it made a segment and before it published the record. The reader's sweep
    removes what no record refers to once it is older than any record could live."""
    _leader, reader = remotes(2, expiry=1)
    ch = reader.call("new_channel", "big.")
    me = reader.call("internals")
    for delay in (0.05, 0.15):
        sender = remotes(1, expiry=1)[0]
        sender.start_call("send_big", ch, 100 * MB, 1)
        time.sleep(delay)
        sender.kill()
    orphan_maker = remotes(1, expiry=1)[0]
    name = orphan_maker.call("spill_orphan", me["slot"], me["gen"], MB)
    assert name.lstrip("/") in spill_names(layer_config)
    orphan_maker.kill()
    # at most expiry + grace (5 s) + one sweep period (expiry) later
    assert wait_until(lambda: spill_names(layer_config) == [], 15), spill_names(layer_config)
    # whatever did arrive was whole; the reader is fine
    reader.call("send", ch, {"type": "small", "seed": -1, "b": b""})
    while True:
        seed, size, _ = reader.call("receive_digest", ch, 5.0)
        if seed == -1:
            break
        assert size == 100 * MB


def test_last_one_out_removes_every_spill_name(
    remotes: Callable[..., list[Remote]], layer_config: dict[str, Any]
) -> None:
    (a,) = remotes(1)
    me = a.call("internals")
    a.call("spill_orphan", me["slot"] + 5, 7, 1024)  # a slot nobody holds
    assert len(spill_names(layer_config)) == 1
    a.close()
    assert spill_names(layer_config) == []


def test_a_reference_is_resolved_only_by_the_reader_it_names(layer_config: dict[str, Any]) -> None:
    """A reference (0xC1, length, name) resolves only to a segment named for the reader's
    own slot and incarnation: a forged one (from a broker user: msgpack never starts with
    0xC1, so nothing else does) cannot make a reader open or remove another name."""
    ns = parse_config(layer_config).namespace
    ref = spill.write(ns, 1, 2, 0o600, b"name", b"body")
    assert len(spill_names(layer_config)) == 1
    for stem in (spill.stem(ns, 3, 2), spill.stem(ns, 1, 3), spill.stem("hl.other.h", 1, 2)):
        with pytest.raises(spill.SpillError):
            spill.read(ref, stem)
        assert not spill.discard(ref, stem)
    for bad in (ref[:5], b"\xc1" + ref[1:9] + b"/etc/passwd", b"\x81" + ref[1:], ref + b"\xff"):
        with pytest.raises(spill.SpillError):
            spill.read(bad, spill.stem(ns, 1, 2))
    assert len(spill_names(layer_config)) == 1  # untouched by all of that
    assert spill.read(ref, spill.stem(ns, 1, 2)) == b"namebody"
    assert spill_names(layer_config) == []
    with pytest.raises(spill.SpillError, match="gone"):
        spill.read(ref, spill.stem(ns, 1, 2))
