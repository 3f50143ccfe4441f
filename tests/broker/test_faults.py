"""Faults on a host's RabbitMQ link, with real processes on two simulated hosts.

The faulted host ("ha") reaches the broker through our own TCP proxy
(:mod:`tests.broker.proxy`), with a short heartbeat and connect timeout so that a
stalled link is noticed in seconds; the other host ("hb") connects directly. What must
hold through every fault: same-host traffic never stops, cross-host sends never hang or
raise while the link is down (they are dropped and counted as ``link_down``), and once
the fault is gone the link comes back by itself with its group bindings restored.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.broker.conftest import HostsFactory
from tests.broker.proxy import Proxy
from tests.remote import Remote, RemoteError, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.broker]

# the faulted host: a stall is noticed after (heartbeat + 1) * 3 s without a frame
# (aiormq's grace), a hanging connect attempt gives up after connect_timeout
FAULTED = {"heartbeat": 1, "connect_timeout": 1}
SEND_BOUND = 1.0  # a cross-host send while the link is down returns within this


# ---------------------------------------------------------------------- helpers
def link(r: Remote) -> dict[str, Any]:
    return r.call("stats").broker  # type: ignore[no-any-return]


def wait_link(r: Remote, state: str, timeout: float) -> float:
    """Seconds until the host's link (as ``r`` sees it) is ``state``; fails after timeout."""
    t0 = time.monotonic()
    assert wait_until(lambda: link(r)["link"] == state, timeout, 0.02), (
        f"link not {state} after {timeout}s: {link(r)}"
    )
    return time.monotonic() - t0


def leader(rs: list[Remote]) -> Remote:
    leaders = [r for r in rs if r.call("internals")["is_leader"]]
    assert len(leaders) == 1, "exactly one leader per host"
    return leaders[0]


def link_drops(r: Remote) -> int:
    return r.call("stats").dropped["link_down"]  # type: ignore[no-any-return]


def timed(r: Remote, *cmd: Any) -> float:
    t0 = time.monotonic()
    r.call(*cmd, timeout=10)
    return time.monotonic() - t0


def assert_local_traffic(a: list[Remote], chans: list[str], tag: str) -> None:
    """Each process of the host sends to the next one's channel: delivered."""
    for i, r in enumerate(a):
        j = (i + 1) % len(a)
        r.call("send", chans[j], {"type": "local", "tag": tag, "from": i})
        got = a[j].call("receive", chans[j], 5)
        assert got == {"type": "local", "tag": tag, "from": i}


def assert_nothing(r: Remote, ch: str, wait: float = 0.3) -> None:
    with pytest.raises(RemoteError, match="TimeoutError"):
        r.call("receive", ch, wait)


class Pair:
    """Host "ha" (``a``, reached through the proxy) and host "hb" (``b``, direct):
    one channel per process, and ``a[-1]``'s channel in group "room"."""

    def __init__(self, a: list[Remote], b: Remote) -> None:
        self.a, self.b = a, b
        self.ca = [r.call("new_channel") for r in a]
        self.cb = b.call("new_channel")
        a[-1].call("group_add", "room", self.ca[-1])
        self.member, self.room = a[-1], self.ca[-1]

    def assert_cross_host(self, tag: str) -> None:
        """Direct both ways and a group send from hb, each delivered (first in line)."""
        b, a0, ca0 = self.b, self.a[0], self.ca[0]
        b.call("send", ca0, {"type": "b2a", "tag": tag})
        assert a0.call("receive", ca0, 5) == {"type": "b2a", "tag": tag}
        a0.call("send", self.cb, {"type": "a2b", "tag": tag})
        assert b.call("receive", self.cb, 5) == {"type": "a2b", "tag": tag}
        b.call("group_send", "room", {"type": "g", "tag": tag})
        assert self.member.call("receive", self.room, 5) == {"type": "g", "tag": tag}

    def send_during_outage(self, n: int = 3, tag: str = "kept") -> list[dict[str, Any]]:
        """Cross-host sends from every process of ha while its link is down: bounded,
        no error, nothing dropped (kept for the link). Returns what was sent to cb."""
        sent = []
        for i, r in enumerate(self.a):
            before = link_drops(r)
            for k in range(n):
                m = {"type": tag, "from": i, "k": k}
                took = timed(r, "send", self.cb, m)
                assert took < SEND_BOUND, f"a send with the link down took {took:.2f}s"
                sent.append(m)
            took = timed(r, "group_send", "elsewhere", {"type": "kept-group"})
            assert took < SEND_BOUND, f"a group_send with the link down took {took:.2f}s"
            assert link_drops(r) == before, "kept, not dropped"
        return sent

    def assert_delivered_once(self, sent: list[dict[str, Any]]) -> None:
        """Everything in ``sent`` reaches cb exactly once, in order per sender."""
        got = [self.b.call("receive", self.cb, 10) for _ in sent]
        assert sorted(map(repr, got)) == sorted(map(repr, sent)), (got, sent)
        for i in range(len(self.a)):
            mine = [m for m in got if m["from"] == i]
            assert mine == [m for m in sent if m["from"] == i], "FIFO per sender"

    def wait_recovered(self, timeout: float) -> float:
        """Seconds until ha's link is up again on a new connection with "room" bound."""
        t0 = time.monotonic()
        ld = leader(self.a)

        def ok() -> bool:
            st = link(ld)
            return st["link"] == "up" and st["reconnects"] >= 1 and st["bindings"] >= 1

        assert wait_until(ok, timeout, 0.02), f"not recovered in {timeout}s: {link(ld)}"
        return time.monotonic() - t0


