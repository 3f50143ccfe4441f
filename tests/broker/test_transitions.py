"""Cross-host transitions lose nothing: a cold start, a leader's death, a host_id clash,
thousands of bindings restored before ``on_reconnect``, an oversized frame.

Real processes, real shared memory, the real RabbitMQ (faults through our own proxy or
SIGKILL); each test its own prefix.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from tests.broker.conftest import HostsFactory
from tests.broker.proxy import Proxy
from tests.broker.test_faults import leader, link
from tests.remote import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def seqs_by_sender(got: list[dict[str, Any]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for m in got:
        out.setdefault(m["s"], []).append(m["n"])
    return out


def test_cold_start_two_senders_lose_nothing(procs: Any) -> None:
    """Both hosts fresh, no warm-up: the receiver's host queue may not exist yet and
    the senders' leader has no link yet. Every accepted message arrives once, in order."""
    n = 2000
    (b,) = procs("hb", 1)
    cb = b.call("new_channel")  # attaches hb: its link is only now coming up
    b.call("collect", cb, 2 * n)
    a = procs("ha", 2)
    for i, r in enumerate(a):
        r.start_call("send_many", cb, [{"type": "m", "s": i, "n": k} for k in range(n)])
    accepted = [r.result(60) for r in a]
    got = b.call("wait_collected", cb, 60, timeout=70)
    by = seqs_by_sender(got)
    for i, acc in enumerate(accepted):
        assert by.get(i, []) == list(range(acc)), f"sender {i}: lost, duplicated or reordered"
    assert sum(accepted) == 2 * n, f"accepted {accepted}: pushed back though the bound is not hit"
    drops = [r.call("stats").dropped for r in (*a, b)]
    assert all(d["link_down"] == 0 and d["no_channel"] == 0 for d in drops), drops


def test_fresh_channel_of_a_host_coming_up_receives_at_once(
    procs: Any, hosts: HostsFactory
) -> None:
    """Issue 13 item 4: new_channel() on a host whose link is still coming up, handed to
    another host, which sends to it before the owner's first receive()."""
    (a,) = hosts({"ha": 1})["ha"]
    (b,) = procs("hb", 1)
    cb = b.call("new_channel")
    a.call("send", cb, {"type": "early"})
    assert b.call("receive", cb, 10) == {"type": "early"}


