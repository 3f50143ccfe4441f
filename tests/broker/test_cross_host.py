"""Three simulated hosts (``host_id``), two or more processes each, one real RabbitMQ.

Every participant is a separate process (``tests.remote.Remote``); same-host traffic goes
through shared memory, cross-host traffic through each host's leader and the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.broker.conftest import (
    HostsFactory,
    delete_queues,
    normal_queue_name,
    rabbitmqctl,
)
from tests.remote import Remote, RemoteError, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]

LAYOUT = {"ha": 2, "hb": 2, "hc": 2}


def _all(hs: dict[str, list[Remote]]) -> list[tuple[str, Remote]]:
    return [(h, r) for h, rs in hs.items() for r in rs]


def leader_of(rs: list[Remote]) -> Remote:
    for r in rs:
        if r.call("internals")["is_leader"]:
            return r
    raise AssertionError("no leader among the host's processes")


class TestDirect:
    def test_every_process_reaches_every_other_host_in_order(self, hosts: HostsFactory) -> None:
        hs = hosts(LAYOUT)
        procs = _all(hs)
        chans = {r.pid: r.call("new_channel", "specific.") for _, r in procs}
        n = 30
        for h, r in procs:
            senders = [s for hh, s in procs if hh != h]
            r.call("collect", chans[r.pid], n * len(senders))
        for h, s in procs:
            for hh, r in procs:
                if hh == h:
                    continue
                msgs = [{"type": "m", "from": s.pid, "i": i} for i in range(n)]
                assert s.call("send_many", chans[r.pid], msgs) == n
        for h, r in procs:
            got = r.call("wait_collected", chans[r.pid], 30.0, timeout=40)
            by_sender: dict[int, list[int]] = {}
            for m in got:
                by_sender.setdefault(m["from"], []).append(m["i"])
            expected = {s.pid for hh, s in procs if hh != h}
            assert set(by_sender) == expected
            for seq in by_sender.values():
                assert seq == list(range(n))  # FIFO per sender, nothing lost or doubled

    def test_large_message_crosses_hosts(self, hosts: HostsFactory) -> None:
        hs = hosts({"ha": 1, "hb": 2})
        dst = hs["ha"][0]
        ch = dst.call("new_channel", "big.")
        payload = os.urandom(1024 * 1024)
        sender = hs["hb"][1]  # not necessarily the leader: via shared memory first
        sender.call("send", ch, {"type": "big", "data": payload})
        got = dst.call("receive", ch, 20.0, timeout=30)
        assert got["data"] == payload

    def test_unknown_remote_channel_is_retried_then_counted(self, hosts: HostsFactory) -> None:
        hs = hosts({"ha": 1, "hb": 1}, expiry=2)
        real = hs["ha"][0].call("new_channel", "x.")
        # a well-formed name for a host that does not exist: the broker returns it, and
        # the leader publishes it again (the host may be coming up) until it expires
        ghost = real.replace(".ha.", ".nohost.")
        hs["hb"][0].call("send", ghost, {"type": "lost"})
        assert wait_until(lambda: hs["hb"][0].call("stats").broker["retried"] >= 1, 5)
        assert hs["hb"][0].call("stats").dropped["no_channel"] == 0
        assert wait_until(lambda: hs["hb"][0].call("stats").dropped["no_channel"] >= 1, 10), hs[
            "hb"
        ][0].call("stats")
        assert hs["hb"][0].call("stats").broker["returned"] >= 2


class TestGroups:
    def test_group_spans_hosts_one_copy_per_member(self, hosts: HostsFactory) -> None:
        hs = hosts(LAYOUT)
        members: list[tuple[Remote, str]] = []
        for _, r in _all(hs):
            for _ in range(2):  # two channels per process: one copy each
                ch = r.call("new_channel", "m.")
                r.call("group_add", "room", ch)
                members.append((r, ch))
        for r, ch in members:
            r.call("collect", ch, 3)
        for h in LAYOUT:
            hs[h][0].call("group_send", "room", {"type": "g", "from": h})
        for r, ch in members:
            got = r.call("wait_collected", ch, 20.0, timeout=30)
            assert sorted(m["from"] for m in got) == sorted(LAYOUT)
        # nothing extra arrives (no echo of a host's own group send)
        time.sleep(0.3)
        for r, ch in members:
            with pytest.raises(RemoteError, match="Timeout"):
                r.call("receive", ch, 0.2)

    def test_bindings_follow_membership(self, hosts: HostsFactory) -> None:
        hs = hosts({"ha": 2, "hb": 1})
        a1, a2 = hs["ha"]
        b = hs["hb"][0]
        c1 = a1.call("new_channel", "m.")
        c2 = a2.call("new_channel", "m.")
        a1.call("group_add", "g1", c1)
        a2.call("group_add", "g1", c2)
        lead = leader_of(hs["ha"])
        assert wait_until(lambda: lead.call("stats").broker["bindings"] == 1, 5)
        b.call("group_send", "g1", {"type": "one"})
        assert a1.call("receive", c1, 10.0)["type"] == "one"
        assert a2.call("receive", c2, 10.0)["type"] == "one"
        # one member leaves: the host stays bound for the other
        a1.call("group_discard", "g1", c1)
        b.call("group_send", "g1", {"type": "two"})
        assert a2.call("receive", c2, 10.0)["type"] == "two"
        with pytest.raises(RemoteError, match="Timeout"):
            a1.call("receive", c1, 0.5)
        # the last member leaves: the binding goes
        a2.call("group_discard", "g1", c2)
        assert wait_until(lambda: lead.call("stats").broker["bindings"] == 0, 5)
        b.call("group_send", "g1", {"type": "three"})
        with pytest.raises(RemoteError, match="Timeout"):
            a2.call("receive", c2, 0.5)

    def test_group_add_then_send_from_another_host_right_away(self, hosts: HostsFactory) -> None:
        """``await group_add`` returns once the binding exists on the broker."""
        hs = hosts({"ha": 2, "hb": 1})
        follower = next(r for r in hs["ha"] if not r.call("internals")["is_leader"])
        for i in range(5):
            ch = follower.call("new_channel", "m.")
            follower.call("group_add", f"fresh{i}", ch)
            hs["hb"][0].call("group_send", f"fresh{i}", {"type": "hi", "i": i})
            assert follower.call("receive", ch, 10.0) == {"type": "hi", "i": i}

    def test_group_add_while_the_hosts_link_is_still_coming_up(
        self, hosts: HostsFactory, broker_config: dict[str, Any]
    ) -> None:
        """A new host's first process joins a group while its link is still connecting:
        ``group_add`` waits for the link and its first binding sync, so a ``group_send``
        from another host right after it reaches the member (it used to return at once,
        and that message was lost)."""
        hb = hosts({"hb": 1})["hb"][0]
        for i in range(3):
            a = Remote({**broker_config, "host_id": f"hn{i}"})
            try:
                ch = a.call("new_channel", "m.")  # attaches: leads, starts connecting
                a.call("group_add", f"early{i}", ch)
                hb.call("group_send", f"early{i}", {"type": "hi", "i": i})
                assert a.call("receive", ch, 10.0) == {"type": "hi", "i": i}
            finally:
                a.close()


class TestNormalChannels:
    def test_each_message_once_across_hosts(
        self, hosts: HostsFactory, broker_url: str, ns_prefix: str
    ) -> None:
        hs = hosts(LAYOUT)
        readers = [hs["ha"][0], hs["ha"][1], hs["hb"][0]]
        n = 150
        try:
            for r in readers:
                r.call("collect", "work", n)
            time.sleep(0.5)  # readers registered and their hosts consuming
            sender = hs["hc"][1]
            msgs = [{"type": "job", "i": i} for i in range(n)]
            assert sender.call("send_many", "work", msgs) == n
            deadline = time.monotonic() + 20
            got: list[int] = []
            while time.monotonic() < deadline:
                got = [m["i"] for r in readers for m in r.call("collected", "work")]
                if len(got) >= n:
                    break
                time.sleep(0.1)
            time.sleep(0.3)
            got = [m["i"] for r in readers for m in r.call("collected", "work")]
            assert sorted(got) == list(range(n))  # exactly once overall
            per_host_a = sum(len(r.call("collected", "work")) for r in readers[:2])
            per_host_b = len(readers[2].call("collected", "work"))
            assert per_host_a + per_host_b == n
        finally:
            for _, r in _all(hs):
                r.close()
            delete_queues(broker_url, [normal_queue_name(ns_prefix, "work")])

    def test_waits_on_the_broker_for_a_reader_and_capacity_applies(
        self, hosts: HostsFactory, broker_url: str, ns_prefix: str
    ) -> None:
        hs = hosts({"ha": 1, "hb": 1}, capacity=5)
        try:
            msgs = [{"type": "job", "i": i} for i in range(40)]
            sent = hs["hb"][0].call("send_many", "later", msgs)
            # the queue holds 5; send() does not wait for the broker's verdict: what the
            # full queue rejected is kept by the sending leader and tried again...
            assert sent >= 5
            time.sleep(0.1)
            # ...and once the queue is found full, send() raises ChannelFull at once
            assert hs["hb"][0].call("send_many", "later", msgs) == 0
            # every accepted job arrives, in order, as the reader makes room
            got = hs["ha"][0].call("receive_many", "later", sent, 10.0, timeout=40)
            # (once each; those in flight when the queue filled may overtake the kept)
            assert sorted(m["i"] for m in got) == list(range(sent))
            with pytest.raises(RemoteError, match="Timeout"):
                hs["ha"][0].call("receive", "later", 0.5)
            st = hs["hb"][0].call("stats")
            assert st.dropped["remote_full"] == 0
            assert st.broker["nacked"] >= 1
            assert st.raised["full"] == 1
        finally:
            for _, r in _all(hs):
                r.close()
            delete_queues(broker_url, [normal_queue_name(ns_prefix, "later")])

    def test_busy_reader_host_pushes_back_to_the_broker(
        self, hosts: HostsFactory, broker_url: str, ns_prefix: str
    ) -> None:
        """Readers full on their host: messages stay on the broker (capacity applies
        there, senders get ChannelFull), none lost or doubled, order kept."""
        hs = hosts({"ha": 2, "hb": 1}, capacity=5)
        reader = next(r for r in hs["ha"] if not r.call("internals")["is_leader"])
        try:
            reader.call("collect", "busy", 1)  # a receive: its host consumes "busy"
            time.sleep(0.3)
            os.kill(reader.pid, signal.SIGSTOP)
            try:
                sent = 0
                for i in range(60):
                    n = hs["hb"][0].call("send_many", "busy", [{"type": "j", "i": i}])
                    if n == 0:
                        break
                    sent += 1
                    time.sleep(0.01)
                st = hs["hb"][0].call("stats")
                assert st.raised["full"] == 1  # the broker pushed back
                assert st.dropped["remote_full"] == 0  # what it rejected is kept
                accepted = sent
                assert 5 <= accepted <= 30  # 5 on the reader's host, 5 queued, kept
            finally:
                os.kill(reader.pid, signal.SIGCONT)
            got = reader.call("receive_many", "busy", accepted - 1, 10.0, timeout=40)
            first = reader.call("wait_collected", "busy", 5.0)
            seq = [m["i"] for m in first + got]
            assert sorted(seq) == list(range(accepted))  # once each, none lost
            with pytest.raises(RemoteError, match="Timeout"):
                reader.call("receive", "busy", 0.3)
        finally:
            for _, r in _all(hs):
                r.close()
            delete_queues(broker_url, [normal_queue_name(ns_prefix, "busy")])

    def test_expiry_applies_on_the_broker(
        self, hosts: HostsFactory, broker_url: str, ns_prefix: str
    ) -> None:
        hs = hosts({"ha": 1, "hb": 1}, expiry=1)
        try:
            hs["hb"][0].call("send", "stale", {"type": "old"})
            time.sleep(1.5)
            hs["hb"][0].call("send", "stale", {"type": "new"})
            assert hs["ha"][0].call("receive", "stale", 5.0) == {"type": "new"}
            with pytest.raises(RemoteError, match="Timeout"):
                hs["ha"][0].call("receive", "stale", 0.3)
        finally:
            for _, r in _all(hs):
                r.close()
            delete_queues(broker_url, [normal_queue_name(ns_prefix, "stale")])


class TestCapacityAcrossHosts:
    def test_flush_drops_what_the_leader_holds_for_busy_readers(self, hosts: HostsFactory) -> None:
        hs = hosts({"ha": 1, "hb": 1}, capacity=5)
        dst, src = hs["ha"][0], hs["hb"][0]
        ch = dst.call("new_channel", "c.")
        assert src.call("send_many", ch, [{"type": "m", "i": i} for i in range(50)]) == 50
        assert wait_until(lambda: dst.call("stats").broker["held"] == 45, 10)
        dst.call("flush")
        assert wait_until(lambda: dst.call("stats").broker["held"] == 0, 5)
        assert dst.call("stats").dropped["flushed"] >= 45
        with pytest.raises(RemoteError, match="Timeout"):
            dst.call("receive", ch, 0.3)

    def test_burst_is_batched_and_a_busy_reader_loses_nothing(self, hosts: HostsFactory) -> None:
        """A burst to one host travels in batches; a reader over its capacity makes the
        receiving leader hold the rest until it reads (FIFO, nothing dropped)."""
        hs = hosts({"ha": 1, "hb": 1}, capacity=10)
        dst, src = hs["ha"][0], hs["hb"][0]
        ch = dst.call("new_channel", "c.")
        n = 600
        assert src.call("send_many", ch, [{"type": "m", "i": i} for i in range(n)]) == n
        assert wait_until(lambda: src.call("stats").broker["confirmed"] == n, 20)
        st = src.call("stats")
        assert st.broker["published"] == n
        assert st.broker["batches"] >= 1  # several messages per AMQP message
        assert wait_until(lambda: dst.call("stats").broker["held"] >= n - 10, 10)
        got = dst.call("receive_many", ch, n, 10.0, timeout=30)
        assert [m["i"] for m in got] == list(range(n))
        d = dst.call("stats")
        assert d.broker["held"] == 0
        assert sum(d.dropped.values()) == 0
        assert d.broker["received"] == n

    def test_full_host_queue_raises_channel_full(self, hosts: HostsFactory) -> None:
        # publish_batch=1: one message per AMQP message, so that remote_capacity counts
        # messages (test_batches_... below covers batching)
        hs = hosts({"ha": 1, "hb": 1}, remote_capacity=20, publish_batch=1)
        dst = hs["ha"][0]
        ch = dst.call("new_channel", "c.")
        os.kill(dst.pid, signal.SIGSTOP)  # its leader stops consuming: the queue fills
        try:
            msgs = [{"type": "m", "i": i} for i in range(200)]
            sent = hs["hb"][0].call("send_many", ch, msgs)
            assert sent >= 20
            time.sleep(0.05)
            assert hs["hb"][0].call("send_many", ch, msgs) == 0  # ChannelFull at once
            time.sleep(0.3)
            st = hs["hb"][0].call("stats")
            assert st.raised["full"] == 1
            assert st.dropped["remote_full"] == 0  # what the full queue rejected is kept
            accepted = sent
            # the stalled leader holds at most its prefetch (= remote_capacity here),
            # the broker queue the next remote_capacity, the sender what it rejected
            assert accepted >= 20
        finally:
            os.kill(dst.pid, signal.SIGCONT)
        got = dst.call("receive_many", ch, accepted, 10.0, timeout=60)
        assert [m["i"] for m in got] == list(range(accepted))  # in order, none lost
        with pytest.raises(RemoteError, match="Timeout"):
            dst.call("receive", ch, 0.3)
        # the flag clears: sends work again
        time.sleep(0.3)
        hs["hb"][0].call("send", ch, {"type": "after"})
        assert dst.call("receive", ch, 10.0) == {"type": "after"}


class TestBrokerView:
    def test_one_connection_per_host_and_same_host_traffic_stays_off_the_broker(
        self, hosts: HostsFactory, ns_prefix: str
    ) -> None:
        # heartbeats would move the frame counters: none during this test
        hs = hosts({"ha": 3, "hb": 2, "hc": 2}, heartbeat=600)

        def ours() -> dict[str, list[int]]:
            rows = rabbitmqctl("list_connections", "client_properties", "recv_cnt", "send_cnt")
            out: dict[str, list[int]] = {}
            for props, recv, send in rows:
                for h in ("ha", "hb", "hc"):
                    if f"hl.{ns_prefix}.{h} " in props:
                        out.setdefault(h, []).extend([int(recv), int(send)])
            return out

        before = ours()
        assert sorted(before) == ["ha", "hb", "hc"]
        assert all(len(v) == 2 for v in before.values()), before  # one connection each
        a = hs["ha"]
        chans = [r.call("new_channel", "s.") for r in a]
        for i, r in enumerate(a):
            dst = chans[(i + 1) % len(a)]
            assert r.call("send_many", dst, [{"type": "x", "i": k} for k in range(90)]) == 90
        for i, r in enumerate(a):
            assert len(r.call("receive_many", chans[i], 90, 10.0)) == 90
        time.sleep(0.5)
        assert ours() == before  # not one frame for same-host traffic
        # control: one cross-host message moves the counters
        hs["hb"][0].call("send", chans[0], {"type": "cross"})
        assert a[0].call("receive", chans[0], 10.0) == {"type": "cross"}
        assert wait_until(lambda: ours() != before, 10)


class TestEncryption:
    def test_rotation_old_and_new_keys_interoperate(self, hosts: HostsFactory) -> None:
        ha = hosts({"ha": 1}, symmetric_encryption_keys=["old", "new"])["ha"][0]
        hb = hosts({"hb": 1}, symmetric_encryption_keys=["new", "old"])["hb"][0]
        ca, cb = ha.call("new_channel", "e."), hb.call("new_channel", "e.")
        ha.call("send", cb, {"type": "secret", "b": b"\x00\x01"})
        hb.call("send", ca, {"type": "secret", "b": b"\x02"})
        assert hb.call("receive", cb, 10.0) == {"type": "secret", "b": b"\x00\x01"}
        assert ha.call("receive", ca, 10.0) == {"type": "secret", "b": b"\x02"}

    def test_wrong_key_is_dropped_and_counted(self, hosts: HostsFactory) -> None:
        ha = hosts({"ha": 1}, symmetric_encryption_keys=["one"])["ha"][0]
        hb = hosts({"hb": 1}, symmetric_encryption_keys=["two"])["hb"][0]
        ca = ha.call("new_channel", "e.")
        hb.call("send", ca, {"type": "secret"})
        assert wait_until(lambda: ha.call("stats").dropped["unauthenticated"] == 1, 10)
        with pytest.raises(RemoteError, match="Timeout"):
            ha.call("receive", ca, 0.3)


class TestFlush:
    def test_flush_purges_what_this_host_queued_on_the_broker(
        self, hosts: HostsFactory, broker_url: str, ns_prefix: str
    ) -> None:
        hs = hosts({"ha": 1, "hb": 1})
        a, b = hs["ha"][0], hs["hb"][0]
        try:
            # nobody reads "jobs" yet: b's messages wait in its queue on the broker
            assert b.call("send_many", "jobs", [{"type": "j", "i": i} for i in range(5)]) == 5
            assert wait_until(lambda: b.call("stats").broker["confirmed"] == 5, 5)
            b.call("flush")
            time.sleep(0.3)  # the leader purges right after applying the flush
            b.call("send", "jobs", {"type": "j", "i": 99})
            assert a.call("receive", "jobs", 10.0) == {"type": "j", "i": 99}
            with pytest.raises(RemoteError, match="Timeout"):
                a.call("receive", "jobs", 0.3)
        finally:
            for _, r in _all(hs):
                r.close()
            delete_queues(broker_url, [normal_queue_name(ns_prefix, "jobs")])


def test_broker_keys_need_host() -> None:
    from hybrid_layer import HybridChannelLayer

    with pytest.raises(ValueError, match="host"):
        HybridChannelLayer(groups_exchange="x")


@contextlib.asynccontextmanager
async def two_hosts_in_process(broker_url: str, ns_prefix: str) -> AsyncIterator[tuple[Any, Any]]:
    """Two layers in this process with host ids ``ha`` and ``hb``, both links up."""
    from hybrid_layer import HybridChannelLayer

    cfg: dict[str, Any] = {"prefix": ns_prefix, "host": broker_url}
    a = HybridChannelLayer(host_id="ha", **cfg)
    b = HybridChannelLayer(host_id="hb", **cfg)
    try:
        await a.new_channel()
        await b.new_channel()
        assert wait_until(
            lambda: a.statistics().broker["link"] == b.statistics().broker["link"] == "up", 10
        )
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_in_process_two_hosts_round_trip(broker_url: str, ns_prefix: str) -> None:
    """Two layers in one process, two host ids: the simplest end-to-end path."""
    async with two_hosts_in_process(broker_url, ns_prefix) as (a, b):
        ca = await a.new_channel()
        # the installed aiormq has the channel state that publishing without a task per
        # message relies on (else the link falls back to basic_publish, slower)
        assert b._p().link._fast_publish
        await b.send(ca, {"type": "hello", "n": 1})
        assert await asyncio.wait_for(a.receive(ca), 10) == {"type": "hello", "n": 1}
        st = b.statistics()
        assert st.broker["published"] == 1
        assert wait_until(lambda: b.statistics().broker["confirmed"] == 1, 5)
        # the fallback for an aiormq without that state: basic_publish, one task each
        b._p().link._fast_publish = False
        await b.send(ca, {"type": "hello", "n": 2})
        assert await asyncio.wait_for(a.receive(ca), 10) == {"type": "hello", "n": 2}
        assert wait_until(lambda: b.statistics().broker["confirmed"] == 2, 5)


def test_status_command_shows_the_link(hosts: HostsFactory, ns_prefix: str) -> None:
    import json
    import subprocess
    import sys

    hs = hosts({"ha": 2})
    cmd = [sys.executable, "-m", "hybrid_layer", "status", "--prefix", ns_prefix]
    out = subprocess.run([*cmd, "--host-id", "ha", "--json"], capture_output=True, text=True)
    info = json.loads(out.stdout)
    assert info["link"] == "up"
    assert info["binding_syncs"] >= 1
    assert sorted(p["pid"] for p in info["participants"]) == sorted(r.pid for r in hs["ha"])
    text = subprocess.run([*cmd, "--host-id", "ha"], capture_output=True, text=True).stdout
    assert "RabbitMQ link up" in text
    none = subprocess.run([*cmd, "--host-id", "nobody"], capture_output=True, text=True)
    assert "no shared memory" in none.stdout


def test_short_lived_sync_sender_on_its_own_host(
    hosts: HostsFactory, ns_prefix: str, broker_url: str
) -> None:
    """A Celery-like process: alone on its host (so it leads), sends with async_to_sync
    right after start, exits at once. Its link is not up yet when it sends: nothing may be
    lost, and exiting waits for the broker's confirms."""
    import subprocess
    import sys

    web = hosts({"web": 2})["web"]
    ch = web[1].call("new_channel", "ws.")
    web[1].call("group_add", "news", ch)
    script = (
        "import sys\n"
        "from asgiref.sync import async_to_sync\n"
        "from hybrid_layer import HybridChannelLayer\n"
        f"layer = HybridChannelLayer(prefix={ns_prefix!r}, host_id='celery', host={broker_url!r})\n"
        "async_to_sync(layer.group_send)('news', {'type': 'news.item', 'n': 1})\n"
        f"async_to_sync(layer.send)({ch!r}, {{'type': 'direct', 'n': 2}})\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert web[1].call("receive", ch, 10.0) == {"type": "news.item", "n": 1}
    assert web[1].call("receive", ch, 10.0) == {"type": "direct", "n": 2}


async def test_a_failing_delivery_does_not_stop_the_host_queue(
    broker_url: str, ns_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Deliveries run inline in aiormq's channel reader (no task per message): an
    exception there is logged, and the messages after it still arrive."""
    async with two_hosts_in_process(broker_url, ns_prefix) as (a, b):
        ca = await a.new_channel()
        pa = a._p()
        real = pa.deliver_direct
        calls = []

        def fail_once(*args: Any) -> int:
            calls.append(args[0])
            if len(calls) == 1:
                raise RuntimeError("injected")
            return real(*args)

        pa.deliver_direct = fail_once  # type: ignore[method-assign]
        await b.send(ca, {"type": "lost", "n": 0})
        assert wait_until(lambda: len(calls) == 1, 10)
        for n in range(1, 4):
            await b.send(ca, {"type": "hello", "n": n})
        for n in range(1, 4):
            assert await asyncio.wait_for(a.receive(ca), 10) == {"type": "hello", "n": n}
        assert "cannot handle a delivery" in caplog.text
        assert a.statistics().broker["link"] == "up"