def faulted_pair(proxy: Proxy, hosts: HostsFactory) -> tuple[list[Remote], Remote, Pair]:
    """Host "ha" (2 processes, its broker link through ``proxy``) and host "hb" (1,
    direct), with traffic both ways checked before any fault."""
    a = hosts({"ha": 2}, host=proxy.url, **FAULTED)["ha"]
    (b,) = hosts({"hb": 1})["hb"]
    env = Pair(a, b)
    env.assert_cross_host("before")
    return a, b, env


# ---------------------------------------------------------------------- tests
def test_stalled_link_is_detected_local_traffic_flows_and_it_recovers_on_resume(
    proxy: Proxy, hosts: HostsFactory
) -> None:
    a, b, env = faulted_pair(proxy, hosts)
    ld = leader(a)
    assert link(ld)["bindings"] == 1 and link(ld)["reconnects"] == 0

    proxy.stall()
    assert_local_traffic(a, env.ca, "stalled")  # not even noticed yet
    # sent before the stall is noticed: into a dead connection, yet no send waits, and
    # each is counted once the leader gives the connection up
    # sent before the stall is noticed: published into a dead connection, unconfirmed;
    # published again on the next connection (and deduplicated if both arrive)
    unnoticed = []
    for i, r in enumerate(a):
        for k in range(2):
            m = {"type": "unnoticed", "from": i, "k": k}
            took = timed(r, "send", env.cb, m)
            assert took < SEND_BOUND, f"a send into a stalled link took {took:.2f}s"
            unnoticed.append(m)
    detect = wait_link(a[0], "down", 15)
    assert_local_traffic(a, env.ca, "down")
    kept = env.send_during_outage()
    assert link(ld)["bindings"] == 0, "a dead connection's bindings are gone"
    assert proxy.connections >= 1, "the stall holds connections open"

    proxy.resume()
    took = env.wait_recovered(15)
    print(f"stall noticed after {detect:.2f}s; link back {took:.2f}s after resume")
    assert took < 5, f"reconnecting took {took:.2f}s after the stall ended"
    env.assert_delivered_once(unnoticed + kept)
    assert sum(link_drops(r) for r in a) == 0
    env.assert_cross_host("after")
    assert_nothing(b, env.cb)
    assert_local_traffic(a, env.ca, "after")
    # the attempts that timed out during the stall closed their sockets
    assert wait_until(lambda: proxy.connections == 1, 5), proxy.connections


def test_cut_link_keeps_what_is_sent_and_delivers_it_when_the_broker_accepts(
    proxy: Proxy, hosts: HostsFactory
) -> None:
    a, b, env = faulted_pair(proxy, hosts)
    ld = leader(a)

    proxy.refuse()  # keep it down after the cut, long enough to send into the gap
    assert proxy.cut() == 1, "ha has one connection: its leader's"
    detect = wait_link(a[0], "down", 5)
    assert_local_traffic(a, env.ca, "down")
    kept = env.send_during_outage()
    assert link(ld)["bindings"] == 0
    assert link(a[1])["reason"], "status says why the link is down"

    proxy.accept()
    took = env.wait_recovered(15)
    print(f"cut noticed after {detect:.2f}s; link back {took:.2f}s after accept")
    assert detect < 1, f"a reset connection was noticed only after {detect:.2f}s"
    assert took < 5, f"reconnecting took {took:.2f}s after the broker accepted again"
    env.assert_delivered_once(kept)
    env.assert_cross_host("after")
    assert_nothing(b, env.cb)
    assert_local_traffic(a, env.ca, "after")
    assert proxy.connections == 1


