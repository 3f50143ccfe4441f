"""The leader's link to RabbitMQ: one connection per host, on the leader's host thread.

What it does, all on the host thread's event loop:

* connects (URLs tried in turn, backoff with jitter, for ever), declares the groups
  exchange and the host's exclusive queue ``<prefix>.<host_id>`` and consumes it;
* keeps the queue's bindings equal to the groups that have a member on this host, and a
  consumer on the shared queue of every normal channel read on this host (both read
  from the tagged hashes every participant publishes in shared memory);
* publishes what participants hand it (``submit``, any thread) with pipelined
  publisher confirms: a ``nack`` (the destination's ``x-max-length`` reached) marks the
  destination full for a moment, so that participants' ``send`` raises ``ChannelFull``;
* delivers what arrives into participants' inboxes.

Link state and the count of completed binding syncs are published in the leader's
registry record (``LQ_*`` words), where participants read them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import aiormq
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from .. import names
from .._log import limited
from ..config import PUBLISH_BATCH_MAX
from ..shm import layout as L
from ..shm.groupset import name_hash
from ..shm.registry import FULL_CHANNEL, FULL_RING, LINK_DOWN, NO_CHANNEL, OK
from . import wire
from .dedup import DedupTable, mark, message_id, parse_message_id

if TYPE_CHECKING:
    from ..participant import Participant

log = logging.getLogger("hybrid_layer")

MAX_IN_FLIGHT = 4096  # publishes awaiting a confirm
# handed over, not yet published: over CONFIG outbound_limit(_bytes) senders are told to
# wait (LQ_BUSY: send() backs off, then raises ChannelFull after 0.5 s; group_send drops
# and counts); under a quarter of it they go on; over twice it (records already in the
# leader's ring when the flag went up) a hand-off is dropped and counted
RETRY_MIN = 0.05  # a message returned for want of a queue: first retry after this
RETRY_MAX = 1.0  # ... doubling up to this, until the message expires
SEEN_MAX = 65_536  # normal-channel message ids remembered against redeliveries
FULL_HOLD = 0.2  # seconds a destination stays "full" after a nack
BACKOFF_MIN = 0.1
BACKOFF_MAX = 10.0
PREFETCH = 256  # unacknowledged deliveries from normal-channel queues
HOST_PREFETCH = 64  # ... from the host queue (AMQP messages, each a batch of up to
# CONFIG publish_batch messages)
DECLARE_AGAIN = 60.0  # re-declare a normal queue we publish to (keeps x-expires away)
MAX_BATCH_BYTES = 256 * 1024  # a batch (CONFIG publish_batch) stops at about this size
# a message this long goes out not joined (wire.Parts); as LARGE <= MAX_BATCH_BYTES, it
# is always alone in its AMQP message (``_next_batch``)
LARGE = wire.LARGE
HOLD_MAX = 10_000  # direct messages held for busy readers before acks are held back
HOLD_BYTES = 32 * 1024 * 1024  # ... or bytes held (a hard cap at twice it: dropped)
HOLD_LOW = 5_000  # ... and acknowledged again under this
HOLD_RETRY = 0.002  # seconds between attempts to place held messages
ACK_DELAY = 0.001  # deliveries are acknowledged (multiple) this long after the first
NORMAL_PAUSE = 0.05  # stop consuming a normal queue this long when its readers are full

#: one outbound message: (kind, name, payload, expires_at, capacity key); the payload may
#: be a view of an immutable record body (never of shared memory)
Out = tuple[int, str, bytes | memoryview, float, str | None]
KIND_TO_WIRE = {
    L.KIND_OUT_DIRECT: wire.DIRECT,
    L.KIND_OUT_GROUP: wire.GROUP,
    L.KIND_OUT_NORMAL: wire.NORMAL,
}


def host_queue(prefix: str, host_id: str) -> str:
    return f"{prefix}.{host_id}"


def claim_queue(prefix: str, host_id: str) -> str:
    """An exclusive queue whose holder is the one connection serving ``host_id``."""
    return f"{prefix}.{host_id}.claim"


def dead_exchange(prefix: str) -> str:
    return f"{prefix}.dead"


def dead_queue(prefix: str, host_id: str) -> str:
    """Where the broker puts what it drops from the host's queue (expired, or a
    policy's limits): the leader counts it and says why, instead of silence."""
    return f"{prefix}.{host_id}.dead"


DEAD_MAX = 10_000  # messages the dead-letter queue keeps while no leader reads it


def normal_dead_queue(prefix: str) -> str:
    """Where the broker dead-letters what expires (or a policy drops) in any normal
    channel's queue: one queue for the prefix, read by every leader (competing
    consumers), so each such drop is counted once, by whichever host takes it."""
    return f"{prefix}.normal.dead"


#: its arguments are the same for every host (they share it): fixed, not from CONFIG
NORMAL_DEAD_ARGS = {"x-expires": 24 * 3600 * 1000, "x-max-length": DEAD_MAX}


def host_queue_args(cfg: Any) -> tuple[bool, dict[str, Any]]:
    """(durable, arguments) of a host's queue: it outlives its connection and leader
    (not exclusive) until unused for ``host_queue_expires``; one consumer at a time;
    what the broker drops from it is dead-lettered to this host's dead queue."""
    args: dict[str, Any] = {
        "x-max-length": cfg.remote_capacity,
        "x-overflow": "reject-publish",
        "x-message-ttl": int(cfg.expiry * 1000),
        "x-expires": int(cfg.host_queue_expires * 1000),
        "x-single-active-consumer": True,
        "x-dead-letter-exchange": dead_exchange(cfg.prefix),
        "x-dead-letter-routing-key": host_queue(cfg.prefix, cfg.host_id),
    }
    if cfg.queue_type == "quorum":
        args["x-queue-type"] = "quorum"
        return True, args
    return False, args


class Pub:
    """One AMQP message published (or about to be): kept until the broker confirms it,
    so that it can be published again after a lost connection or a return."""

    __slots__ = (
        "body",
        "dest",
        "gen",
        "key",
        "kind",
        "n",
        "nacked",
        "name",
        "order",
        "sealed",
        "seq",
        "until",
    )

    def __init__(
        self,
        kind: int,
        name: str,
        key: str | None,
        dest: tuple[str, str, bool],
        body: bytes | wire.Parts,  # a large message's frame not joined
        n: int,
        until: float,
    ) -> None:
        self.kind, self.name, self.key, self.dest = kind, name, key, dest
        self.body, self.n, self.until = body, n, until  # until: the latest frame's expiry
        self.seq = 0
        self.gen = 0  # the connection it was published on
        self.order = 0  # the seq it was first published with (its place in its stream)
        self.nacked = False  # rejected by its queue (full or failing) at least once
        self.sealed: tuple[int, bytes] | None = None  # (seq, body sealed with that id)


def group_key(prefix: str, group_hash: int) -> str:
    return f"{prefix}.g.{group_hash:016x}"


def normal_queue(prefix: str, channel_hash: int) -> str:
    return f"{prefix}.n.{channel_hash:016x}"


def _with_heartbeat(url: str, heartbeat: int) -> str:
    if "heartbeat=" in url:
        return url
    return f"{url}{'&' if '?' in url else '?'}heartbeat={heartbeat}"


