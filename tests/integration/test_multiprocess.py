"""Real separate processes (spawn) on one host namespace: the whole single-host contract."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.remote import RemoteError, wait_until

pytestmark = pytest.mark.slow


def test_direct_sends_between_four_processes_keep_fifo(remotes: Any) -> None:
    procs = remotes(4, capacity=1000)
    chans = [p.call("new_channel") for p in procs]
    n = 200
    for i, p in enumerate(procs):
        p.call("collect", chans[i], n * 3)
    for i, p in enumerate(procs):
        for j, ch in enumerate(chans):
            if i != j:
                msgs = [{"type": "m", "src": i, "seq": k} for k in range(n)]
                assert p.call("send_many", ch, msgs) == n
    for j, p in enumerate(procs):
        got = p.call("wait_collected", chans[j], 30)
        assert len(got) == 3 * n
        for src in range(4):
            if src == j:
                continue
            seqs = [m["seq"] for m in got if m["src"] == src]
            assert seqs == list(range(n)), f"FIFO broken from {src} to {j}"


def test_group_send_reaches_every_member_once_across_processes(remotes: Any) -> None:
    procs = remotes(4)
    members = []
    for p in procs:
        for _ in range(2):
            ch = p.call("new_channel")
            p.call("group_add", "room", ch)
            p.call("collect", ch, 3)
            members.append((p, ch))
    sender = procs[0]
    for k in range(3):
        sender.call("group_send", "room", {"type": "chat", "k": k, "blob": b"\x00\xff"})
    for p, ch in members:
        got = p.call("wait_collected", ch, 20)
        assert [m["k"] for m in got] == [0, 1, 2]
        assert all(m["blob"] == b"\x00\xff" for m in got)
    # one copy per participant process, fanned out locally
    stats = [p.call("stats") for p in procs]
    assert sum(s.group_copies for s in stats) == 3 * len(members)
    # discard: members of one process leave, the others still get it
    p3, ch3a = members[6]
    _, ch3b = members[7]
    p3.call("group_discard", "room", ch3a)
    p3.call("group_discard", "room", ch3b)
    sender.call("group_send", "room", {"type": "chat", "k": 99})
    for p, ch in members[:6]:
        assert p.call("receive", ch, 10)["k"] == 99
    with pytest.raises(RemoteError, match="TimeoutError"):
        p3.call("receive", ch3a, 0.5)


def test_normal_channel_with_several_reader_processes_delivers_each_once(remotes: Any) -> None:
    readers = remotes(3)
    sender = remotes(1)[0]
    total = 300
    for r in readers:
        r.call("collect", "tasks", total)  # more than each will get: collect what arrives
    # make sure every reader has registered before sending
    assert wait_until(lambda: True, 0.3)
    msgs = [{"type": "task", "n": i} for i in range(total)]
    assert sender.call("send_many", "tasks", msgs) == total

    def all_in() -> bool:
        return sum(len(r.call("collected", "tasks")) for r in readers) >= total

    assert wait_until(all_in, 30, 0.1)
    got = [m["n"] for r in readers for m in r.call("collected", "tasks")]
    assert sorted(got) == list(range(total)), "each message exactly once"
    per_reader = [len(r.call("collected", "tasks")) for r in readers]
    assert sum(1 for c in per_reader if c) >= 2, f"load not spread: {per_reader}"


def test_normal_channel_message_parked_until_a_reader_appears(remotes: Any) -> None:
    sender, reader = remotes(2)
    sender.call("send", "later", {"type": "x", "v": 1})
    sender.call("send", "later", {"type": "x", "v": 2})
    got = reader.call("receive_many", "later", 2, 10)
    assert [m["v"] for m in got] == [1, 2]


def test_capacity_is_enforced_across_processes(remotes: Any) -> None:
    a, b = remotes(2, capacity=5)
    ch = b.call("new_channel")
    assert a.call("send_many", ch, [{"type": "m", "i": i} for i in range(10)]) == 5
    assert a.call("stats").raised["full"] == 1
    assert [m["i"] for m in b.call("receive_many", ch, 5, 10)] == [0, 1, 2, 3, 4]
    # room again once received
    assert a.call("send_many", ch, [{"type": "m", "i": 5}]) == 1


def test_expiry_across_processes(remotes: Any) -> None:
    a, b = remotes(2, expiry=0.5)
    ch = b.call("new_channel")
    a.call("send", ch, {"type": "old"})
    import time

    time.sleep(0.8)
    a.call("send", ch, {"type": "new"})
    assert b.call("receive", ch, 10)["type"] == "new"
    assert b.call("stats").dropped["expired"] == 1


def test_one_megabyte_messages_on_every_path(remotes: Any) -> None:
    a, b, c = remotes(3)
    blob = bytes(range(256)) * 4096  # 1 MiB
    ch = b.call("new_channel")
    b.call("collect", ch, 6)
    for k in range(3):
        a.call("send", ch, {"type": "big", "k": k, "blob": blob})
    c.call("group_add", "big", c.call("new_channel"))
    b.call("group_add", "big", ch)
    a.call("group_send", "big", {"type": "big", "k": 3, "blob": blob})
    a.call("send", "bigtasks", {"type": "big", "k": 4, "blob": blob})
    got_normal = c.call("receive", "bigtasks", 20)
    assert got_normal["blob"] == blob
    a.call("send", ch, {"type": "big", "k": 5, "blob": blob})
    a.call("send", ch, {"type": "big", "k": 6, "blob": blob})
    got = b.call("wait_collected", ch, 30)
    assert [m["k"] for m in got] == [0, 1, 2, 3, 5, 6]
    assert all(m["blob"] == blob for m in got)


def test_flush_from_one_process_empties_all(remotes: Any) -> None:
    a, b, c = remotes(3)
    ch = b.call("new_channel")
    b.call("group_add", "g", ch)
    a.call("send", ch, {"type": "before"})
    a.call("group_send", "g", {"type": "before-group"})
    a.call("send", "q", {"type": "parked-before"})
    c.call("flush")
    a.call("send", ch, {"type": "after"})
    assert b.call("receive", ch, 10)["type"] == "after"
    # groups are gone too
    a.call("group_send", "g", {"type": "group-after-flush"})
    with pytest.raises(RemoteError, match="TimeoutError"):
        b.call("receive", ch, 0.5)
    # the normal channel's parked message is gone; a new one arrives
    a.call("send", "q", {"type": "parked-after"})
    assert c.call("receive", "q", 10)["type"] == "parked-after"


def test_many_writers_hammering_one_inbox_lose_nothing_and_see_no_corruption(
    remotes: Any,
) -> None:
    # Regression: shared words written with struct.pack_into (which zeroes a field
    # before writing it) let a reader see tail == 0 and reset its inbox. Three writers
    # at full speed against one reader exercise every shared word at once.
    writers = remotes(3, capacity=100_000)
    (reader,) = remotes(1, capacity=100_000)
    ch = reader.call("new_channel")
    n = 6000
    reader.call("collect", ch, 3 * n)
    for k, w in enumerate(writers):
        w.conn.send(("send_many", ch, [{"type": "m", "src": k, "seq": i} for i in range(n)]))
    for w in writers:
        assert w.conn.poll(60)
        assert w.conn.recv() == ("ok", n)
    got = reader.call("wait_collected", ch, 60)
    assert len(got) == 3 * n
    for k in range(3):
        assert [m["seq"] for m in got if m["src"] == k] == list(range(n))
    assert reader.call("stats").dropped["corrupt"] == 0


def test_spinning_receivers_answer_every_ping_in_order(remotes: Any) -> None:
    """receive_spin_us: replies that arrive while a receiver polls (no doorbell) and
    after it has gone to sleep (doorbell) all arrive, in order."""
    a, b = remotes(2, receive_spin_us=2000)
    ch = b.call("new_channel")
    n = 300
    b.call("echo", ch, n + 1)
    assert a.call("pingpong", ch, n) == list(range(n))
    time.sleep(0.05)  # b has gone to sleep on its doorbell (the spin is 2 ms)
    assert a.call("pingpong", ch, 1) == [0]
    assert sum(a.call("stats").dropped.values()) == 0


def test_sleepers_on_two_threads_loops_are_all_woken_every_round(
    remotes: Any, layer_config: dict[str, Any]
) -> None:
    """Receivers on two event loops in two threads of one process go to sleep and are
    woken again, round after round, by group sends from another process. One fenced
    "waiting" flag covers every sleeper of the process (later sleepers skip the fence
    while it stays up): a lost wake-up leaves a receiver asleep and fails the wait."""
    import asyncio
    import threading

    from hybrid_layer import HybridChannelLayer

    (sender,) = remotes(1)
    layer = HybridChannelLayer(**layer_config)
    rounds, per_loop = 150, 8
    got: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    ready = threading.Barrier(3)

    def run_loop() -> None:
        async def main() -> None:
            chans = [await layer.new_channel() for _ in range(per_loop)]
            for ch in chans:
                got[ch] = []
                await layer.group_add("g", ch)

            async def pump(ch: str) -> None:
                while len(got[ch]) < rounds:
                    got[ch].append((await layer.receive(ch))["r"])

            ready.wait(10)
            await asyncio.wait_for(asyncio.gather(*(pump(c) for c in chans)), 60)

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run_loop) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        ready.wait(10)
        for r in range(rounds):
            sender.call("group_send", "g", {"type": "m", "r": r})
            if r % 10 == 0:
                time.sleep(0.002)  # let every receiver fall asleep again
        for t in threads:
            t.join(90)
        assert not errors, errors
        assert len(got) == 2 * per_loop
        for ch, rs in got.items():
            assert rs == list(range(rounds)), ch
    finally:
        async_close(layer)


def async_close(layer: Any) -> None:
    import asyncio

    asyncio.run(layer.close())


async def test_a_receiver_that_timed_out_is_rung_on_its_next_sleep(
    remotes: Any, layer: Any
) -> None:
    """A receive() that times out (cancelled) lowers the process's waiting flag; the
    next sleeper must raise and fence it again (later sleepers skip the fence only
    while it stays up), or a send from another process finds no sleeper to ring and
    the receiver waits for the 1-second safety sweep. Each round must arrive well
    before that sweep."""
    import asyncio

    (sender,) = remotes(1)
    ch = await layer.new_channel()
    for r in range(25):
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(layer.receive(ch), 0.005)
        task = asyncio.create_task(layer.receive(ch))
        await asyncio.sleep(0.002)  # asleep on the doorbell
        sender.call("send", ch, {"type": "m", "r": r})
        msg = await asyncio.wait_for(task, 0.5)
        assert msg["r"] == r
