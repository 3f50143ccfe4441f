"""A real RabbitMQ cluster and TLS: nodes of the tests' own (tests/rabbitnodes.py).

Three nodes on ports from 5701 joined into one cluster, and one node with a TLS
listener (a CA and a server certificate made with openssl); started once for the
module, stopped and removed at its end. The broker on 5672 is never touched. Under
steady traffic: the node the leaders are connected to dies (the link moves to the next
URL of CONFIG['host']), the whole cluster restarts, a mirroring policy fails a queue
over; amqps:// with the right CA, a wrong one, and none.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests import rabbitnodes
from tests.broker.conftest import HostsFactory
from tests.broker.test_faults import leader, link
from tests.remote import Remote, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture(scope="module")
def nodes() -> Iterator[rabbitnodes.Nodes]:
    why = rabbitnodes.available()
    if why:
        pytest.fail(f"cannot start RabbitMQ nodes of our own: {why}", pytrace=False)
    ns = rabbitnodes.Nodes()
    try:
        yield ns
    finally:
        ns.stop_all()


@pytest.fixture(scope="module")
def cluster_nodes(nodes: rabbitnodes.Nodes) -> list[rabbitnodes.Node]:
    return nodes.cluster(3)


@pytest.fixture
def cluster(cluster_nodes: list[rabbitnodes.Node]) -> Iterator[list[rabbitnodes.Node]]:
    """The three nodes, all running (a test that killed one gets it back)."""
    _all_running(cluster_nodes)
    yield cluster_nodes
    _all_running(cluster_nodes)
    cluster_nodes[0].ctl("clear_policy", "hlha", check=False)


def _all_running(members: list[rabbitnodes.Node]) -> None:
    down = [n for n in members if not n.running()]
    for n in down:
        n.start(wait=False)
    for n in down:
        n.wait()
    if down:
        members[0].ctl("await_startup", "--timeout", "60")


@pytest.fixture(scope="module")
def tls_node(nodes: rabbitnodes.Nodes) -> rabbitnodes.Node:
    n = nodes.node(tls=True)
    n.start()
    return n


def by_sender(got: list[Any]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for m in got:
        m = m[0] if isinstance(m, list | tuple) else m
        out.setdefault(m["s"], []).append(m["n"])
    return out


def _quorum_on_every_node(cluster: list[rabbitnodes.Node], queues: list[str]) -> None:
    """The test's precondition: each quorum queue has a member on every node (a queue
    declared while a node was still joining gets fewer, and then a node's loss is a
    loss of the queue, which is not what is tested). Grown if need be."""

    def members() -> dict[str, int]:
        out = cluster[0].ctl("list_queues", "-q", "--no-table-headers", "name", "members")
        found = {}
        for line in out.splitlines():
            name, _, rest = line.partition("\t")
            if name in queues:
                found[name] = rest.count("@")
        return found

    if all(members().get(q, 0) >= len(cluster) for q in queues):
        return
    for n in cluster:
        n.queues_cli("grow", n.name, "all")
    assert wait_until(lambda: all(members().get(q, 0) >= len(cluster) for q in queues), 30), (
        members()
    )


def port_of(r: Remote) -> int:
    return int(link(r)["url"].rsplit(":", 1)[1].strip("/"))


def steady_through(
    snd: Remote, rcv: Remote, fault: Any, rate: int = 400, seconds: float = 6.0
) -> tuple[dict[str, Any], dict[int, list[int]]]:
    """``snd`` sends to a channel of ``rcv`` (direct, and a group_send every 10th) for
    ``seconds``; ``fault()`` 2 s in. Returns the sender's result and what arrived."""
    ch = rcv.call("new_channel")
    rcv.call("group_add", "room", ch)
    rcv.call("collect_timed", ch)
    snd.call("paced", ch, "room", 1, rate, seconds)
    time.sleep(2.0)
    fault()
    res = snd.call("paced_result", timeout=seconds + 90)
    want = len(res["accepted"]) + len(res["groups"])
    wait_until(lambda: len(rcv.call("collected", ch)) >= want, 60, 0.2)
    time.sleep(1.0)
    return res, by_sender(rcv.call("collected", ch))