class Link:
    """The host's one AMQP connection, owned by the leader. Create on the host loop."""

    def __init__(self, p: Participant, loop: asyncio.AbstractEventLoop) -> None:
        self.p = p
        cfg = self.cfg = p.cfg
        self.loop = loop
        self.crypter = wire.Crypter(cfg.encryption_keys) if cfg.encryption_keys else None
        self.queue = host_queue(cfg.prefix, cfg.host_id)
        self.out: deque[Out] = deque()
        self.out_bytes = 0
        self.limit, self.limit_bytes = cfg.outbound_limit, cfg.outbound_limit_bytes
        # publishes awaiting a confirm, in publish order (seq); those of a lost
        # connection are published again on the next one (same ids: deduplicated)
        self.unconfirmed: dict[int, Pub] = {}
        self.nonce = random.getrandbits(63) | 1
        self.seq = 0
        self.conn_gen = 0
        # routing key -> messages returned for want of a queue (a host not up yet) and
        # everything for that queue published after them, in order. One at a time is
        # tried (the probe) until the broker routes it; then the rest go, in order.
        self.retry: dict[str, deque[Pub]] = {}
        self.probing: dict[str, Pub] = {}  # routing key -> the probe awaiting its fate
        self.retry_timer: dict[str, asyncio.TimerHandle] = {}
        self.retry_delay: dict[str, float] = {}
        self.retry_count = 0
        self.dedup = DedupTable(p.ns.reg_q, L.DQ_BASE, L.DEDUP_ENTRIES)
        self.dedup.claim_own(self.nonce)  # our group sends' echoes are no spoofs
        self.seen: set[str] = set()  # normal-channel message ids delivered here
        self.seen_order: deque[str] = deque()
        self.reason = ""  # why the link is not up, for logs and statistics
        self.last_sync_wall = 0.0
        self._kicked = False
        self._publishing = False  # the publisher task is at work (not waiting for _wake)
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._sync_wanted = asyncio.Event()
        self._flush_wanted = False
        self.state = L.LINK_NONE
        self.ever_up = False
        self.url_index = 0
        self.connect_failures = 0  # failed attempts to connect, since the start
        self.url = ""
        self.conn: Any = None
        self.ch: Any = None  # publishing, host queue, bindings
        self._fast_publish = False  # publishes queued by _publish_frame (see there)
        self.nch: Any = None  # normal-channel queues (prefetch, acks)
        self.bound: set[int] = set()
        self.consuming: dict[int, str] = {}  # normal hash -> consumer tag
        self.declared: dict[int, float] = {}  # normal hash -> when we declared it
        self.paused: dict[int, float] = {}  # normal hash -> consume again after
        self.full: dict[str, float] = {}  # destination key -> flagged at (monotonic)
        # destination key -> routing key of a queue found full: flagged while messages
        # rejected by it wait to be tried again
        self.full_waiting: dict[str, str] = {}
        self._nack_checked: dict[str, float] = {}  # routing key -> last looked at
        self.dead_lettered: dict[str, int] = {}  # the broker's drops, by reason
        self.syncs = 0
        self.busy = False
        self._ack_tag = 0
        self._ack_scheduled = False
        self._ack_held_back = False
        self._ack_task: asyncio.Future[Any] | None = None  # the one basic.ack under way
        # direct messages from other hosts waiting for room in a busy reader's inbox
        self.held: dict[str, deque[tuple[bytes | memoryview, float]]] = {}
        self.held_total = 0
        self.held_bytes = 0
        self.max_frame = cfg.max_message_bytes + 4096  # frames over it dropped on arrival
        self._held_epoch = 0  # the host's flush epoch when the oldest held message came
        self._retry_handle: asyncio.TimerHandle | None = None
        self._prefetch = min(HOST_PREFETCH, cfg.remote_capacity)
        self.closing = False
        self.thread_id = threading.get_ident()
        self._set_state(L.LINK_CONNECTING)
        self.task = loop.create_task(self._run())

    # ================================================================ any thread
    def submit(
        self, kind: int, name: str, payload: bytes | memoryview, expires_at: float, key: str | None
    ) -> int:
        """Queue one outbound message: OK, or LINK_DOWN / FULL_RING (outbound queue
        full), which the caller counts as a drop or backs off from."""
        if self.closing:
            return LINK_DOWN
        out = self.out
        if len(out) >= 2 * self.limit or self.out_bytes >= 2 * self.limit_bytes:
            return FULL_RING
        out.append((kind, name, payload, expires_at, key))
        self.out_bytes += len(payload)
        if not self.busy and (len(out) >= self.limit or self.out_bytes >= self.limit_bytes):
            self.busy = True
            self.p.ns.link_set(L.LQ_BUSY, 1)
        self.kick()
        return OK

    def _popleft(self) -> Out:
        item = self.out.popleft()
        self.out_bytes -= len(item[2])
        return item

    @property
    def in_flight(self) -> int:
        return len(self.unconfirmed)

    def kick(self) -> None:
        """Wake the publisher (once per batch) for what is in ``out``."""
        if self._kicked:
            return
        self._kicked = True
        if threading.get_ident() == self.thread_id:
            self.loop.call_soon(self._publish_soon)
        else:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._publish_soon)

    def request_sync(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._sync_wanted.set)

    def request_flush(self) -> None:
        self._flush_wanted = True
        self.request_sync()

    # ================================================================ loop thread
    def _set_state(self, state: int, reason: int = 0, text: str = "") -> None:
        self.state = state
        self.reason = text or L.REASONS.get(reason, "")
        ns = self.p.ns
        ns.link_set(L.LQ_REASON, reason)
        ns.link_set(L.LQ_STATE, state)
        ns.link_set(L.LQ_CHANGES, ns.link_get(L.LQ_CHANGES) + 1)

    def _bump_syncs(self) -> None:
        self.syncs += 1
        self.last_sync_wall = time.time()
        self.p.ns.link_set(L.LQ_SYNC_AT, int(self.last_sync_wall * 1000))
        self.p.ns.link_set(L.LQ_SYNCS, self.syncs)

    def _not_up(self, reason: int, text: str) -> None:
        """The link is not up (a failed attempt or a lost connection): what is handed
        over is kept (bounded, CONFIG outbound_limit) and published once it is up."""
        if self.state != L.LINK_DOWN or self.reason != text:
            self._set_state(L.LINK_DOWN, reason, text)

    async def _run(self) -> None:
        failures = 0
        cfg = self.cfg
        plain = not any(u.startswith("amqps://") for u in cfg.broker_urls)
        if cfg.ssl_context is not None and plain:
            log.warning(
                "hybrid_layer: CONFIG['ssl_context'] is set but no URL in CONFIG['host'] is "
                "amqps://: the connection is NOT encrypted (use amqps://host:5671/)"
            )
        while not self.closing:
            urls = cfg.broker_urls
            url = urls[self.url_index % len(urls)]
            try:
                await self._connect(url)
            except (Exception, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and self._cancelled():
                    raise
                await self._drop_connection()
                failures += 1
                self.connect_failures += 1
                self.url_index += 1
                reason, text = _explain(exc, cfg)
                self._not_up(reason, text)
                self._expire_out()
                delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(failures, 10))
                delay *= random.uniform(0.5, 1.5)
                limited.warning(
                    "link-connect",
                    "hybrid_layer: cannot use RabbitMQ at %s: %s; retrying in %.1fs "
                    "(cross-host messages are kept meanwhile, up to outbound_limit)",
                    _safe(url),
                    text,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            failures = 0
            try:
                await self._serve(url)
            except (Exception, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and self._cancelled():
                    raise
                limited.warning(
                    "link-lost",
                    "hybrid_layer: RabbitMQ link lost (%s); reconnecting",
                    _explain(exc, cfg)[1],
                )
            await self._drop_connection()
            if not self.closing:
                self._not_up(L.REASON_LOST, L.REASONS[L.REASON_LOST])
                await asyncio.sleep(BACKOFF_MIN * random.uniform(0.5, 1.5))

    def _cancelled(self) -> bool:
        """Whether a CancelledError is a real cancellation of the link (``aclose``),
        not aiormq failing the calls pending on a connection it found stuck (no frame
        within its heartbeat grace): it fails them, and ``closing``, with a
        CancelledError, which must mean "reconnect", not "stop for good"."""
        task = asyncio.current_task()
        return self.closing or (task is not None and task.cancelling() > 0)

    async def _connect(self, url: str) -> None:
        """Open the connection, claim the host's identity, declare and consume."""
        cfg = self.cfg
        self.url = url
        kwargs: dict[str, Any] = {
            "client_properties": {
                "connection_name": f"hybrid_layer {cfg.namespace} pid {os.getpid()}",
            }
        }
        if cfg.ssl_context is not None:
            kwargs["context"] = cfg.ssl_context
        self.conn = await asyncio.wait_for(
            aiormq.connect(_with_heartbeat(url, cfg.heartbeat), **kwargs), cfg.connect_timeout
        )
        await self._claim()
        await asyncio.wait_for(self._declare(), cfg.connect_timeout)

    async def _claim(self) -> None:
        """Hold ``<prefix>.<host_id>.claim`` (exclusive: it goes with our connection),
        so that two hosts can never share one host queue. A previous leader's
        connection may hold it a moment longer (a killed process: until the broker sees
        its socket close; a stalled one: its heartbeat timeout): wait that long, then
        say loudly that another host uses this host_id, and keep trying."""
        cfg, c = self.cfg, self.p.counters
        name = claim_queue(cfg.prefix, cfg.host_id)
        grace = 2.5 * max(cfg.heartbeat, 1) + 2.0
        start = time.monotonic()
        clash = False
        told_at = -1e9
        while True:
            ch = await self.conn.channel(publisher_confirms=False)
            try:
                await ch.queue_declare(name, exclusive=True, auto_delete=True)
            except aiormq.exceptions.ChannelLockedResource:
                c.broker_claim_refused += 1
                waited = time.monotonic() - start
                if waited >= grace:
                    clash = True
                    text = (
                        f"host_id {cfg.host_id!r} is claimed by another connection for "
                        f"{waited:.0f}s: another host runs with the same host_id "
                        "(set CONFIG['host_id'] per host); this host neither sends nor "
                        "receives across hosts until that ends"
                    )
                    self._not_up(L.REASON_CLAIMED, text)
                    if time.monotonic() >= told_at + 30.0:  # an ERROR every 30 s
                        told_at = time.monotonic()
                        log.error("hybrid_layer: %s", text)
                await asyncio.sleep(0.1 if waited < grace else 2.0)
                continue
            with contextlib.suppress(Exception):
                await ch.close()
            if clash:
                log.warning("hybrid_layer: host_id %r claimed at last", cfg.host_id)
            return

    async def _declare(self) -> None:
        cfg, conn = self.cfg, self.conn
        ch = self.ch = await conn.channel(publisher_confirms=True)
        self._fast_publish = _can_publish_directly(ch)
        _join_content(ch)
        await ch.exchange_declare(cfg.groups_exchange, exchange_type="direct")
        dx, dq = dead_exchange(cfg.prefix), dead_queue(cfg.prefix, cfg.host_id)
        await ch.exchange_declare(dx, exchange_type="direct")
        await ch.queue_declare(
            dq,
            arguments={
                "x-expires": int(cfg.host_queue_expires * 1000),
                "x-max-length": DEAD_MAX,
            },
        )
        await ch.queue_bind(dq, dx, routing_key=self.queue)
        ndq = normal_dead_queue(cfg.prefix)
        await self._declare_normal_dead(ndq, dx)
        durable, args = host_queue_args(cfg)
        try:
            await ch.queue_declare(self.queue, durable=durable, arguments=args)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            # made by another version or other settings (remote_capacity, expiry,
            # queue_type): used as it is; deleting it applies the new ones
            limited.warning(
                "host-queue-mismatch",
                "hybrid_layer: queue %s exists with other arguments (%s); using it as it "
                "is: delete it (rabbitmqctl delete_queue %s) while no leader of this host "
                "runs to apply the current settings",
                self.queue,
                exc,
                self.queue,
            )
            ch = self.ch = await conn.channel(publisher_confirms=True)
            self._fast_publish = _can_publish_directly(ch)
            _join_content(ch)
            await ch.queue_declare(self.queue, passive=True)
        # acknowledged (in batches) so that a stalled leader holds at most the prefetch
        # and the rest waits on the broker, where remote_capacity applies
        await ch.basic_qos(prefetch_count=self._prefetch)
        self._ack_tag = 0
        self._ack_scheduled = False
        self._ack_held_back = False  # (tags of the old channel mean nothing here)
        self._ack_task = None
        ok = await ch.basic_consume(self.queue, self._on_host_message)
        _run_inline(ch, ok.consumer_tag, self._on_host_message)
        nch = self.nch = await conn.channel(publisher_confirms=False)
        await nch.basic_qos(prefetch_count=PREFETCH)
        ok = await nch.basic_consume(dq, self._on_dead, no_ack=True)
        _run_inline(nch, ok.consumer_tag, self._on_dead)
        ok = await nch.basic_consume(ndq, self._on_normal_dead, no_ack=True)
        _run_inline(nch, ok.consumer_tag, self._on_normal_dead)
        self.bound = set()
        self.consuming = {}
        self.declared = {}
        self._room.set()

    async def _drop_connection(self) -> None:
        conn, self.conn, self.ch, self.nch = self.conn, None, None, None
        self.bound = set()
        self.consuming = {}
        self.declared = {}
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1.0)

    def _take_all(self) -> int:
        """Forget everything not yet confirmed; returns how many messages."""
        n = len(self.out) + self.retry_count
        self.out.clear()
        self.out_bytes = 0
        self.retry.clear()
        self.probing.clear()
        for timer in self.retry_timer.values():
            timer.cancel()
        self.retry_timer.clear()
        self.retry_count = 0
        n += sum(pub.n for pub in self.unconfirmed.values())
        self.unconfirmed.clear()
        self._room.set()
        if self.busy:
            self.busy = False
            self.p.ns.link_set(L.LQ_BUSY, 0)
        return n

    def _expire_out(self) -> None:
        """While the link is not up: drop (and count) what expired at the queue's head."""
        out, now, n = self.out, time.monotonic(), 0
        while out and out[0][3] <= now:
            self._popleft()
            n += 1
        if n:
            self.p.counters.drop(
                "expired",
                n,
                "hybrid_layer: %d cross-host message(s) expired waiting for the link",
                n,
            )
        self._not_busy()

    def _not_busy(self) -> None:
        low = len(self.out) <= self.limit // 4 and self.out_bytes <= self.limit_bytes // 4
        if self.busy and low:
            self.busy = False
            self.p.ns.link_set(L.LQ_BUSY, 0)

    async def _serve(self, url: str) -> None:
        """Bind, then publish (what a lost connection left unconfirmed first), sync
        bindings and flush until the connection closes. The link is "up" (and
        ``on_reconnect`` goes out) only once every binding is in place."""
        conn = self.conn
        assert conn is not None
        self.conn_gen += 1
        while not await self._sync():  # a group set was mid-rebuild
            await asyncio.sleep(0.01)
        if self.ever_up:
            self.p.counters.broker_reconnects += 1
            log.warning("hybrid_layer: RabbitMQ link restored (%s)", _safe(url))
        else:
            log.info("hybrid_layer: leader connected to RabbitMQ at %s", _safe(url))
        self.ever_up = True
        await self._republish()
        self._set_state(L.LINK_UP)
        self._wake.set()
        tasks = [
            asyncio.ensure_future(self._publisher()),
            asyncio.ensure_future(self._syncer()),
        ]
        closing = conn.closing  # an observer: each access makes a new one
        # a channel error closes only that channel (its consumer too): treat it like a
        # lost connection, or the link would look up while half dead
        ch_closings = [self.ch.closing, self.nch.closing]
        try:
            done, _ = await asyncio.wait(
                [*tasks, closing, *ch_closings], return_when=asyncio.FIRST_COMPLETED
            )
            for c in ch_closings:
                if c in done and not self.closing:
                    exc = c.exception() if not c.cancelled() else None
                    raise ConnectionError(f"AMQP channel closed: {exc!r}")
            for t in tasks:
                # a task that ended cancelled had a call failed by the dying connection
                if t in done and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            if not self.closing:
                exc = closing.exception() if closing.done() and not closing.cancelled() else None
                if isinstance(exc, asyncio.CancelledError):
                    exc = TimeoutError("no frame from the broker within the heartbeat grace")
                raise ConnectionError(f"connection closed: {exc!r}")
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t

    async def _republish(self) -> None:
        """Publish again, in order and with their ids, what the last connection left
        unconfirmed: the receiving hosts skip those that did arrive. A normal channel's
        message is not (hosts share its queue, so nobody could tell): counted lost."""
        c = self.p.counters
        now = time.monotonic()
        for seq, pub in list(self.unconfirmed.items()):
            if pub.gen == self.conn_gen:
                continue
            del self.unconfirmed[seq]
            if pub.kind == L.KIND_OUT_NORMAL:
                c.drop(
                    "link_down",
                    pub.n,
                    "hybrid_layer: %d message(s) to normal channel %r unconfirmed when the "
                    "link died: dropped (maybe delivered)",
                    pub.n,
                    pub.name,
                )
            elif pub.until <= now:
                c.drop(
                    "expired",
                    pub.n,
                    "hybrid_layer: %d message(s) to %r expired unconfirmed when the link died",
                    pub.n,
                    pub.name,
                )
            elif pub.dest[1] in self.retry and self.probing.get(pub.dest[1]) is not pub:
                self._keep_for_retry(pub)  # behind (or among) what waits for its queue
            else:
                c.broker_republished += pub.n
                frame = self._emit(pub)
                if frame is not None:
                    await self.ch.write_queue.put(frame)

    # ---------------------------------------------------------------- publishing
    async def _publisher(self) -> None:
        out = self.out
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._kicked = False
            self._publishing = True
            try:
                while out:
                    if self.in_flight >= MAX_IN_FLIGHT:
                        self._room.clear()
                        await self._room.wait()
                    batch, dest = self._next_batch()
                    kind, name = batch[0][0], batch[0][1]
                    if kind == L.KIND_OUT_NORMAL and dest is not None:
                        h = name_hash("n", name)
                        when = self.declared.get(h)
                        if when is None or time.monotonic() - when > DECLARE_AGAIN:
                            await self._declare_normal(h, name)
                    frame = self._publish(batch, dest)
                    if frame is not None:
                        await self.ch.write_queue.put(frame)
            finally:
                self._publishing = False

    def _publish_soon(self) -> None:
        """Loop thread, on a kick: publish at once what needs no waiting, which saves
        the publisher task's turn of the loop on every message's way out; anything else
        (a full write queue or in-flight window, a normal channel's declare) is left to
        the task, which also takes over whenever it is already at work (order)."""
        self._kicked = False
        out = self.out
        ch = self.ch
        if (
            out
            and self._fast_publish
            and not self._publishing
            and self.state == L.LINK_UP
            and ch is not None
            and not ch.is_closed
        ):
            wq = ch.write_queue
            while (
                out
                and out[0][0] != L.KIND_OUT_NORMAL
                and self.in_flight < MAX_IN_FLIGHT
                and not wq.full()
            ):
                frame = self._publish(*self._next_batch())
                if frame is not None:
                    wq.put_nowait(frame)
        if out:
            self._wake.set()

    def _next_batch(
        self,
    ) -> tuple[list[Out], tuple[str, str, bool] | None]:
        """Take the next AMQP message's worth from ``out``: the first message and, for a
        host or group, those after it for the same destination (``publish_batch``)."""
        out = self.out
        batch = [self._popleft()]
        kind, name = batch[0][0], batch[0][1]
        dest = self._route(kind, name)
        if kind != L.KIND_OUT_NORMAL:
            size = len(batch[0][2])
            limit = self.cfg.publish_batch
            while out and len(batch) < limit and size < MAX_BATCH_BYTES:
                nxt = out[0]
                if nxt[0] != kind or (nxt[1] != name and self._route(kind, nxt[1]) != dest):
                    break
                if size + len(nxt[2]) > MAX_BATCH_BYTES:  # (a large one goes on its own:
                    break  # never a batch over the broker's max_message_size for it)
                batch.append(self._popleft())
                size += len(nxt[2])
        if self.busy:
            self._not_busy()
        return batch, dest

    def _route(self, kind: int, name: str) -> tuple[str, str, bool] | None:
        """(exchange, routing key, mandatory) of a direct or group message; ``None`` for
        a direct message to a name that is no process channel."""
        cfg = self.cfg
        if kind == L.KIND_OUT_DIRECT:
            addr = names.parse(name)
            if addr is None:
                return None
            return "", host_queue(cfg.prefix, addr.host_id), True
        if kind == L.KIND_OUT_GROUP:
            return cfg.groups_exchange, group_key(cfg.prefix, name_hash("g", name)), False
        return "", normal_queue(cfg.prefix, name_hash("n", name)), True

    def _publish(
        self,
        batch: list[Out],
        dest: tuple[str, str, bool] | None,
    ) -> Any:
        """One AMQP message to ``dest`` (``_route`` of the first): one frame, or a batch
        of frames for that one destination. Returns what the caller puts on the
        channel's write queue (``_fast_publish``), else None (published in a task, or
        nothing to publish, or kept behind messages waiting for their queue)."""
        cfg = self.cfg
        c = self.p.counters
        kind, name, _, _, key = batch[0]
        now_mono, now_wall = time.monotonic(), time.time()
        frames = []
        longest = 0.0
        wkind = KIND_TO_WIRE[kind]
        parts = None
        for _, fname, payload, expires_at, _ in batch:
            remaining = expires_at - now_mono
            if remaining <= 0:
                c.drop("expired", 1, "hybrid_layer: message to %r expired before publish", fname)
                continue
            longest = max(longest, remaining)
            if len(payload) >= LARGE and len(batch) == 1:  # (alone: over a batch)
                parts = wire.encode_parts(wkind, cfg.host_id, fname, now_wall + remaining, payload)
                break
            frames.append(wire.encode(wkind, cfg.host_id, fname, now_wall + remaining, payload))
        if parts is not None:  # a large one, not joined: cut into AMQP frames at once
            body: bytes | wire.Parts = parts
            n = 1
        elif not frames:
            return None
        else:
            body = frames[0] if len(frames) == 1 else wire.encode_batch(frames)
            n = len(frames)
        if dest is None:
            c.drop(
                "no_channel",
                n,
                "hybrid_layer: %d message(s) to %r dropped: no destination on the broker",
                n,
                name,
            )
            return None
        pub = Pub(kind, name, key, dest, body, n, now_mono + longest)
        c.broker_published += pub.n
        if pub.n > 1:
            c.broker_batches += 1
        waiting = self.retry.get(dest[1])
        if waiting is not None:  # behind messages waiting for this queue (FIFO)
            waiting.append(pub)
            self.retry_count += pub.n
            return None
        return self._emit(pub)

    def _emit(self, pub: Pub) -> Any:
        """Publish ``pub`` on the current channel (a new sequence number unless it is
        published again after a lost connection); see ``_publish``."""
        c = self.p.counters
        if not pub.seq:
            self.seq += 1
            pub.seq = self.seq
            if not pub.order:
                pub.order = pub.seq
        pub.gen = self.conn_gen
        exchange, rk, mandatory = pub.dest
        body = pub.body
        if self.crypter is not None:  # sealed with its route and id (a new id: again)
            sealed = pub.sealed
            if sealed is None or sealed[0] != pub.seq:
                sealed = pub.sealed = (
                    pub.seq,
                    wire.seal(self.crypter, self.nonce, pub.seq, exchange, rk, body),
                )
            body = sealed[1]
        remaining = pub.until - time.monotonic()
        # the broker's own expiry: the latest of the batch (each frame carries its own)
        props = spec.Basic.Properties(
            delivery_mode=1,
            expiration=str(max(1, int(remaining * 1000))),
            message_id=message_id(self.nonce, pub.seq),
        )
        ch = self.ch
        fut: asyncio.Future[Any]
        frame = None
        try:
            if self._fast_publish:
                fut, frame = _publish_frame(ch, body, exchange, rk, props, mandatory)
            else:
                fut = asyncio.ensure_future(
                    ch.basic_publish(
                        body.join() if isinstance(body, wire.Parts) else body,
                        exchange=exchange,
                        routing_key=rk,
                        properties=props,
                        mandatory=mandatory,
                    )
                )
        except Exception as exc:  # not published: counted, never lost silently
            c.drop(
                "link_down",
                pub.n,
                "hybrid_layer: %d message(s) to %r dropped: cannot publish (%s: %s)",
                pub.n,
                pub.name,
                type(exc).__name__,
                exc,
            )
            return None
        self.unconfirmed[pub.seq] = pub
        fut.add_done_callback(lambda f: self._confirmed(f, pub))
        return frame

    def _confirmed(self, fut: asyncio.Future[Any], pub: Pub) -> None:
        if self.unconfirmed.get(pub.seq) is not pub or pub.gen != self.conn_gen:
            return  # forgotten (flush, close) or published again on a newer connection
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or not (exc is None or isinstance(exc, aiormq.exceptions.DeliveryError)):
            return  # the connection failed: kept, published again on the next one
        del self.unconfirmed[pub.seq]
        if len(self.unconfirmed) < MAX_IN_FLIGHT // 2:
            self._room.set()
        c = self.p.counters
        n, key = pub.n, pub.key
        rk = pub.dest[1]
        probe = self.probing.get(rk) is pub
        if probe:
            del self.probing[rk]
        if exc is None:
            c.broker_confirmed += n
            if probe:  # its queue is there: what waited behind it follows, in order
                self.retry_delay.pop(rk, None)
                self._release(rk)
        elif isinstance(exc, aiormq.exceptions.PublishError):  # basic.return: no queue
            c.broker_returned += n
            self._returned(pub)
        elif not pub.dest[0] and pub.until > time.monotonic() and self.retry_count < self.limit:
            # basic.nack from one queue (a host's or a normal channel's): full, or its
            # node failing over. Kept and tried again (one at a time, in order) until it
            # fits or expires; a queue found full makes senders get ChannelFull meanwhile
            c.broker_nacked += n
            pub.nacked = True
            if key is not None:  # ChannelFull for a moment (longer if found full)
                self._flag_full(key)
            self._diagnose_nack(pub)
            pub.seq = 0  # (not taken: a new id, like a return)
            self._keep_for_retry(pub)
        else:  # a group's (several queues: some may have taken it), or out of time
            if probe:
                self._schedule_probe(rk)
            c.drop(
                "remote_full",
                n,
                "hybrid_layer: %d message(s) to %r dropped: RabbitMQ rejected them (nack)",
                n,
                pub.name,
            )
            self._diagnose_nack(pub)
            if key is not None:
                self._flag_full(key)

    def _returned(self, pub: Pub) -> None:
        """A message the broker could not route: its host's queue does not exist (yet:
        a host coming up for the first time; again: a classic queue whose node died).
        Kept, in order with what follows for the same queue, and tried again (one
        message at a time, backing off) until that queue is there or it expires."""
        rk = pub.dest[1]
        if pub.kind == L.KIND_OUT_NORMAL:
            self.declared.pop(name_hash("n", pub.name), None)
        if pub.until <= time.monotonic() or self.retry_count >= self.limit:
            self._drop_unroutable(pub)
            if self.retry.get(rk) and rk not in self.probing:
                self._schedule_probe(rk)
            return
        pub.seq = 0  # a new id: newer messages may have reached that queue meanwhile
        self._keep_for_retry(pub)

    def _keep_for_retry(self, pub: Pub) -> None:
        """Into the retry queue of its routing key, at its place in its stream (a
        return can come after newer messages were queued behind an earlier one)."""
        rk = pub.dest[1]
        q = self.retry.get(rk)
        if q is None:
            q = self.retry[rk] = deque()
        i = len(q)
        if pub.order:
            while i > 0 and (q[i - 1].order == 0 or q[i - 1].order > pub.order):
                i -= 1
        q.insert(i, pub)
        self.retry_count += pub.n
        if rk not in self.probing:
            self._schedule_probe(rk)

    def _drop_unroutable(self, pub: Pub) -> None:
        if pub.nacked:
            self.p.counters.drop(
                "remote_full",
                pub.n,
                "hybrid_layer: %d message(s) to %r dropped: its queue %r kept rejecting "
                "them (full or failing) until they expired",
                pub.n,
                pub.name,
                pub.dest[1],
            )
            return
        self.p.counters.drop(
            "no_channel",
            pub.n,
            "hybrid_layer: %d message(s) to %r dropped: no queue %r on the broker "
            "(that host has not been up within the message's expiry)",
            pub.n,
            pub.name,
            pub.dest[1],
        )

    def _schedule_probe(self, rk: str, delay: float | None = None) -> None:
        if rk in self.retry_timer:
            return
        if delay is None:
            delay = self.retry_delay[rk] = min(
                RETRY_MAX, 2 * self.retry_delay.get(rk, RETRY_MIN / 2)
            )
        self.retry_timer[rk] = self.loop.call_later(delay, self._probe, rk)

    def _can_emit(self) -> bool:
        return self.state == L.LINK_UP and self.ch is not None and not self.ch.is_closed

    def _probe(self, rk: str) -> None:
        """Try the oldest message waiting for queue ``rk``: confirmed, the rest follow
        (``_release``); returned again, the next try backs off."""
        self.retry_timer.pop(rk, None)
        q = self.retry.get(rk)
        now = time.monotonic()
        while q and q[0].until <= now:
            pub = q.popleft()
            self.retry_count -= pub.n
            self._drop_unroutable(pub)
        if not q:
            self.retry.pop(rk, None)
            return
        if rk in self.probing:
            return
        if not self._can_emit() or (self._fast_publish and self.ch.write_queue.full()):
            self._schedule_probe(rk, RETRY_MIN)  # (the link is back in a moment)
            return
        pub = q.popleft()
        self.retry_count -= pub.n
        self.probing[rk] = pub
        self.p.counters.broker_retried += pub.n
        frame = self._emit(pub)
        if frame is not None:
            self.ch.write_queue.put_nowait(frame)

    def _release(self, rk: str) -> None:
        """Queue ``rk`` exists: publish what waited for it, in order; newer messages
        keep queueing behind until it is all out."""
        self.retry_timer.pop(rk, None)
        q = self.retry.get(rk)
        c = self.p.counters
        now = time.monotonic()
        while q:
            if not self._can_emit() or (self._fast_publish and self.ch.write_queue.full()):
                self.retry_timer[rk] = self.loop.call_later(RETRY_MIN, self._release, rk)
                return
            pub = q.popleft()
            self.retry_count -= pub.n
            if pub.until <= now:
                self._drop_unroutable(pub)
                continue
            c.broker_retried += pub.n
            frame = self._emit(pub)
            if frame is not None:
                self.ch.write_queue.put_nowait(frame)
        self.retry.pop(rk, None)

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _diagnose_nack(self, pub: Pub) -> None:
        """Say why RabbitMQ rejected messages: look at the queue (a passive declare, at
        most once a second per queue) - full, or not full and so failing (its node
        down or failing over) or limited by a broker policy."""
        rk = pub.dest[1]
        now = time.monotonic()
        if self._nack_checked.get(rk, 0.0) > now - 1.0 or pub.dest[0]:
            if pub.dest[0]:  # (a group's exchange: no one queue to look at)
                limited.warning(
                    "remote-full",
                    "hybrid_layer: %d message(s) to group %r dropped: RabbitMQ rejected "
                    "them (nack): a member host's queue is full or failing",
                    pub.n,
                    pub.name,
                )
            return
        self._nack_checked[rk] = now
        if len(self._nack_checked) > 1024:
            self._nack_checked.clear()
        conn = self.conn
        normal = pub.kind == L.KIND_OUT_NORMAL
        cap = self.cfg.capacity_for(pub.name) if normal else self.cfg.remote_capacity
        what = "capacity" if normal else "remote_capacity"
        key = pub.key

        async def look() -> None:
            why = "its queue could not be looked at"
            try:
                ch = await conn.channel(publisher_confirms=False)
                try:
                    ok = await asyncio.wait_for(ch.queue_declare(rk, passive=True), 5.0)
                    count = ok.message_count
                    if count >= cap * 0.9:
                        why = f"its queue is full ({count} of {what} {cap})"
                        if key is not None:  # senders get ChannelFull while it is
                            self.full_waiting[key] = rk
                            self._flag_full(key)
                    else:
                        why = (
                            f"its queue is NOT full ({count} of {cap}): its node is down "
                            "or failing over, or a broker policy (max-length, "
                            "max-length-bytes) limits it (rabbitmqctl list_policies)"
                        )
                finally:
                    if not ch.is_closed:
                        with contextlib.suppress(Exception):
                            await ch.close()
            except aiormq.exceptions.ChannelNotFoundEntity:
                why = "its queue is gone (its node down?)"
            except Exception as exc:
                why = f"its queue could not be looked at ({type(exc).__name__}: {exc})"
            limited.warning(
                "remote-full",
                "hybrid_layer: %d message(s) to %r dropped: RabbitMQ rejected them (nack): %s",
                pub.n,
                pub.name,
                why,
            )

        if conn is not None:
            task = asyncio.ensure_future(look())
            task.add_done_callback(_ignore_result)

    def _flag_full(self, key: str) -> None:
        if key not in self.full:
            with self.p.lock:
                self.p.own.groups.add(name_hash("f", key))
        self.full[key] = time.monotonic()

    def expire_full_flags(self) -> None:
        if not self.full:
            return
        now = time.monotonic()
        waiting = self.full_waiting
        for key, since in list(self.full.items()):
            if now - since >= FULL_HOLD:
                if waiting.get(key) in self.retry:  # still full: its messages wait
                    self.full[key] = now
                    continue
                waiting.pop(key, None)
                del self.full[key]
                with self.p.lock:
                    self.p.own.groups.discard(name_hash("f", key))

    def _normal_args(self, channel: str) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "x-max-length": cfg.capacity_for(channel),
            "x-overflow": "reject-publish",
            "x-message-ttl": int(cfg.expiry * 1000),
            "x-expires": int(max(300.0, 4 * cfg.expiry) * 1000),
            # what expires there (no reader in time) is counted by a leader
            "x-dead-letter-exchange": dead_exchange(cfg.prefix),
            "x-dead-letter-routing-key": normal_dead_queue(cfg.prefix),
        }

    async def _declare_normal(self, h: int, channel: str) -> None:
        """Declare a normal channel's shared queue on a channel of its own: a host with
        other ``capacity``/``expiry`` settings (a rolling config change) makes this fail
        with PRECONDITION_FAILED, which must not take the link down."""
        name = normal_queue(self.cfg.prefix, h)
        tmp = await self.conn.channel(publisher_confirms=False)
        try:
            await tmp.queue_declare(name, arguments=self._normal_args(channel))
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            limited.warning(
                "declare-mismatch",
                "hybrid_layer: queue %s of normal channel %r exists with other arguments "
                "(hosts disagree on capacity/expiry?); using it as it is: %s",
                name,
                channel,
                exc,
            )
        finally:
            if not tmp.is_closed:
                with contextlib.suppress(Exception):
                    await tmp.close()
        self.declared[h] = time.monotonic()

    # ---------------------------------------------------------------- bindings
    async def _syncer(self) -> None:
        while True:
            await self._sync_wanted.wait()
            self._sync_wanted.clear()
            if self._flush_wanted:
                self._flush_wanted = False
                await self._purge()
            await self._sync()

    async def _sync(self) -> bool:
        """Make the broker's bindings and normal-channel consumers match this host's
        interest; False if a group set was mid-rebuild (nothing done: try again).

        New bindings are pipelined: ``queue.bind`` with no-wait, one after another,
        then one synchronous call on the same channel, which the broker answers only
        after every bind before it (a failed bind closes the channel instead)."""
        self.p.ns.link_set(L.LQ_SYNCS_STARTED, self.syncs + 1)
        interest = self.p.interest()
        if interest is None:  # a set was mid-rebuild: try again shortly
            self.p.ns.link_set(L.LQ_SYNCS_STARTED, self.syncs)
            self.loop.call_later(0.01, self._sync_wanted.set)
            return False
        groups, normals = interest
        ch, cfg = self.ch, self.cfg
        new = groups - self.bound
        for h in new:
            await ch.queue_bind(
                self.queue, cfg.groups_exchange, routing_key=group_key(cfg.prefix, h), nowait=True
            )
        if new:
            await ch.queue_declare(self.queue, passive=True)  # the fence
            self.bound |= new
        for h in self.bound - groups:
            await ch.queue_unbind(
                self.queue, cfg.groups_exchange, routing_key=group_key(cfg.prefix, h)
            )
            self.bound.discard(h)
        for h in normals - self.consuming.keys():
            name = self.p.normal_name(h)
            if name is None:
                continue  # its reader has not told us the name yet
            if time.monotonic() < self.paused.get(h, 0.0):
                continue  # its readers here are full: let other hosts' readers have it
            await self._declare_normal(h, name)
            ok = await self.nch.basic_consume(normal_queue(cfg.prefix, h), self._on_normal_message)
            self.consuming[h] = ok.consumer_tag
        for h in set(self.consuming) - normals:
            tag = self.consuming.pop(h)
            await self.nch.basic_cancel(tag)
        if self.paused:
            now = time.monotonic()
            for h, until in list(self.paused.items()):
                if until <= now:
                    del self.paused[h]
        self._bump_syncs()
        return True

    async def _purge(self) -> None:
        """flush(): empty what this host owns on the broker (and holds for its readers)."""
        n = self._take_all() + self._clear_held()
        if n:
            self.p.counters.drop(
                "flushed", n, "hybrid_layer: %d message(s) for or from other hosts flushed", n
            )
        with contextlib.suppress(Exception):
            await self.ch.queue_purge(self.queue)
        for h in set(self.consuming) | set(self.declared):
            with contextlib.suppress(Exception):
                await self.ch.queue_purge(normal_queue(self.cfg.prefix, h))

    # ---------------------------------------------------------------- inbound
    def _malformed(self, why: object) -> None:
        self.p.counters.drop(
            "malformed", 1, "hybrid_layer: malformed message from the broker dropped: %s", why
        )

    def _unauthenticated(self, why: object, n: int = 1) -> None:
        self.p.counters.drop(
            "unauthenticated",
            n,
            "hybrid_layer: %d message(s) from the broker refused (unauthenticated): %s",
            n,
            why,
        )

    def _refused(self, exc: wire.WireError) -> None:
        """Count and log a frame (or a whole delivery) refused by ``wire``."""
        if isinstance(exc, wire.Unauthenticated):
            self._unauthenticated(exc)
        elif isinstance(exc, wire.TooLarge):
            self._too_large(exc.size)
        else:
            self._malformed(exc)

    def _route_of(self, frame: wire.Frame) -> tuple[str, str]:
        """Where a frame of its kind and name is published to (exchange, routing key):
        with keys, a frame sealed for any other route is refused."""
        cfg = self.cfg
        if frame.kind == wire.DIRECT:
            return "", self.queue  # (only this host's queue: another host's is refused)
        if frame.kind == wire.GROUP:
            return cfg.groups_exchange, group_key(cfg.prefix, name_hash("g", frame.name))
        return "", normal_queue(cfg.prefix, name_hash("n", frame.name))

    def _open(self, msg: DeliveredMessage, ids: tuple[int, int] | None) -> wire.Opened | None:
        """Open a delivery (``wire.open_delivery``); ``None`` if refused as a whole
        (counted and logged here)."""
        d = msg.delivery
        try:
            return wire.open_delivery(
                msg.body,
                d.exchange,
                d.routing_key,
                ids,
                self.crypter,
                time.time(),
                self._route_of,
                self.max_frame,
            )
        except wire.WireError as exc:
            self._refused(exc)
            return None
        except Exception as exc:  # a bug, never out of the delivery callback
            self._malformed(f"{type(exc).__name__}: {exc}")
            return None

    def _expires_at(self, frame: wire.Frame) -> float | None:
        """Local deadline of a frame, or ``None`` if it has expired (counted)."""
        remaining = frame.expires_wall - time.time()
        if remaining <= 0:
            self.p.counters.drop(
                "expired",
                1,
                "hybrid_layer: message from the broker for %r arrived expired (%.1f s late: "
                "a slow link, a backlog, or clocks of the hosts apart)",
                frame.name,
                -remaining,
            )
            return None
        self.p.counters.broker_received += 1
        return time.monotonic() + min(remaining, self.cfg.expiry)

    def _own_echo(self, ids: tuple[int, int] | None, entry: int) -> bool:
        """A group frame with this host as its origin: published by one of this host's
        leaders (an echo: its local copies went out locally), else a spoof."""
        if ids is None:
            return False
        return ids[0] == self.nonce or self.dedup.is_own(entry)

    def _too_large(self, size: int) -> None:
        self.p.counters.drop(
            "too_large",
            1,
            "hybrid_layer: a %d-byte message from the broker dropped: over this host's "
            "max_message_bytes (%d); every host must use the same max_message_bytes",
            size,
            self.cfg.max_message_bytes,
        )

    # ---------------------------------------------------------------- held deliveries
    def _hold(
        self,
        q: deque[tuple[bytes | memoryview, float]],
        channel: str,
        payload: bytes | memoryview,
        expires_at: float,
    ) -> None:
        """Keep a direct message whose reader is full until it has room (or expires).

        While ``HOLD_MAX`` messages are held, deliveries stop being acknowledged, so the
        broker stops sending (prefetch): the host queue fills, its ``x-max-length``
        rejects, and senders on other hosts get ``ChannelFull``."""
        # a bound on memory even against a peer that batches beyond PUBLISH_BATCH_MAX
        # (conforming ones cannot get here: prefetch stops deliveries first)
        if (
            self.held_total >= HOLD_MAX + self._prefetch * PUBLISH_BATCH_MAX
            or self.held_bytes >= 2 * HOLD_BYTES
        ):
            self.p.counters.drop(
                "full",
                1,
                "hybrid_layer: message from the broker for %r dropped: too many held for "
                "busy readers",
                channel,
            )
            return
        if self.held_total == 0:
            self._held_epoch = self.p.ns.flush_epoch()
        q.append((payload, expires_at))
        self.held_total += 1
        self.held_bytes += len(payload)
        if self._retry_handle is None:
            self._retry_handle = self.loop.call_later(HOLD_RETRY, self._retry_held)

    def _retry_held(self) -> None:
        self._retry_handle = None
        p = self.p
        if self.held_total and p.ns.flush_epoch() != self._held_epoch:
            # flush() freed the readers' capacity: what was held before it goes too
            n = self._clear_held()
            p.counters.drop(
                "flushed", n, "hybrid_layer: %d held message(s) from other hosts flushed", n
            )
        now = time.monotonic()
        for channel in list(self.held):
            q = self.held[channel]
            while q:
                payload, expires_at = q[0]
                if expires_at < now:
                    p.counters.drop(
                        "expired",
                        1,
                        "hybrid_layer: message from the broker for %r expired while held "
                        "for its busy reader",
                        channel,
                    )
                else:
                    r = p.deliver_direct(channel, payload, expires_at)
                    if r in (FULL_CHANNEL, FULL_RING):
                        break
                q.popleft()
                self.held_total -= 1
                self.held_bytes -= len(payload)
            if not q:
                del self.held[channel]
        if self.held:
            self._retry_handle = self.loop.call_later(HOLD_RETRY, self._retry_held)
        if self._ack_held_back and self.held_total < HOLD_LOW and self.held_bytes < HOLD_BYTES // 2:
            self._ack_held_back = False
            if self.ch is not None:
                self._send_ack()

    def _clear_held(self) -> int:
        """Forget every held message; returns how many (the caller counts them)."""
        n, self.held_total, self.held_bytes = self.held_total, 0, 0
        self.held.clear()
        return n

    def _drop_held(self, why: str) -> None:
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        n = self._clear_held()
        if n:
            self.p.counters.drop("full", n, "hybrid_layer: %d held messages dropped: %s", n, why)

    def _ack_later(self, msg: DeliveredMessage) -> None:
        """One ``basic.ack(multiple)`` per burst of deliveries (held back while too many
        messages wait for busy readers)."""
        if msg.channel is not self.ch:  # a tag of a channel gone since means nothing now
            return
        self._ack_tag = max(self._ack_tag, msg.delivery.delivery_tag)
        if self.held_total >= HOLD_MAX or self.held_bytes >= HOLD_BYTES:
            self._ack_held_back = True
            return
        if not self._ack_scheduled:
            self._ack_scheduled = True
            # not call_soon: the ack (a task, a frame) would run before this thread
            # sleeps, and the reader woken by the delivery waits for the GIL until then
            self.loop.call_later(ACK_DELAY, self._send_ack)

    def _send_ack(self) -> None:
        """Acknowledge up to the newest delivered tag. One ack at a time: two ack tasks
        waiting for room in aiormq's (bounded) write queue can reach the wire out of
        order, and ``ack(n, multiple)`` after ``ack(m > n, multiple)`` is an unknown
        tag to the broker, which closes the channel. The next one goes when this one
        is written."""
        self._ack_scheduled = False
        if self.held_total >= HOLD_MAX or self.held_bytes >= HOLD_BYTES:
            self._ack_held_back = True
            return
        if self._ack_task is not None:
            return  # _ack_sent sends what has come in since
        ch = self.ch
        tag, self._ack_tag = self._ack_tag, 0
        if tag and ch is not None and not ch.is_closed:
            task = self._ack_task = asyncio.ensure_future(ch.basic_ack(tag, multiple=True))
            task.add_done_callback(self._ack_sent)

    def _ack_sent(self, task: asyncio.Future[Any]) -> None:
        _ignore_result(task)
        if task is self._ack_task:
            self._ack_task = None
        if self._ack_tag and not self._ack_scheduled:
            self._ack_scheduled = True
            self.loop.call_soon(self._send_ack)

    def _on_host_message(self, msg: DeliveredMessage) -> None:
        """A delivery from the host queue: one frame or a batch. Acknowledged (in
        batches, ``_ack_later``) about 1 ms after it was handled; a frame already
        delivered (a dead leader's unacknowledged deliveries, a sender's publish again
        after a lost connection, or a sealed frame replayed) is skipped by its id
        (``dedup``; with keys, the sealed id)."""
        self._ack_later(msg)
        ids = (
            None if self.crypter is not None else parse_message_id(msg.header.properties.message_id)
        )
        opened = self._open(msg, ids)
        if opened is None:
            return
        p = self.p
        c = p.counters
        ids = opened.ids
        dedup = self.dedup
        entry = seq = 0
        if ids is not None:
            entry, seq = dedup.entry(ids[0]), ids[1]
        for i, frame in enumerate(opened.items):
            if ids is not None:
                m = mark(seq, i)
                if dedup.seen(entry, m):
                    c.broker_duplicates += 1
                    continue
                dedup.record(entry, m)
            if not isinstance(frame, wire.Frame):
                self._refused(frame)
                continue
            if frame.kind == wire.NORMAL:
                self._malformed("a normal-channel frame on the host queue")
                continue
            if (
                frame.kind == wire.GROUP
                and frame.origin == self.cfg.host_id
                and not self._own_echo(ids, entry)
            ):
                self._unauthenticated(
                    f"a copy for group {frame.name!r} claims this host "
                    f"({frame.origin!r}) as its origin, but none of this host's "
                    "leaders published it (a spoofed origin, or another host "
                    "configured with this host_id)"
                )
                continue
            expires_at = self._expires_at(frame)
            if expires_at is None:
                continue
            if frame.kind == wire.DIRECT:
                held = self.held.get(frame.name)
                if held is not None:  # behind others held for it (FIFO)
                    self._hold(held, frame.name, frame.payload, expires_at)
                    continue
                r = p.deliver_direct(frame.name, frame.payload, expires_at)
                if r in (FULL_CHANNEL, FULL_RING):  # a busy reader: wait for its room
                    q = self.held.setdefault(frame.name, deque())
                    self._hold(q, frame.name, frame.payload, expires_at)
            elif frame.origin != self.cfg.host_id:  # (our own copy went out locally)
                p.deliver_group(frame.name, frame.payload, expires_at)

    async def _declare_normal_dead(self, ndq: str, dx: str) -> None:
        """The prefix's shared dead-letter queue of normal channels (on a channel of its
        own: a mismatch must not take the link down; then it is used as it is)."""
        tmp = await self.conn.channel(publisher_confirms=False)
        try:
            await tmp.queue_declare(ndq, arguments=NORMAL_DEAD_ARGS)
            await tmp.queue_bind(ndq, dx, routing_key=ndq)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            limited.warning(
                "normal-dead-mismatch",
                "hybrid_layer: queue %s exists with other arguments; using it as it is: %s",
                ndq,
                exc,
            )
        finally:
            with contextlib.suppress(Exception):
                await tmp.close()

    def _on_normal_dead(self, msg: DeliveredMessage) -> None:
        """What the broker dropped from a normal channel's queue (its ``x-message-ttl``
        = ``expiry`` passed with no reader, or a policy): counted and logged here, by
        whichever leader took it from the shared dead queue."""
        self._on_dead(msg, "a normal channel's queue")

    def _on_dead(self, msg: DeliveredMessage, where: str = "") -> None:
        """What the broker dropped from the host's queue (dead-lettered): counted, and
        the reason logged. ``expired`` before the frame's own deadline means a policy's
        ``message-ttl`` is lower than ``expiry``; ``maxlen`` a policy's ``max-length``
        or ``max-length-bytes`` with overflow ``drop-head``."""
        queue = where or f"queue {self.queue}"
        headers = msg.header.properties.headers or {}
        reason = headers.get("x-first-death-reason") or "unknown"
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        c = self.p.counters
        now = time.time()
        body = msg.body
        if self.crypter is not None:  # (its route is the dead-letter one now)
            with contextlib.suppress(wire.WireError):
                body = wire.unseal(self.crypter, body, now).body
        try:
            parts = wire.split(body)
        except wire.WireError:
            parts = None
        frames = parts if parts is not None else (body,)
        early = 0
        for data in frames:
            try:
                frame: wire.Frame | None = wire.decode(data)
            except wire.WireError:
                frame = None
            if reason == "expired" and frame is not None and frame.expires_wall > now + 1.0:
                early += 1
        n = len(frames)
        key = "expired_early" if early else str(reason)
        self.dead_lettered[key] = self.dead_lettered.get(key, 0) + n
        if early:
            why = (
                f"expired on the broker BEFORE their expiry: a policy's message-ttl on "
                f"{queue} is lower than CONFIG['expiry'] ({self.cfg.expiry:g}s): "
                "rabbitmqctl list_policies"
            )
        elif reason == "expired":
            why = (
                "expired waiting on the broker (no reader took it in time)"
                if where
                else "expired waiting on the broker (no leader read this host's queue in time)"
            )
        else:
            why = (
                f"dropped by the broker ({reason}): a policy's max-length, "
                f"max-length-bytes (overflow drop-head) or delivery-limit on {queue}: "
                "rabbitmqctl list_policies"
            )
        c.drop(
            "expired" if reason == "expired" else "remote_full",
            n,
            "hybrid_layer: %d message(s) to %s %s",
            n,
            where or "this host",
            why,
        )

    async def _on_normal_message(self, msg: DeliveredMessage) -> None:
        """One message from a normal channel's shared queue.

        Acknowledged *before* it is written into a reader's inbox, so that a lost link
        can never make the broker deliver it twice. When this host's readers have no
        room it is rejected back to the queue (where ``capacity`` applies and other
        hosts' readers can take it) and the consumer pauses for a moment.

        A broker that fails over a mirrored queue may deliver again what we had
        acknowledged: a redelivered message whose id this host has delivered is skipped.
        """
        tag = msg.delivery.delivery_tag
        ch = msg.channel
        mid = msg.header.properties.message_id
        if self.crypter is None and mid and msg.delivery.redelivered and mid in self.seen:
            self.p.counters.broker_duplicates += 1
            await ch.basic_ack(tag, wait=False)
            return
        opened = self._open(msg, None)
        if opened is None:
            await ch.basic_ack(tag, wait=False)
            return
        if opened.ids is not None:  # sealed: its authenticated id (a replay: skipped)
            mid = message_id(*opened.ids)
            if mid in self.seen:
                self.p.counters.broker_duplicates += 1
                await ch.basic_ack(tag, wait=False)
                return
        items = opened.items
        got = None
        if len(items) != 1:
            self._malformed(f"a batch of {len(items)} frames on a normal channel's queue")
        elif not isinstance(items[0], wire.Frame):
            self._refused(items[0])
        elif items[0].kind != wire.NORMAL:
            self._malformed("a direct or group frame on a normal channel's queue")
        else:
            expires_at = self._expires_at(items[0])
            if expires_at is not None:
                got = items[0], expires_at
        if got is None:
            await ch.basic_ack(tag, wait=False)
            return
        frame, expires_at = got
        room = self.p.normal_room(frame.name)
        if room != OK:
            await ch.basic_reject(tag, requeue=True, wait=False)
            h = name_hash("n", frame.name)
            self.paused[h] = time.monotonic() + (NORMAL_PAUSE if room != NO_CHANNEL else 1.0)
            tag_c = self.consuming.pop(h, None)
            if tag_c is not None:
                with contextlib.suppress(Exception):
                    await self.nch.basic_cancel(tag_c)
            self.loop.call_later(NORMAL_PAUSE, self._sync_wanted.set)
            return
        await ch.basic_ack(tag, wait=False)
        if mid:
            self._remember(mid)
        r = self.p.deliver_normal(frame.name, frame.payload, expires_at)
        if r != OK:  # the room went in the meantime: dropped, counted
            self.p._count_forward_failure(r, frame.name)

    def _remember(self, mid: str) -> None:
        seen, order = self.seen, self.seen_order
        seen.add(mid)
        order.append(mid)
        if len(order) > SEEN_MAX:
            seen.discard(order.popleft())

    # ================================================================ close
    async def aclose(self, linger: float = 2.0) -> None:
        """Publish what is queued (up to ``linger`` s), then close the connection."""
        deadline = time.monotonic() + linger
        while (self.out or self.in_flight or self.retry_count) and self.state in (
            L.LINK_UP,
            L.LINK_CONNECTING,
        ):
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.005)
        while self.held and time.monotonic() < deadline:  # readers that are still busy
            await asyncio.sleep(0.005)
        self._drop_held("the link closed before their readers had room")
        self.closing = True
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task
        await self._drop_connection()
        n = self._take_all()
        if n:
            self.p.counters.drop(
                "link_down",
                n,
                "hybrid_layer: %d message(s) for other hosts dropped: the link closed "
                "before they were published",
                n,
            )
        self._set_state(L.LINK_NONE)

    def info(self) -> dict[str, Any]:
        return {
            "state": {L.LINK_UP: "up", L.LINK_DOWN: "down", L.LINK_CONNECTING: "connecting"}.get(
                self.state, "none"
            ),
            "url": _safe(self.url),
            "queue": self.queue,
            "bindings": len(self.bound),
            "normal_consumers": len(self.consuming),
            "outbound": len(self.out),
            "in_flight": self.in_flight,
            "held": self.held_total,
            "held_bytes": self.held_bytes,
            "outbound_bytes": self.out_bytes,
            "retrying": self.retry_count,
            "syncs": self.syncs,
            "last_sync": self.last_sync_wall,
            "reason": self.reason,
            "connect_failures": self.connect_failures,
            "dead_lettered": dict(self.dead_lettered),
        }


