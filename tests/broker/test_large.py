"""Messages of 5, 20 and 100 MB across hosts through the real RabbitMQ, with default
size settings (``broker_config`` sets none): out of the rings on both hosts
(``shm.spill``), one AMQP message each (never batched past ``MAX_BATCH_BYTES``), under
RabbitMQ's default ``max_message_size`` (128 MiB)."""

from __future__ import annotations

import os
import time

import pytest

from tests.broker.conftest import HostsFactory, delete_queues, normal_queue_name
from tests.remote import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]

MB = 1000 * 1000


@pytest.mark.parametrize("size", [5 * MB, 20 * MB, 100 * MB])
def test_large_message_crosses_hosts_with_default_settings(
    hosts: HostsFactory, ns_prefix: str, broker_url: str, size: int
) -> None:
    hs = hosts({"ha": 2, "hb": 1})
    dst = hs["hb"][0]
    ch = dst.call("new_channel", "big.")
    sender = hs["ha"][1]  # not necessarily the leader: through shared memory first
    digest = sender.call("send_big", ch, size, 1, timeout=60)
    assert tuple(dst.call("receive_digest", ch, 90.0, timeout=120)) == (1, size, digest)
    if size == 20 * MB:  # a group copy too, to a member on each host
        local = hs["ha"][0]
        lch = local.call("new_channel", "big.")
        local.call("group_add", "room", lch)
        dst.call("group_add", "room", ch)
        digest = sender.call("group_send_big", "room", size, 2, timeout=60)
        for r, c in ((local, lch), (dst, ch)):
            assert tuple(r.call("receive_digest", c, 90.0, timeout=120)) == (2, size, digest)
        try:  # and a normal channel read only on the other host
            dst.start_call("receive_digest", "jobs", 90.0)
            time.sleep(0.5)  # the reader registered, its host consuming
            digest = sender.call("send_big", "jobs", size, 3, timeout=60)
            assert tuple(dst.result(timeout=120)) == (3, size, digest)
        finally:
            delete_queues(broker_url, [normal_queue_name(ns_prefix, "jobs")])
    for r in (*hs["ha"], *hs["hb"]):
        assert sum(r.call("stats").dropped.values()) == 0
    assert wait_until(
        lambda: not [n for n in os.listdir("/dev/shm") if f".{ns_prefix}." in n and ".x" in n],
        5,
    )


@pytest.mark.parametrize("keys", [None, ["k1"]], ids=["plain", "sealed"])
def test_mixed_sizes_cross_hosts_intact_and_in_order(
    hosts: HostsFactory, keys: list[str] | None
) -> None:
    """Around every size boundary of the outbound path (a batch, ``wire.LARGE`` where a
    frame goes out not joined, one AMQP body frame, several), from the leader (its own
    hand-off) and from another process (through the leader's ring), plain and sealed:
    every message arrives whole, FIFO per sender."""
    extra = {} if keys is None else {"symmetric_encryption_keys": keys}
    hs = hosts({"ha": 2}, **extra)
    dst = hosts({"hb": 1}, **extra)["hb"][0]
    ch = dst.call("new_channel", "mix.")
    sizes = [100, 64 * 1024 - 40, 64 * 1024, 131_000, 131_072, 300_000, 1 * MB, 100, 2 * MB + 7]
    sent = []
    for k, sender in enumerate(hs["ha"]):
        for i, n in enumerate(sizes):
            data = os.urandom(n)
            sender.call("send", ch, {"type": "m", "k": k, "i": i, "data": data}, timeout=30)
            sent.append((k, i, data))
    got: dict[int, list[tuple[int, bytes]]] = {0: [], 1: []}
    for _ in sent:
        m = dst.call("receive", ch, 20.0, timeout=30)
        got[m["k"]].append((m["i"], m["data"]))
    for k in (0, 1):
        assert got[k] == [(i, data) for kk, i, data in sent if kk == k]
    for r in (*hs["ha"], dst):
        assert sum(r.call("stats").dropped.values()) == 0
