"""Processes killed at bad moments: nobody else may hang, and everything is reclaimed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from tests.conftest import _ours
from tests.remote import Remote, RemoteError, wait_until

pytestmark = pytest.mark.slow


def test_sigkill_while_holding_a_ring_lock_does_not_wedge_writers(remotes: Any) -> None:
    victim, reader, writer = remotes(3)
    ch = reader.call("new_channel")
    slot = reader.call("internals")["slot"]
    victim.call("hold_ring_lock", slot)
    writer.conn.send(("send", ch, {"type": "after-kill"}))
    assert not writer.conn.poll(0.3), "the writer should wait for the lock holder"
    victim.kill()
    assert writer.conn.poll(5), "the kernel must release a dead holder's lock"
    assert writer.conn.recv() == ("ok", None)
    assert reader.call("receive", ch, 5) == {"type": "after-kill"}


def test_sigkill_halfway_through_a_record_leaves_no_torn_record(remotes: Any) -> None:
    victim, reader, writer = remotes(3)
    ch = reader.call("new_channel")
    victim.call("half_write", reader.call("internals")["slot"])
    victim.kill()
    writer.call("send", ch, {"type": "whole", "n": 1})
    assert reader.call("receive", ch, 5) == {"type": "whole", "n": 1}
    assert reader.call("stats").dropped["corrupt"] == 0


def test_corrupt_record_is_dropped_counted_and_the_inbox_keeps_working(remotes: Any) -> None:
    vandal, reader, writer = remotes(3)
    ch = reader.call("new_channel")
    vandal.call("inject_garbage", reader.call("internals")["slot"])
    # the reader's housekeeping finds it even with nobody receiving: framing is lost,
    # so the unread rest of the inbox is discarded, counted and logged
    assert wait_until(lambda: reader.call("stats").dropped["corrupt"] == 1, 5)
    writer.call("send", ch, {"type": "fine"})
    assert reader.call("receive", ch, 5) == {"type": "fine"}
    assert reader.call("stats").dropped["corrupt"] == 1


def _leader(procs: list[Remote]) -> Remote:
    leaders = [p for p in procs if p.call("internals")["is_leader"]]
    assert len(leaders) == 1, "exactly one leader per host"
    return leaders[0]


def test_leader_killed_another_leads_and_reclaims_its_slot(remotes: Any) -> None:
    procs = remotes(3)
    assert wait_until(lambda: any(p.call("internals")["is_leader"] for p in procs), 3)
    leader = _leader(procs)
    survivors = [p for p in procs if p is not leader]
    a, b = survivors
    ch = b.call("new_channel")
    b.call("collect", ch, 1000)
    dead_pid = leader.pid
    leader.kill()
    t0 = time.monotonic()
    # same-host traffic never stops during failover
    sent = 0
    while time.monotonic() - t0 < 1.5 and sent < 900:
        a.call("send", ch, {"type": "m", "n": sent})
        sent += 1
        time.sleep(0.002)
    assert wait_until(lambda: any(p.call("internals")["is_leader"] for p in survivors), 3)
    took = time.monotonic() - t0
    assert took < 3, f"failover took {took:.2f}s"
    st = a.call("global_stats")
    assert st.leader_pid in {p.pid for p in survivors} and st.leader_pid != dead_pid
    assert wait_until(lambda: a.call("global_stats").participants == 2, 3)
    assert wait_until(lambda: len(b.call("collected", ch)) == sent, 10)
    assert [m["n"] for m in b.call("collected", ch)] == list(range(sent))


def test_dead_participant_memberships_released_and_slot_reused_safely(remotes: Any) -> None:
    a, b = remotes(2)
    a.call("internals")  # attach a first (attachment is lazy)
    old_ch = b.call("new_channel")
    b.call("group_add", "room", old_ch)
    old = b.call("internals")
    b.kill()
    assert wait_until(lambda: a.call("global_stats").participants == 1, 3)
    a.call("group_send", "room", {"type": "nobody-home"})
    (c,) = remotes(1)
    new = c.call("internals")
    assert new["slot"] == old["slot"], "the freed slot is reused"
    assert new["gen"] != old["gen"], "with a new incarnation"
    a.call("send", old_ch, {"type": "for-the-dead"})
    assert a.call("stats").dropped["no_channel"] == 1
    new_ch = c.call("new_channel")
    a.call("send", new_ch, {"type": "for-the-living"})
    assert c.call("receive", new_ch, 5) == {"type": "for-the-living"}
    # nothing of the dead incarnation leaked into the new one: nothing is queued under
    # the old name, and the new incarnation refuses it as not its own
    with pytest.raises(RemoteError, match="ChannelNotOwned"):
        c.call("receive", old_ch, 0.3)


def test_unread_messages_of_a_killed_reader_are_counted_even_once_drained(
    remotes: Any,
) -> None:
    """A process killed with messages unread: both those still in its ring and those
    its receive() had already moved into its own memory count as dropped dead_reader."""
    a, b = remotes(2)
    a.call("internals")  # (a reclaims b's slot: as leader, or as the one left to lead)
    ch, other = b.call("new_channel"), b.call("new_channel")
    for n in range(30):
        a.call("send", ch, {"type": "m", "n": n})
    a.call("send", other, {"type": "m"})
    assert b.call("receive", other, 5) == {"type": "m"}  # drained: 30 now in b's memory
    for n in range(5):
        a.call("send", ch, {"type": "m", "n": n})  # and 5 still in its ring
    b.kill()
    assert wait_until(lambda: a.call("stats").dropped["dead_reader"] == 35, 5), a.call(
        "stats"
    ).dropped


def test_stale_set_left_by_a_crash_is_detected_and_reused(remotes: Any, ns_prefix: str) -> None:
    (a,) = remotes(1)
    ch = a.call("new_channel")
    a.call("send", ch, {"type": "lost"})
    a.kill()
    assert _ours(ns_prefix), "a SIGKILLed sole participant leaves its names"
    (b,) = remotes(1)
    ch2 = b.call("new_channel")
    b.call("send", ch2, {"type": "fresh"})
    assert b.call("receive", ch2, 5) == {"type": "fresh"}
    with pytest.raises(RemoteError, match="ChannelNotOwned"):  # (nothing queued for it)
        b.call("receive", ch, 0.3)
    b.close()
    assert _ours(ns_prefix) == [], "the last one out removes every name"


def test_stopped_reader_fills_up_and_senders_get_channel_full_without_slowing_others(
    remotes: Any,
) -> None:
    stuck, sender, c, d = remotes(4)
    ch = stuck.call("new_channel")
    other = d.call("new_channel")
    os.kill(stuck.pid, signal.SIGSTOP)
    try:
        blob = b"x" * 1_000_000
        t0 = time.monotonic()
        sent = sender.call("send_many", ch, [{"type": "big", "b": blob}] * 20, timeout=30)
        took = time.monotonic() - t0
        assert 0 < sent < 20, "the inbox must fill before capacity (100) is reached"
        assert took < 5, f"a full inbox must not block the sender long ({took:.2f}s)"
        assert sender.call("stats").raised["full"] == 1
        # others are not slowed
        c.call("send", other, {"type": "unaffected"})
        assert d.call("receive", other, 2) == {"type": "unaffected"}
    finally:
        os.kill(stuck.pid, signal.SIGCONT)
    got = stuck.call("receive_many", ch, sent, 20)
    assert len(got) == sent


FORK_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, sys
    from hybrid_layer import HybridChannelLayer

    layer = HybridChannelLayer(prefix=sys.argv[1], host_id="forkhost")

    async def parent_setup():
        ch = await layer.new_channel()
        await layer.send(ch, {"type": "pre-fork"})
        assert (await layer.receive(ch))["type"] == "pre-fork"
        return ch

    ch = asyncio.run(parent_setup())
    children = []
    for k in range(3):
        pid = os.fork()
        if pid == 0:
            async def child():
                mine = await layer.new_channel()
                await layer.send(ch, {"type": "hello", "k": k, "reply": mine})
                got = await asyncio.wait_for(layer.receive(mine), 10)
                assert got == {"type": "ack", "k": k}, got
                await layer.close()
            try:
                asyncio.run(child())
                os._exit(0)
            except BaseException as exc:
                print("child failed:", repr(exc), file=sys.stderr)
                os._exit(1)
        children.append(pid)

    async def parent():
        for _ in range(3):
            m = await asyncio.wait_for(layer.receive(ch), 10)
            await layer.send(m["reply"], {"type": "ack", "k": m["k"]})
    asyncio.run(parent())
    codes = [os.waitpid(pid, 0)[1] for pid in children]
    asyncio.run(layer.close())
    sys.exit(0 if all(c == 0 for c in codes) else 1)
    """
)


def test_layer_created_and_used_before_fork_works_in_every_child(ns_prefix: str) -> None:
    res = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT, ns_prefix],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