_CHANNEL_PUBLISH_STATE = (
    "delivery_tag",
    "confirmations",
    "message_id_delivery_tag",
    "write_queue",
    "number",
    "create_future",
    "_split_body",
)


def _can_publish_directly(ch: Any) -> bool:
    return bool(getattr(ch, "publisher_confirms", False)) and all(
        hasattr(ch, a) for a in _CHANNEL_PUBLISH_STATE
    )


def _publish_frame(
    ch: Any, body: bytes | wire.Parts, exchange: str, rk: str, props: Any, mandatory: bool
) -> tuple[asyncio.Future[Any], Any]:
    """What ``ch.basic_publish`` does before it waits, without its task, lock, timeout
    and drain: take the next delivery tag, register the confirmation future (and the
    message id that a ``basic.return`` is matched by), and marshal the frames into one
    write (``wire.publish_frames`` when the body fits one frame; else
    ``wire.publish_frames_parts``, which copies the body once where pamqp and aiormq's
    ``_split_body`` copy it several times).
    Returns (the confirmation, the frame for ``ch.write_queue``).

    The link is the only publisher on ``ch`` and puts each frame on the queue before it
    takes the next tag, so tags follow the order on the wire, which is all confirms
    need. Publishing does not wait for an RPC on the channel (``queue_bind``) to be
    answered: basic.publish is an asynchronous method, which AMQP allows meanwhile.
    Used only where the channel has the state it relies on (aiormq 6.8 to 7).
    """
    tag = ch.delivery_tag + 1
    mid = props.message_id  # unique per publish: a basic.return is matched by it
    # the frame first: if it cannot be built, no tag is taken (a gap would shift every
    # later confirmation onto the wrong message)
    max_content = getattr(ch, "max_content_size", 0)
    if type(body) is bytes and 0 < len(body) < max_content:  # one body frame
        data = wire.publish_frames(
            ch.number, exchange, rk, mandatory, body, props.delivery_mode, props.expiration, mid
        )
        frame = ChannelFrame(payload=data, should_close=False)
    elif max_content > 0:  # (a large one: its body frames cut from its parts, one copy)
        data = wire.publish_frames_parts(
            ch.number,
            exchange,
            rk,
            mandatory,
            (body.head, body.payload) if isinstance(body, wire.Parts) else (body,),
            props.delivery_mode,
            props.expiration,
            mid,
            max_content,
        )
        frame = ChannelFrame(payload=data, should_close=False)
    else:
        if isinstance(body, wire.Parts):
            body = body.join()
        frame = ChannelFrame.marshall(
            channel_number=ch.number,
            frames=[
                spec.Basic.Publish(exchange=exchange, routing_key=rk, mandatory=mandatory),
                ContentHeader(properties=props, body_size=len(body)),
                *ch._split_body(body),
            ],
        )
    fut = ch.create_future()
    ch.delivery_tag = tag
    ch.confirmations[tag] = fut
    ids = ch.message_id_delivery_tag
    ids[mid] = tag
    fut.add_done_callback(lambda _: ids.pop(mid, None))
    return fut, frame