def test_receiving_leader_sigkill_loses_and_duplicates_nothing(hosts: HostsFactory) -> None:
    """The receiving host's leader dies under traffic: its queue outlives it, the next
    leader consumes it, what the dead one had delivered is not delivered again."""
    hb = hosts({"hb": 2}, capacity=10_000)["hb"]  # (a copy to a full member is dropped)
    old = leader(hb)
    (rcv,) = (r for r in hb if r is not old)
    (a,) = hosts({"ha": 1}, capacity=10_000)["ha"]
    ch = rcv.call("new_channel")
    rcv.call("group_add", "room", ch)
    n = 3000
    rcv.call("collect", ch, 2 * n)
    a.start_call("send_many", ch, [{"type": "m", "s": 0, "n": k} for k in range(n)])
    time.sleep(0.05)
    old.kill()
    assert a.result(60) == n
    for k in range(0, n, 10):
        a.call("group_send", "room", {"type": "g", "s": 1, "n": k})
    groups = n // 10
    assert wait_until(lambda: len(rcv.call("collected", ch)) >= n + groups - 3, 20), (
        len(rcv.call("collected", ch)),
        rcv.call("stats").dropped,
        rcv.call("stats").broker,
        a.call("stats").dropped,
        a.call("stats").broker,
    )
    time.sleep(0.5)  # (anything still on its way)
    by = seqs_by_sender(rcv.call("collected", ch))
    for s, want in ((0, list(range(n))), (1, list(range(0, n, 10)))):
        got = by.get(s, [])
        assert got == sorted(set(got)), f"sender {s}: duplicated or reordered"
        lost = set(want) - set(got)
        # at most what the dead leader had taken from the broker and not yet written
        # (the README's failure table); the target is 0.1 % of what was accepted
        assert len(lost) <= max(1, len(want) // 1000), (s, sorted(lost))


def test_same_host_id_on_a_second_host_is_refused_loudly(
    hosts: HostsFactory, broker_config: dict[str, Any]
) -> None:
    """A second host (its own /dev/shm, as a container would have) with the same
    host_id never shares the first one's queue: its link stays down with the reason,
    an ERROR, and a counter; the first host is undisturbed."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private /dev/shm (CI runs as root)")
    (a,) = hosts({"dup": 1})["dup"]
    (c,) = hosts({"hc": 1})["hc"]
    ca = a.call("new_channel")
    cfg = {**broker_config, "host_id": "dup", "heartbeat": 1}
    script = textwrap.dedent(
        f"""
        import asyncio, json, logging, time
        logging.basicConfig(level=logging.WARNING)
        from hybrid_layer import HybridChannelLayer
        async def main():
            lay = HybridChannelLayer(**{cfg!r})
            await lay.new_channel()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                b = lay.statistics().broker
                if b.get("claim_refused") and "claimed" in b.get("reason", ""):
                    break
                await asyncio.sleep(0.2)
            print(json.dumps(lay.statistics().broker), flush=True)
            await lay.close()
        asyncio.run(main())
        """
    )
    inner = f'mount -t tmpfs -o mode=1777 tmpfs /dev/shm && exec {sys.executable} -c "$0"'
    proc = subprocess.run(
        ["unshare", "--mount", "--ipc", "sh", "-c", inner, script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.getcwd(),
    )
    assert proc.returncode == 0, proc.stderr
    import json

    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["link"] != "up", info
    assert "claimed by another connection" in info["reason"], info
    assert info["claim_refused"] >= 1
    assert "ERROR" in proc.stderr and "same host_id" in proc.stderr, proc.stderr
    # the first host still works both ways
    c.call("send", ca, {"type": "still"})
    assert a.call("receive", ca, 5) == {"type": "still"}


def test_two_thousand_bindings_are_back_before_on_reconnect(
    proxy: Proxy, hosts: HostsFactory
) -> None:
    """After a cut, on_reconnect reaches a member only once every binding is in place:
    a group_send to the last group, sent the moment it arrives, is delivered."""
    a = hosts({"ha": 1}, host=proxy.url, heartbeat=1, on_reconnect="broker.reconnect")["ha"][0]
    (b,) = hosts({"hb": 1})["hb"]
    ch = a.call("new_channel")
    groups = [f"g{i}" for i in range(2000)]
    for g in groups:
        a.call("group_add", g, ch)
    assert wait_until(lambda: link(a)["bindings"] == 2000, 20), link(a)
    proxy.cut()
    assert wait_until(lambda: link(a)["link"] != "up", 5)
    msg = a.call("receive", ch, 30)
    assert msg["type"] == "broker.reconnect"
    b.call("group_send", groups[-1], {"type": "last"})
    b.call("group_send", groups[0], {"type": "first"})
    got = [a.call("receive", ch, 5) for _ in range(2)]
    assert {m["type"] for m in got} == {"last", "first"}
    assert link(a)["last_sync"] > 0


def test_frame_over_this_hosts_limit_is_dropped_on_arrival(hosts: HostsFactory) -> None:
    """Hosts that disagree on max_message_bytes: the larger message is dropped and
    counted where it arrives; the channel is not blocked behind it."""
    (big,) = hosts({"hbig": 1}, max_message_bytes=4 * 1024 * 1024)["hbig"]
    (small,) = hosts({"hsmall": 1}, max_message_bytes=2 * 1024 * 1024)["hsmall"]
    ch = small.call("new_channel")
    big.call("send", ch, {"type": "huge", "b": b"x" * (3 * 1024 * 1024)})
    big.call("send", ch, {"type": "after"})
    assert small.call("receive", ch, 10) == {"type": "after"}
    assert wait_until(lambda: small.call("stats").dropped["too_large"] == 1, 5)


def test_quorum_host_queues_carry_traffic(hosts: HostsFactory) -> None:
    hs = hosts({"qa": 1, "qb": 1}, queue_type="quorum")
    (a,), (b,) = hs["qa"], hs["qb"]
    ca, cb = a.call("new_channel"), b.call("new_channel")
    b.call("group_add", "room", cb)
    a.call("send", cb, {"type": "direct"})
    a.call("group_send", "room", {"type": "group"})
    assert [b.call("receive", cb, 10) for _ in range(2)] == [
        {"type": "direct"},
        {"type": "group"},
    ]
    b.call("send", ca, {"type": "back"})
    assert a.call("receive", ca, 10) == {"type": "back"}


def test_upgrade_from_an_exclusive_host_queue(procs: Any, broker_url: str, ns_prefix: str) -> None:
    """An old version's leader holds the host's queue exclusively: the new leader keeps
    trying (its cross-host messages kept) and takes over once the old one is gone."""
    import asyncio
    import threading

    import aiormq

    held = threading.Event()
    release = threading.Event()

    def old_leader() -> None:
        async def run() -> None:
            conn = await aiormq.connect(broker_url)
            ch = await conn.channel()
            await ch.queue_declare(f"{ns_prefix}.up", exclusive=True, auto_delete=True)
            held.set()
            while not release.is_set():
                await asyncio.sleep(0.05)
            await conn.close()

        asyncio.run(run())

    t = threading.Thread(target=old_leader)
    t.start()
    try:
        assert held.wait(10)
        (new,) = procs("up", 1)
        (other,) = procs("other", 1)
        other.call("wait_link", 15.0, timeout=20)
        ch = new.call("new_channel")
        co = other.call("new_channel")
        assert wait_until(lambda: link(new)["link"] == "down", 10), link(new)
        assert link(new)["reason"]
        # (what other hosts send meanwhile goes to the old leader, which holds the queue)
        new.call("send", co, {"type": "while-upgrading"})  # kept by the new leader
    finally:
        release.set()
        t.join(10)
    assert wait_until(lambda: link(new)["link"] == "up", 15), link(new)
    assert other.call("receive", co, 10) == {"type": "while-upgrading"}
    other.call("send", ch, {"type": "after"})
    assert new.call("receive", ch, 10) == {"type": "after"}


def test_sending_leader_sigkill_hands_its_unread_hand_offs_to_the_next(
    hosts: HostsFactory,
) -> None:
    """The sending host's leader dies with hand-offs in its ring: the next leader
    publishes them (ahead of newer ones): nothing duplicated or reordered, and only what
    it had in its own memory lost (the fault benchmark: 0 of 6 000 at 1 000/s)."""
    ha = hosts({"ha": 2}, capacity=10_000)["ha"]
    old = leader(ha)
    (snd,) = (r for r in ha if r is not old)
    (b,) = hosts({"hb": 1}, capacity=10_000)["hb"]
    ch = b.call("new_channel")
    n = 3000
    b.call("collect", ch, n)
    snd.start_call("send_many", ch, [{"type": "m", "s": 0, "n": k} for k in range(n)])
    time.sleep(0.05)
    held = old.call("stats").broker  # what it holds in its own memory, a moment before
    old.kill()
    accepted = snd.result(60)
    wait_until(lambda: len(b.call("collected", ch)) >= accepted - 3, 20)
    time.sleep(0.5)
    got = [m["n"] for m in b.call("collected", ch)]
    assert got == sorted(set(got)), "duplicated or reordered"
    lost = sorted(set(range(accepted)) - set(got))
    # only what the dead leader had taken off its ring and not yet got confirmed (its
    # outbound queue and in-flight publishes: about one batch, publish_batch = 128, when
    # the broker keeps up; in a burst on a busy machine, what had piled up), plus what
    # it took in the moment between that look and the kill - one run of numbers
    assert len(lost) <= held["outbound"] + held["in_flight"] + 2 * 128, (lost, held)
    assert lost == list(range(lost[0], lost[0] + len(lost))) if lost else True, lost
    assert wait_until(lambda: b.call("stats").dropped["no_channel"] == 0, 1)
