"""A broker client WITHOUT the keys against hosts with ``symmetric_encryption_keys``
(issue 12): it captures a sealed group message and republishes it to another host's
queue, under another group's key, again under its own key, and after its expiry;
nothing is delivered and every attempt is counted. Also: group copies with a spoofed
origin (no keys) are counted, and a frame encrypted as hybrid_layer 0.1 did is refused.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.broker.conftest import HostsFactory
from tests.remote import Remote, RemoteError, wait_until

KEYS = {"symmetric_encryption_keys": ["k-new", "k-old"]}


def gkey(prefix: str, group: str) -> str:
    from hybrid_layer.amqp.topology import group_key
    from hybrid_layer.shm.groupset import name_hash

    return group_key(prefix, name_hash("g", group))


def hq(prefix: str, host_id: str) -> str:
    from hybrid_layer.amqp.topology import host_queue

    return host_queue(prefix, host_id)


def dropped(r: Remote, reason: str) -> int:
    return int(r.call("stats").dropped[reason])


def duplicates(r: Remote) -> int:
    return int(r.call("stats").broker["duplicates"])


def nothing(r: Remote, channel: str) -> None:
    with pytest.raises(RemoteError, match="Timeout"):
        r.call("receive", channel, 0.5)


class Spy:
    """A broker client with no key: its own queue bound to a group's key."""

    def __init__(self, url: str, queue: str, exchange: str, key: str) -> None:
        self.url, self.queue = url, queue
        self._run(self._declare(exchange, key))

    def _run(self, coro: Any) -> Any:
        return asyncio.run(coro)

    async def _declare(self, exchange: str, key: str) -> None:
        import aiormq

        conn = await aiormq.connect(self.url)
        try:
            ch = await conn.channel()
            await ch.exchange_declare(exchange, exchange_type="direct", durable=True, passive=True)
            await ch.queue_declare(self.queue, auto_delete=False)
            await ch.queue_bind(self.queue, exchange, routing_key=key)
        finally:
            await conn.close()

    def capture(self, timeout: float = 10.0) -> bytes:
        async def run() -> bytes:
            import aiormq

            conn = await aiormq.connect(self.url)
            try:
                ch = await conn.channel()
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    got = await ch.basic_get(self.queue, no_ack=True)
                    if got.body:
                        return bytes(got.body)
                    await asyncio.sleep(0.05)
                raise AssertionError("the spy captured nothing")
            finally:
                await conn.close()

        return self._run(run())

    def publish(self, body: bytes, exchange: str, key: str) -> None:
        async def run() -> None:
            import aiormq

            conn = await aiormq.connect(self.url)
            try:
                ch = await conn.channel(publisher_confirms=True)
                await ch.basic_publish(body, exchange=exchange, routing_key=key)
            finally:
                await conn.close()

        self._run(run())

    def delete(self) -> None:
        async def run() -> None:
            import aiormq

            conn = await aiormq.connect(self.url)
            try:
                ch = await conn.channel()
                await ch.queue_delete(self.queue)
            finally:
                await conn.close()

        self._run(run())