def settled(count: Any, timeout: float, quiet: float = 2.0) -> int:
    """Wait until ``count()`` has not changed for ``quiet`` seconds; returns it."""
    deadline = time.monotonic() + timeout
    last, since = count(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


def assert_once_in_order(got: list[int], accepted: list[int], lost_at_most: int, what: str) -> int:
    assert got == sorted(set(got)), f"{what}: duplicated or reordered"
    lost = sorted(set(accepted) - set(got))
    assert len(lost) <= lost_at_most, f"{what}: {len(lost)} of {len(accepted)} lost: {lost[:20]}"
    return len(lost)


@pytest.mark.xfail(
    reason="RabbitMQ 3.10 may keep rejecting (nack) or never answering one channel's "
    "publishes to the quorum queue after its leader's node is SIGKILLed; the link then "
    "opens a new connection after 10 s (direct messages kept meanwhile arrive), but the "
    "group_sends rejected meanwhile are dropped and counted (CHANGELOG, Known issues)",
    strict=False,
)
def test_node_loss_quorum_queues_lose_nothing(
    cluster: list[rabbitnodes.Node], hosts: HostsFactory
) -> None:
    """queue_type quorum: the node both leaders are connected to (and the host queues'
    Raft leader) is SIGKILLed under traffic. The links move to the next URL, the
    queues survive on the other two nodes, unconfirmed publishes are published again
    and deduplicated: every accepted message arrives once, in order."""
    over = {"host": [n.url for n in cluster], "queue_type": "quorum", "heartbeat": 2, "expiry": 60}
    hb = hosts({"hb": 2}, **over)["hb"]
    ha = hosts({"ha": 2}, **over)["ha"]
    lb, la = leader(hb), leader(ha)
    rcv = next(r for r in hb if r is not lb)
    snd = next(r for r in ha if r is not la)
    assert port_of(lb) == port_of(la) == cluster[0].port
    _quorum_on_every_node(cluster, [link(lb)["queue"], link(la)["queue"]])
    res, got = steady_through(snd, rcv, cluster[0].kill)
    missing = len(set(res["accepted"]) - set(got.get(1, [])))
    if missing:
        # RabbitMQ 3.10 sometimes leaves a quorum queue without a Raft leader for longer
        # than the messages' expiry after its leader's node is SIGKILLed (seen on the
        # commit before this suite's hardening too): the layer then keeps what the queue
        # rejects (nack: "NOT full ... failing over") until it expires, and counts it.
        # That is the broker's failure, not a silent loss: say so, and fail if any of
        # the missing messages is not counted.
        def counted() -> int:
            return sum(
                r.call("stats").dropped["remote_full"] + r.call("stats").dropped["no_channel"]
                for r in ha
            )

        wait_until(lambda: counted() >= missing, 70, 0.5)
        assert counted() >= missing, (missing, counted())
        pytest.xfail(
            f"the broker's quorum queue did not recover within expiry: {missing} kept, "
            "rejected until they expired, all counted (RabbitMQ-side)"
        )
    # (a nack while the queue's Raft leader moves makes senders wait a moment: refused,
    # never lost)
    assert_once_in_order(got.get(1, []), res["accepted"], 0, "direct")
    assert_once_in_order(got.get(-2, []), res["groups"], 0, "group")
    assert port_of(lb) != cluster[0].port and port_of(la) != cluster[0].port
    assert link(lb)["link"] == "up" and link(la)["link"] == "up"


def test_node_loss_classic_queues_rebind_before_on_reconnect(
    cluster: list[rabbitnodes.Node], hosts: HostsFactory
) -> None:
    """Classic host queues live on one node: when it dies the queue and its bindings go
    with it. The leader moves to the next URL, declares the queue again and makes its
    2 000 bindings (pipelined) before it reports the link up: on_reconnect comes after
    all of them, so a group_send to the last group sent at that moment arrives. Nothing
    is delivered twice; what is lost is at most what waited in the dead node's queue."""
    over = {"host": [n.url for n in cluster], "heartbeat": 2, "expiry": 60}
    (b,) = hosts({"hb": 1}, on_reconnect="broker.reconnect", **over)["hb"]
    (a,) = hosts({"ha": 1}, **over)["ha"]
    ch = b.call("new_channel")
    groups = [f"g{i}" for i in range(2000)]
    for g in groups:
        b.call("group_add", g, ch)
    assert wait_until(lambda: link(b)["bindings"] == 2000 and link(b)["syncs"] > 0, 20), link(b)
    assert port_of(b) == cluster[0].port
    killed = time.time()
    cluster[0].kill()
    msg = b.call("receive", ch, 60)
    assert msg["type"] == "broker.reconnect"
    a.call("group_send", groups[-1], {"type": "last"})
    a.call("group_send", groups[0], {"type": "first"})
    got = [b.call("receive", ch, 10) for _ in range(2)]
    assert {m["type"] for m in got} == {"last", "first"}
    info = link(b)
    assert info["last_sync"] > killed, info
    assert port_of(b) != cluster[0].port
    assert b.call("stats").dropped["malformed"] == 0


def _stop_all(members: list[rabbitnodes.Node]) -> None:
    ts = [threading.Thread(target=n.stop) for n in members]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_whole_cluster_restart_keeps_what_was_sent_meanwhile(
    queue_type: str, cluster: list[rabbitnodes.Node], hosts: HostsFactory
) -> None:
    """Every node stops, then all start again: both hosts keep their cross-host sends
    meanwhile (within expiry), reconnect for ever, declare and bind again, and deliver
    what was kept. Nothing twice, nothing reordered. Quorum queues (durable, with their
    bindings) come back: no direct message lost. A group_send while the receiving
    host's bindings are not on the broker reaches nobody (the README's failure table)."""
    over = {
        "host": [n.url for n in cluster],
        "heartbeat": 2,
        "expiry": 120,
        "queue_type": queue_type,
    }
    hb = hosts({"hb": 2}, **over)["hb"]
    ha = hosts({"ha": 2}, **over)["ha"]
    lb, la = leader(hb), leader(ha)
    rcv = next(r for r in hb if r is not lb)
    snd = next(r for r in ha if r is not la)

    def restart() -> None:
        _stop_all(cluster)
        assert wait_until(lambda: link(la)["link"] != "up" and link(lb)["link"] != "up", 20)
        _all_running(cluster)

    res, got = steady_through(snd, rcv, restart, rate=300, seconds=8.0)
    quorum = queue_type == "quorum"
    # classic: what the broker had confirmed and not yet handed to hb when the nodes
    # stopped went with the (transient) queue: a few at most at this rate
    lost = assert_once_in_order(got.get(1, []), res["accepted"], 0 if quorum else 30, "direct")
    # a group_send reaches nobody while the receiving host's bindings are not on the
    # broker: classic queues lose them with the queue until its leader binds again;
    # quorum queues get theirs back as the broker recovers each queue (a moment after
    # the nodes accept connections). Not counted: the exchange drops what it cannot
    # route (an empty group is not an error)
    glost = assert_once_in_order(got.get(-2, []), res["groups"], len(res["groups"]), "group")
    assert wait_until(lambda: link(la)["link"] == "up" and link(lb)["link"] == "up", 30)
    # once hb's link is up again its bindings are back: group sends reach it
    ch = rcv.call("collected_channels")[0]
    snd.call("group_send", "room", {"type": "m", "s": -9, "n": 0})
    assert wait_until(lambda: any(m[0]["s"] == -9 for m in rcv.call("collected", ch)), 10, 0.1), (
        "group sends flow again"
    )
    assert link(la)["connect_failures"] > 0
    print(f"cluster restart ({queue_type}): lost {lost} direct, {glost} group")


def test_mirroring_policy_failover_delivers_nothing_twice(
    cluster: list[rabbitnodes.Node], hosts: HostsFactory, ns_prefix: str
) -> None:
    """An operator's ha-mode: all policy: when the node holding a mirrored queue's
    master dies, the promoted mirror delivers again what the master had delivered.
    Host queues skip those by message id (the dedupe table), normal channels by the
    host's seen-set: nothing arrives twice."""
    cluster[0].ctl(
        "set_policy",
        "hlha",
        f"^{ns_prefix}\\.",
        '{"ha-mode":"all","ha-sync-mode":"automatic"}',
        "--apply-to",
        "queues",
    )
    over = {"host": [n.url for n in cluster], "heartbeat": 2, "expiry": 60}
    hb = hosts({"hb": 2}, **over)["hb"]
    ha = hosts({"ha": 2}, **over)["ha"]
    lb = leader(hb)
    rcv = next(r for r in hb if r is not lb)
    snd = next(r for r in ha if r is not leader(ha))
    rcv.call("collect", "jobs", 10**9)
    n = 3000
    snd.start_call("send_many", "jobs", [{"type": "j", "s": 7, "n": k} for k in range(n)])
    time.sleep(0.3)
    cluster[0].kill()
    sent = snd.result(120)
    settled(lambda: len(rcv.call("collected", "jobs")), 60)
    jobs = [m["n"] for m in rcv.call("collected", "jobs")]
    assert len(jobs) == len(set(jobs)), f"{len(jobs) - len(set(jobs))} job(s) delivered twice"
    assert set(jobs) <= set(range(sent))
    # what the failover cost is counted where the layer can see it: rejected by the
    # failing queue (nack: remote_full, logged as "NOT full ... failing over"), or
    # left unconfirmed by the dead connection (link_down: a normal channel's are not
    # published again, hosts share its queue). Classic mirroring itself may lose a few
    # confirmed ones on failover (RabbitMQ deprecates it; quorum queues do not).
    drops = [r.call("stats").dropped for r in ha]
    counted = sum(d["link_down"] + d["remote_full"] for d in drops)
    print(f"mirrored failover: {sent} sent, {len(jobs)} delivered, {counted} counted")
    assert sent - len(jobs) <= counted + sent // 10, (sent, len(jobs), drops)


def test_tls_right_ca_carries_traffic(tls_node: rabbitnodes.Node, hosts: HostsFactory) -> None:
    ca = str(tls_node.nodes.tls_dir / "ca.pem")
    over = {"host": [tls_node.tls_url], "test_ssl_cafile": ca}
    (a,) = hosts({"ta": 1}, **over)["ta"]
    (b,) = hosts({"tb": 1}, **over)["tb"]
    assert link(a)["url"].startswith("amqps://")
    ch = b.call("new_channel")
    for k in range(200):
        a.call("send", ch, {"type": "m", "n": k})
    assert [m["n"] for m in b.call("receive_many", ch, 200, 10)] == list(range(200))


@pytest.mark.parametrize("case", ["wrong-ca", "no-context"])
def test_tls_wrong_or_missing_ca_is_named_and_retried(
    case: str, tls_node: rabbitnodes.Node, procs: Any
) -> None:
    """The handshake fails: the reason names TLS and the certificate error, the link
    keeps trying, and a message handed over meanwhile is kept, not dropped."""
    over: dict[str, Any] = {"host": [tls_node.tls_url]}
    if case == "wrong-ca":
        over["test_ssl_cafile"] = str(tls_node.nodes.tls_dir / "other-ca.pem")
    (a,) = procs("tw", 1, **over)
    a.call("send", "x.elsewhere.1.1!0.abc", {"type": "m"})  # another host's channel: kept
    assert wait_until(lambda: link(a).get("connect_failures", 0) >= 2, 20), link(a)
    info = link(a)
    assert info["link"] == "down"
    assert "TLS handshake failed" in info["reason"], info
    assert "certificate verify failed" in info["reason"], info
    assert info["outbound"] == 1 and a.call("stats").dropped["link_down"] == 0


def test_ssl_context_with_only_amqp_urls_is_warned(cluster: list[rabbitnodes.Node]) -> None:
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import asyncio, logging, ssl, uuid
        logging.basicConfig(level=logging.WARNING)
        from hybrid_layer import HybridChannelLayer
        async def main():
            lay = HybridChannelLayer(prefix="t" + uuid.uuid4().hex[:12], host_id="w",
                                     host={cluster[1].url!r},
                                     ssl_context=ssl.create_default_context())
            await lay.new_channel()
            await asyncio.sleep(1.0)
            await lay.close()
        asyncio.run(main())
        """
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "NOT encrypted" in p.stderr, p.stderr


def test_a_policy_ttl_lower_than_expiry_is_counted_and_named(
    cluster: list[rabbitnodes.Node], procs: Any, hosts: HostsFactory, ns_prefix: str
) -> None:
    """An operator's policy gives the host's queue a message-ttl below CONFIG['expiry']:
    what the broker expires early is dead-lettered to the host's dead queue, and the
    next leader counts it (dropped["expired"]) and says it was a policy."""
    over = {"host": [n.url for n in cluster], "expiry": 60}
    (b,) = procs("hb", 1, **over)
    b.call("wait_link", 15.0, timeout=20)
    ch = b.call("new_channel")
    b.kill()  # no leader reads hb's queue now (it stays: x-expires)
    cluster[0].ctl(
        "set_policy",
        "hlha",
        f"^{ns_prefix}\\.hb$",
        '{"message-ttl":300}',
        "--apply-to",
        "queues",
    )
    time.sleep(1.0)  # (policies apply to existing queues at once, or nearly)
    (a,) = hosts({"ha": 1}, **over)["ha"]
    for k in range(50):
        a.call("send", ch, {"type": "m", "n": k})
    assert wait_until(lambda: link(a)["confirmed"] >= 50, 10), link(a)
    time.sleep(1.0)  # expired by the policy meanwhile
    (b2,) = procs("hb", 1, **over)
    assert wait_until(
        lambda: link(b2).get("dead_lettered", {}).get("expired_early", 0) >= 50, 20
    ), link(b2)
    assert b2.call("stats").dropped["expired"] >= 50