async def _nothing() -> None:
    return None


def _run_inline(ch: Any, tag: str, callback: Any) -> None:
    """Have aiormq call ``callback`` (a plain function) as it reads a delivery, not in
    a task of its own per message (one event-loop pass less on every delivery). aiormq
    wraps a consumer in a coroutine function and makes a task of what it returns; this
    returns a finished one. Only if that dict is there: else aiormq's own way stays."""
    consumers = getattr(ch, "consumers", None)
    if isinstance(consumers, dict) and tag in consumers:

        def inline(msg: DeliveredMessage) -> Any:
            try:
                callback(msg)
            except Exception:  # aiormq's reader must go on (it logged a task's failure)
                log.exception("hybrid_layer: cannot handle a delivery from RabbitMQ")
            return _nothing()

        consumers[tag] = inline


def _join_content(ch: Any) -> None:
    """Have aiormq assemble a delivered body from its body frames with one join (none
    for a body in one frame) instead of writing them into a ``BytesIO`` one by one and
    copying its value out: a large message's body is copied once less. Only where the
    channel reads content as this was written against (aiormq 6.8 to 7): a
    ``_read_content(frame, header)`` that takes ``ContentBody`` frames from
    ``_get_frame()``; else aiormq's own way stays."""
    get_frame = getattr(ch, "_get_frame", None)
    if get_frame is None or not callable(getattr(ch, "_read_content", None)):
        return

    async def read_content(frame: Any, header: ContentHeader) -> DeliveredMessage:
        size = header.body_size or 0
        parts: list[bytes] = []
        got = 0
        while got < size:
            content = await get_frame()
            if not isinstance(content, ContentBody):
                raise ValueError(f"Unexpected frame {content!r}", content)
            parts.append(content.value)
            got += len(content.value)
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        return DeliveredMessage(delivery=frame, header=header, body=body, channel=ch)

    ch._read_content = read_content