def test_a_captured_sealed_group_message_cannot_be_redirected_or_replayed(
    hosts: HostsFactory, broker_url: str, ns_prefix: str
) -> None:
    from hybrid_layer.amqp import wire

    a = hosts({"ha": 1}, expiry=3, **KEYS)["ha"][0]
    b = hosts({"hb": 1}, symmetric_encryption_keys=["k-old", "k-new"])["hb"][0]  # rotation
    c = hosts({"hc": 1}, **KEYS)["hc"][0]
    cb, cc = b.call("new_channel", "s."), c.call("new_channel", "o.")
    b.call("group_add", "staff", cb)
    c.call("group_add", "other", cc)
    spy = Spy(broker_url, f"{ns_prefix}.spy", "groups", gkey(ns_prefix, "staff"))
    try:
        a.call("group_send", "staff", {"type": "secret", "n": 1})
        assert b.call("receive", cb, 10.0) == {"type": "secret", "n": 1}
        body = spy.capture()
        assert b"secret" not in body and b"staff" not in body
        assert wait_until(lambda: duplicates(b) == 0 and dropped(b, "unauthenticated") == 0, 2)

        # to a non-member's host: on its host queue, and under the key of its group
        spy.publish(body, "", hq(ns_prefix, "hc"))
        spy.publish(body, "groups", gkey(ns_prefix, "other"))
        assert wait_until(lambda: dropped(c, "unauthenticated") == 2, 10)
        nothing(c, cc)
        # to the member's host queue directly: not where it was sealed for
        spy.publish(body, "", hq(ns_prefix, "hb"))
        assert wait_until(lambda: dropped(b, "unauthenticated") == 1, 10)
        # replayed where it was sealed for, four times: its sealed id was delivered
        for _ in range(4):
            spy.publish(body, "groups", gkey(ns_prefix, "staff"))
        assert wait_until(lambda: duplicates(b) == 4, 10)
        nothing(b, cb)

        # after its expiry, to a member host that did not have it yet: expired, counted
        d = hosts({"hd": 1}, **KEYS)["hd"][0]
        cd = d.call("new_channel", "d.")
        d.call("group_add", "staff", cd)
        time.sleep(3.2)  # (the sender's expiry is 3 s)
        spy.publish(body, "groups", gkey(ns_prefix, "staff"))
        assert wait_until(lambda: dropped(d, "expired") == 1, 10)
        nothing(d, cd)
        assert wait_until(lambda: duplicates(b) == 5, 10)

        # a frame encrypted as hybrid_layer 0.1 did (header in clear): refused
        crypter = wire.Crypter((b"k-new",))
        o, n = b"ha", cb.encode()
        head = wire.HEADER.pack(0x81, wire.DIRECT, len(o), len(n), time.time() + 10)
        legacy = head + o + n + crypter.encrypt(b"\x81\xa4type\xa3old")
        spy.publish(legacy, "", hq(ns_prefix, "hb"))
        assert wait_until(lambda: dropped(b, "unauthenticated") == 2, 10)
        nothing(b, cb)

        # and the hosts keep going (keys rotated: hb encrypts with the old one)
        a.call("group_send", "staff", {"type": "after"})
        assert b.call("receive", cb, 10.0) == {"type": "after"}
        b.call("send", cc, {"type": "direct"})
        assert c.call("receive", cc, 10.0) == {"type": "direct"}
        assert dropped(b, "malformed") == 0 and dropped(c, "malformed") == 0
    finally:
        spy.delete()


def test_group_copies_with_a_spoofed_origin_are_counted(
    hosts: HostsFactory, broker_url: str, ns_prefix: str
) -> None:
    from hybrid_layer.amqp import wire
    from hybrid_layer.envelope import encode_message

    hs = hosts({"ha": 1, "hb": 1})
    a, b = hs["ha"][0], hs["hb"][0]
    cb = b.call("new_channel", "s.")
    b.call("group_add", "staff", cb)
    spy = Spy(broker_url, f"{ns_prefix}.spy", "groups", gkey(ns_prefix, "nobody"))
    try:
        # this host's own group sends come back from the exchange: not counted
        b.call("group_send", "staff", {"type": "own"})
        assert b.call("receive", cb, 10.0) == {"type": "own"}
        a.call("group_send", "staff", {"type": "remote"})
        assert b.call("receive", cb, 10.0) == {"type": "remote"}
        time.sleep(0.3)
        assert dropped(b, "unauthenticated") == 0
        # a copy claiming to come from hb that hb never published: dropped, counted
        msg = encode_message({"type": "spoof"})
        frame = wire.encode(wire.GROUP, "hb", "staff", time.time() + 10, msg)
        spy.publish(frame, "groups", gkey(ns_prefix, "staff"))
        assert wait_until(lambda: dropped(b, "unauthenticated") == 1, 10)
        nothing(b, cb)
    finally:
        spy.delete()