def test_link_cut_in_the_middle_of_a_frame_recovers_without_hanging_anyone(
    proxy: Proxy, hosts: HostsFactory
) -> None:
    a, b, env = faulted_pair(proxy, hosts)
    ld, a0, ca0 = leader(a), a[0], env.ca[0]
    a0.call("collect", ca0, 1_000_000)
    blob = "x" * 1000

    def batch(lo: int, hi: int) -> list[dict[str, Any]]:
        return [{"type": "m", "n": i, "b": blob} for i in range(lo, hi)]

    assert b.call("send_many", ca0, batch(0, 100)) == 100
    assert wait_until(lambda: len(a0.call("collected", ca0)) == 100, 10)
    proxy.cut_mid_frame(min_chunk=200)  # a chunk of deliveries, not a heartbeat
    t0 = time.monotonic()
    assert b.call("send_many", ca0, batch(100, 400)) == 300, "hb's sends are not affected"
    fwd, size = proxy.wait_mid_frame_cut(10)
    assert 0 < fwd < size

    took = env.wait_recovered(15)
    print(f"mid-frame cut: link back {time.monotonic() - t0:.2f}s after the cut")
    assert took < 5
    for r in (*a, b):  # nobody hangs
        r.call("stats", timeout=5)
    b.call("send", ca0, {"type": "after"})
    assert wait_until(lambda: a0.call("collected", ca0)[-1:] == [{"type": "after"}], 5)
    got = a0.call("collected", ca0)[:-1]
    nums = [m["n"] for m in got]
    assert nums[:100] == list(range(100))
    assert all(m == {"type": "m", "n": m["n"], "b": blob} for m in got), "nothing torn"
    # the host queue outlives the connection: what the broker had handed out on the
    # cut connection unacknowledged comes again, and what was delivered is skipped
    assert nums == list(range(400)), "all of it, once each, in order"
    assert ld.call("stats").dropped["malformed"] == 0
    b.call("group_send", "room", {"type": "g", "tag": "after"})
    assert env.member.call("receive", env.room, 5) == {"type": "g", "tag": "after"}


def test_broker_unreachable_at_start_then_link_comes_up(
    proxy: Proxy, procs: Any, hosts: HostsFactory
) -> None:
    (b,) = hosts({"hb": 1})["hb"]
    proxy.refuse()
    a = procs("ha", 2, host=proxy.url, **FAULTED)
    a[0].call("internals")  # attach a[0] first: it leads
    wait_link(a[1], "down", 5)
    assert proxy.refused >= 1 and proxy.connections == 0
    t0 = time.monotonic()
    env = Pair(a, b)  # a[1] joins "room" while down: bound once the link is up
    took = time.monotonic() - t0
    assert took < 2 * SEND_BOUND, f"joining a group with the link down took {took:.2f}s"
    assert_local_traffic(a, env.ca, "down")
    kept = env.send_during_outage()
    ld = leader(a)
    assert link(ld)["bindings"] == 0

    proxy.accept()
    t0 = time.monotonic()
    assert wait_until(lambda: link(ld)["link"] == "up" and link(ld)["bindings"] == 1, 15, 0.02)
    print(f"link up {time.monotonic() - t0:.2f}s after the broker accepted")
    assert link(ld)["reconnects"] == 0, "a first connection is not a reconnect"
    env.assert_delivered_once(kept)
    env.assert_cross_host("after")
    assert_nothing(b, env.cb)
    assert_local_traffic(a, env.ca, "after")