def _explain(exc: BaseException, cfg: Any) -> tuple[int, str]:
    """(L.REASON_*, a sentence) for why connecting or serving failed: what an operator
    needs to act on, not the AMQP client's internals."""

    tls = _tls_error(exc)
    if tls is not None:
        why = tls
        return L.REASON_TLS, (
            f"TLS handshake failed ({why}): check CONFIG['ssl_context'] (its CA file, "
            "client certificate) and that the URL's host name matches the certificate"
        )
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return L.REASON_TIMEOUT, (
            f"no answer within connect_timeout ({cfg.connect_timeout:g}s) while connecting "
            "or declaring: the address accepts TCP but does not speak AMQP there (a TLS "
            "port without amqps://? a firewall?), or the broker is overloaded"
        )
    text = str(exc)
    if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in text:
        return L.REASON_REFUSED, (
            "RabbitMQ closed the connection while opening it: the vhost in the URL does "
            "not exist or the user has no permission on it (rabbitmqctl list_permissions)"
        )
    if isinstance(
        exc,
        aiormq.exceptions.ProbableAuthenticationError | aiormq.exceptions.AuthenticationError,
    ):
        return L.REASON_REFUSED, f"RabbitMQ refused the login ({text}): check user and password"
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return L.REASON_REFUSED, f"RabbitMQ refused access ({text}): check the user's permissions"
    if isinstance(exc, aiormq.exceptions.AMQPChannelError):
        return L.REASON_DECLARE, f"{type(exc).__name__}: {text}"
    if isinstance(exc, OSError):  # (aiormq's connection errors are OSErrors too)
        return L.REASON_UNREACHABLE, f"{exc.strerror or text or type(exc).__name__}"
    return L.REASON_LOST, f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _tls_error(exc: BaseException) -> str | None:
    """The certificate or handshake error in ``exc`` or what caused it (aiormq wraps
    an ``ssl.SSLError`` in an AMQPConnectionError carrying only its text), else None."""
    import ssl

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ssl.SSLError):
            verify = getattr(e, "verify_message", None)
            reason = getattr(e, "reason", None)
            if verify:
                return f"certificate verify failed: {verify}"
            return str(reason or e)
        for arg in e.args:
            text = str(arg)
            if "[SSL" in text or "CERTIFICATE_VERIFY_FAILED" in text:
                return text.split("] ", 1)[-1].split(" (_ssl.c", 1)[0]
        e = e.__cause__ or e.__context__
    return None


def _ignore_result(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # a lost connection is handled by the link's loop


def _safe(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}@{host}"
