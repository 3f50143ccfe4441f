"""Issue 13 across hosts: a normal channel's local reader that stops receiving gives way
to other hosts' readers."""

from __future__ import annotations

import time

from tests.broker.conftest import HostsFactory


def test_across_hosts_a_local_reader_that_stops_gives_way_to_another_hosts(
    hosts: HostsFactory, broker_url: str, ns_prefix: str
) -> None:
    """Host ha's only reader of "jobs" received once and stopped; host hb's reader keeps
    receiving. What ha sends reaches hb's reader (before: ha preferred its local,
    stopped reader, and the messages waited there until expiry)."""
    from tests.broker.conftest import delete_queues, normal_queue_name

    hs = hosts({"ha": 2, "hb": 1})
    a, sender, b = hs["ha"][0], hs["ha"][1], hs["hb"][0]
    try:
        sender.call("send", "jobs", {"type": "job", "i": -1})
        assert a.call("receive", "jobs", 5)["i"] == -1  # a reads it, then stops
        b.call("collect", "jobs", 20)
        time.sleep(0.5)  # b's host consumes the channel's queue
        assert sender.call("send_many", "jobs", [{"type": "job", "i": i} for i in range(20)]) == 20
        got = b.call("wait_collected", "jobs", 15, timeout=20)
        assert sorted(m["i"] for m in got) == list(range(20))
        assert a.call("stats").received == 1
    finally:
        delete_queues(broker_url, [normal_queue_name(ns_prefix, "jobs")])


def test_a_normal_channel_message_that_expires_on_the_broker_is_counted(
    hosts: HostsFactory, broker_url: str, ns_prefix: str
) -> None:
    """Nobody reads "jobs": what waits in its queue on RabbitMQ expires there
    (x-message-ttl = expiry) and is dead-lettered to the prefix's shared dead queue,
    where a leader counts it (dropped["expired"]) and logs it - never lost silently."""
    from tests.broker.conftest import delete_queues, normal_queue_name

    hs = hosts({"ha": 1, "hb": 1}, expiry=2)
    try:
        sender = hs["ha"][0]
        assert sender.call("send_many", "jobs", [{"type": "job", "i": i} for i in range(5)]) == 5

        def counted() -> int:
            return sum(r.call("stats").dropped["expired"] for rs in hs.values() for r in rs)

        deadline = time.monotonic() + 15
        while counted() < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert counted() == 5
    finally:
        delete_queues(broker_url, [normal_queue_name(ns_prefix, "jobs")])