def test_on_disconnect_and_on_reconnect_reach_group_members(
    proxy: Proxy, hosts: HostsFactory
) -> None:
    notify = {"on_disconnect": "link.down", "on_reconnect": "link.up"}
    a = hosts({"ha": 2}, host=proxy.url, **notify, **FAULTED)["ha"]
    (b,) = hosts({"hb": 1})["hb"]
    env = Pair(a, b)
    plain = a[0].call("new_channel")  # in no group: not told
    other = a[0].call("new_channel")
    a[0].call("group_add", "other", other)
    env.assert_cross_host("before")

    down = {"type": "link.down", "host_id": "ha"}
    up = {"type": "link.up", "host_id": "ha"}
    # a cut link is back within ~0.1-0.2 s: about a host-thread tick (0.1 s), so a few
    # times over, each gap must be told however short
    for _ in range(5):
        assert proxy.cut() == 1
        t0 = time.monotonic()
        assert env.member.call("receive", env.room, 5) == down
        assert a[0].call("receive", other, 5) == down
        assert env.member.call("receive", env.room, 10) == up
        assert a[0].call("receive", other, 5) == up
        print(f"cut: told down and up again within {time.monotonic() - t0:.2f}s")
        assert_nothing(a[0], other, 0.1)  # once each
        assert_nothing(env.member, env.room, 0.1)
    assert_nothing(a[0], plain)
    env.wait_recovered(5)
    env.assert_cross_host("after")


def test_leader_sigkill_another_process_leads_and_cross_host_traffic_resumes(
    hosts: HostsFactory,
) -> None:
    a = hosts({"ha": 3})["ha"]
    (b,) = hosts({"hb": 1})["hb"]
    old = leader(a)
    s1, s2 = (r for r in a if r is not old)
    c1, c2 = s1.call("new_channel"), s2.call("new_channel")
    s1.call("group_add", "room", c1)
    s2.call("group_add", "room", c2)
    b.call("group_send", "room", {"type": "g", "tag": "before"})
    assert s1.call("receive", c1, 5) == {"type": "g", "tag": "before"}
    assert s2.call("receive", c2, 5) == {"type": "g", "tag": "before"}

    old.kill()
    t0 = time.monotonic()
    # same-host traffic does not wait for the new leader
    s1.call("send", c2, {"type": "local", "n": 1})
    assert s2.call("receive", c2, 2) == {"type": "local", "n": 1}
    s2.call("send", c1, {"type": "local", "n": 2})
    assert s1.call("receive", c1, 2) == {"type": "local", "n": 2}
    local = time.monotonic() - t0
    assert local < 1, f"same-host traffic stalled {local:.2f}s during failover"

    def new_leader() -> Remote | None:
        for r in (s1, s2):
            st = r.call("stats")
            if st.is_leader and st.broker["link"] == "up" and st.broker["bindings"] == 1:
                return r
        return None

    assert wait_until(lambda: new_leader() is not None, 10, 0.02)
    took = time.monotonic() - t0
    print(f"leader failover: a new leader's link up and bound {took:.2f}s after SIGKILL")
    assert took < 5, f"failover took {took:.2f}s"
    assert s1.call("global_stats").leader_pid in {s1.pid, s2.pid}

    b.call("group_send", "room", {"type": "g", "tag": "after"})
    assert s1.call("receive", c1, 5) == {"type": "g", "tag": "after"}
    assert s2.call("receive", c2, 5) == {"type": "g", "tag": "after"}
    b.call("send", c1, {"type": "direct", "tag": "after"})
    assert s1.call("receive", c1, 5) == {"type": "direct", "tag": "after"}
    cb = b.call("new_channel")
    s2.call("send", cb, {"type": "a2b"})
    assert b.call("receive", cb, 5) == {"type": "a2b"}


def publish_raw(url: str, queue: str, bodies: list[bytes]) -> None:
    """Publish bodies straight to a queue on the broker, as nobody of ours would."""
    import aiormq

    async def run() -> None:
        conn = await aiormq.connect(url)
        try:
            ch = await conn.channel(publisher_confirms=True)
            for body in bodies:
                await ch.basic_publish(body, routing_key=queue, mandatory=True)
        finally:
            await conn.close()

    asyncio.run(run())


def test_malformed_messages_on_the_host_queue_are_dropped_and_counted(
    hosts: HostsFactory, broker_url: str, broker_config: dict[str, Any]
) -> None:
    from hybrid_layer.amqp import wire
    from hybrid_layer.amqp.topology import host_queue
    from hybrid_layer.envelope import encode_message

    (a,) = hosts({"ha": 1})["ha"]
    (b,) = hosts({"hb": 1})["hb"]
    ca = a.call("new_channel")

    def good(n: int) -> bytes:
        msg = encode_message({"type": "good", "n": n})
        return wire.encode(wire.DIRECT, "hb", ca, time.time() + 10, msg)

    valid = good(0)
    garbage = [
        b"",
        b"\xde\xad\xbe\xef" * 8,
        valid[: wire.HEADER.size - 1],  # shorter than a header
        valid[: wire.HEADER.size + 3],  # names overrun the frame
        bytes([0x7F]) + valid[1:],  # unknown version
        valid[:1] + bytes([9]) + valid[2:],  # unknown kind
        wire.encode(wire.NORMAL, "hb", "some.normal", time.time() + 10, b"x"),  # wrong queue
        # well framed, but the payload is no message: the receiver could not decode it
        wire.encode(wire.DIRECT, "hb", ca, time.time() + 10, b"\xc1\xc1"),
        wire.encode(wire.DIRECT, "hb", ca, time.time() + 10, b"\x93\x01\x02\x03"),  # a list
    ]
    publish_raw(broker_url, host_queue(broker_config["prefix"], "ha"), [good(1), *garbage, good(2)])
    assert a.call("receive", ca, 5) == {"type": "good", "n": 1}
    assert a.call("receive", ca, 5) == {"type": "good", "n": 2}
    assert wait_until(lambda: a.call("stats").dropped["malformed"] == len(garbage), 5)
    # and the link keeps going
    b.call("send", ca, {"type": "after"})
    assert a.call("receive", ca, 5) == {"type": "after"}
    assert link(a)["link"] == "up" and link(a)["reconnects"] == 0


def test_kept_messages_expire_on_time_while_their_probe_is_unanswered(
    proxy: Proxy, hosts: HostsFactory
) -> None:
    """Messages kept for a queue the broker returns them from are tried one at a time
    (a probe). A probe can go unanswered for long (a quorum queue left without a leader
    after its node's SIGKILL, a stalled connection): what is kept behind it must still
    expire at its deadline and be counted, not wait for the answer or for close."""
    (a,) = hosts({"ha": 1})["ha"]
    (b,) = hosts({"hb": 1}, host=proxy.url, expiry=2, heartbeat=60)["hb"]
    ghost = a.call("new_channel", "x.").replace(".ha.", ".nohost.")  # no such host queue
    b.call("send", ghost, {"type": "first"})
    assert wait_until(lambda: b.call("stats").broker["retried"] >= 1, 5)
    proxy.stall()  # the link stays up (heartbeat 60 s); the next probe goes unanswered
    try:
        time.sleep(1.2)  # (the probes back off to 1 s: one is out now)
        for i in range(5):
            b.call("send", ghost, {"type": "kept", "i": i})
        # they expire 2 s after their send: counted within a moment of it
        assert wait_until(lambda: b.call("stats").dropped["no_channel"] >= 5, 4), b.call("stats")
    finally:
        proxy.resume()


def test_a_publish_left_unanswered_on_a_live_connection_ends_it(
    proxy: Proxy, hosts: HostsFactory
) -> None:
    """RabbitMQ can leave a channel's publish unanswered for ever (a quorum queue's
    failover, tests/broker/test_cluster.py) while the connection lives. A publish
    unanswered for CONFIRM_STALL seconds ends the connection: the link reconnects and
    publishes it again, so it arrives (a heartbeat of 60 s would not notice)."""
    from hybrid_layer.amqp.confirms import CONFIRM_STALL

    (a,) = hosts({"ha": 1}, expiry=60)["ha"]
    (b,) = hosts({"hb": 1}, host=proxy.url, heartbeat=60, expiry=60)["hb"]
    ch = a.call("new_channel", "x.")
    a.call("collect", ch, 2)
    b.call("send", ch, {"type": "before"})
    assert wait_until(lambda: b.call("stats").broker["confirmed"] >= 1, 5)
    proxy.stall()
    try:
        b.call("send", ch, {"type": "during"})  # published, never answered
        stalled = time.monotonic()
        assert wait_until(lambda: b.call("stats").broker["link"] != "up", CONFIRM_STALL + 5)
        assert time.monotonic() - stalled >= CONFIRM_STALL - 1.5
    finally:
        proxy.resume()
    got = a.call("wait_collected", ch, 30.0, timeout=40)
    assert [m["type"] for m in got] == ["before", "during"]
