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
from pamqp.header import ContentHeader

from .. import names
from .._log import limited
from ..config import PUBLISH_BATCH_MAX
from ..shm import layout as L
from ..shm.groupset import name_hash
from ..shm.registry import FULL_CHANNEL, FULL_RING, LINK_DOWN, NO_CHANNEL, OK
from . import wire

if TYPE_CHECKING:
    from ..participant import Participant

log = logging.getLogger("hybrid_layer")

MAX_IN_FLIGHT = 4096  # publishes awaiting a confirm
MAX_OUTBOUND = 20_000  # handed over, not yet published: beyond it, dropped and counted
HIGH_WATER = 2_000  # over it, senders are told to wait (LQ_BUSY): send() backs off,
LOW_WATER = 500  # then raises ChannelFull after 0.5 s; under it, they go on
FULL_HOLD = 0.2  # seconds a destination stays "full" after a nack
BACKOFF_MIN = 0.1
BACKOFF_MAX = 10.0
PREFETCH = 256  # unacknowledged deliveries from normal-channel queues
HOST_PREFETCH = 64  # ... from the host queue (AMQP messages, each a batch of up to
# CONFIG publish_batch messages)
DECLARE_AGAIN = 60.0  # re-declare a normal queue we publish to (keeps x-expires away)
MAX_BATCH_BYTES = 256 * 1024  # a batch (CONFIG publish_batch) stops at about this size
HOLD_MAX = 10_000  # direct messages held for busy readers before acks are held back
HOLD_LOW = 5_000  # ... and acknowledged again under this
HOLD_RETRY = 0.002  # seconds between attempts to place held messages
ACK_DELAY = 0.001  # deliveries are acknowledged (multiple) this long after the first
NORMAL_PAUSE = 0.05  # stop consuming a normal queue this long when its readers are full

KIND_TO_WIRE = {
    L.KIND_OUT_DIRECT: wire.DIRECT,
    L.KIND_OUT_GROUP: wire.GROUP,
    L.KIND_OUT_NORMAL: wire.NORMAL,
}


def host_queue(prefix: str, host_id: str) -> str:
    return f"{prefix}.{host_id}"


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
        self.out: deque[tuple[int, str, bytes, float, str | None]] = deque()
        self._kicked = False
        self._publishing = False  # the publisher task is at work (not waiting for _wake)
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._sync_wanted = asyncio.Event()
        self._flush_wanted = False
        self.in_flight = 0
        self.state = L.LINK_NONE
        self.ever_up = False
        self.url_index = 0
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
        self.syncs = 0
        self.busy = False
        self._ack_tag = 0
        self._ack_scheduled = False
        self._ack_held_back = False
        self._ack_task: asyncio.Future[Any] | None = None  # the one basic.ack under way
        # direct messages from other hosts waiting for room in a busy reader's inbox
        self.held: dict[str, deque[tuple[bytes, float]]] = {}
        self.held_total = 0
        self._held_epoch = 0  # the host's flush epoch when the oldest held message came
        self._retry_handle: asyncio.TimerHandle | None = None
        self._prefetch = min(HOST_PREFETCH, cfg.remote_capacity)
        self.closing = False
        self.thread_id = threading.get_ident()
        self._set_state(L.LINK_CONNECTING)
        self.task = loop.create_task(self._run())

    # ================================================================ any thread
    def submit(
        self, kind: int, name: str, payload: bytes, expires_at: float, key: str | None
    ) -> int:
        """Queue one outbound message: OK, or LINK_DOWN / FULL_RING (outbound queue
        full), which the caller counts as a drop or backs off from."""
        if self.closing or self.state == L.LINK_DOWN:
            return LINK_DOWN
        out = self.out
        if len(out) >= MAX_OUTBOUND:
            return FULL_RING
        out.append((kind, name, payload, expires_at, key))
        if len(out) >= HIGH_WATER and not self.busy:
            self.busy = True
            self.p.ns.link_set(L.LQ_BUSY, 1)
        self.kick()
        return OK

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
    def _set_state(self, state: int) -> None:
        self.state = state
        ns = self.p.ns
        ns.link_set(L.LQ_STATE, state)
        ns.link_set(L.LQ_CHANGES, ns.link_get(L.LQ_CHANGES) + 1)

    def _bump_syncs(self) -> None:
        self.syncs += 1
        self.p.ns.link_set(L.LQ_SYNCS, self.syncs)

    async def _run(self) -> None:
        failures = 0
        while not self.closing:
            urls = self.cfg.broker_urls
            url = urls[self.url_index % len(urls)]
            try:
                await asyncio.wait_for(self._connect(url), self.cfg.connect_timeout)
            except (Exception, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and self._cancelled():
                    raise
                await self._drop_connection()
                failures += 1
                self.url_index += 1
                if self.state != L.LINK_DOWN:
                    self._set_state(L.LINK_DOWN)
                    self._drop_outbound("broker unreachable")
                delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(failures, 10))
                delay *= random.uniform(0.5, 1.5)
                limited.warning(
                    "link-connect",
                    "hybrid_layer: cannot reach RabbitMQ at %s (%s: %s); retrying in %.1fs",
                    _safe(url),
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            if self.ever_up:
                self.p.counters.broker_reconnects += 1
                log.warning("hybrid_layer: RabbitMQ link restored (%s)", _safe(url))
            else:
                log.info("hybrid_layer: leader connected to RabbitMQ at %s", _safe(url))
            failures = 0
            self.ever_up = True
            self._set_state(L.LINK_UP)
            try:
                await self._serve()
            except (Exception, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and self._cancelled():
                    raise
                limited.warning(
                    "link-lost",
                    "hybrid_layer: RabbitMQ link lost (%s: %s); reconnecting",
                    type(exc).__name__,
                    exc,
                )
            await self._drop_connection()
            if not self.closing:
                self._set_state(L.LINK_DOWN)
                self._drop_outbound("link down")
                await asyncio.sleep(BACKOFF_MIN * random.uniform(0.5, 1.5))

    def _cancelled(self) -> bool:
        """Whether a CancelledError is a real cancellation of the link (``aclose``),
        not aiormq failing the calls pending on a connection it found stuck (no frame
        within its heartbeat grace): it fails them, and ``closing``, with a
        CancelledError, which must mean "reconnect", not "stop for good"."""
        task = asyncio.current_task()
        return self.closing or (task is not None and task.cancelling() > 0)

    async def _connect(self, url: str) -> None:
        cfg = self.cfg
        self.url = url
        kwargs: dict[str, Any] = {
            "client_properties": {
                "connection_name": f"hybrid_layer {cfg.namespace} pid {os.getpid()}",
            }
        }
        if cfg.ssl_context is not None:
            kwargs["context"] = cfg.ssl_context
        conn = self.conn = await aiormq.connect(_with_heartbeat(url, cfg.heartbeat), **kwargs)
        ch = self.ch = await conn.channel(publisher_confirms=True)
        self._fast_publish = _can_publish_directly(ch)
        await ch.exchange_declare(cfg.groups_exchange, exchange_type="direct")
        args: dict[str, Any] = {
            "x-max-length": cfg.remote_capacity,
            "x-overflow": "reject-publish",
            "x-message-ttl": int(cfg.expiry * 1000),
        }
        for attempt in range(20):
            try:
                await ch.queue_declare(self.queue, exclusive=True, auto_delete=True, arguments=args)
                break
            except aiormq.exceptions.ChannelLockedResource:
                # the previous leader's connection is still closing (or, if this never
                # clears, another host runs with the same host_id)
                if attempt == 19:
                    raise
                log.warning(
                    "hybrid_layer: queue %s is still held by another connection "
                    "(previous leader closing, or another host with host_id %r?)",
                    self.queue,
                    cfg.host_id,
                )
                ch = self.ch = await conn.channel(publisher_confirms=True)
                self._fast_publish = _can_publish_directly(ch)
                await asyncio.sleep(0.1)
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
        n = 0
        with contextlib.suppress(IndexError):
            while True:
                self.out.popleft()
                n += 1
        if self.busy:
            self.busy = False
            self.p.ns.link_set(L.LQ_BUSY, 0)
        return n

    def _drop_outbound(self, why: str) -> None:
        n = self._take_all()
        if n:
            self.p.counters.dropped_link_down += n
            limited.warning("link-drop", "hybrid_layer: %d outbound messages dropped: %s", n, why)

    async def _serve(self) -> None:
        """Publish, sync bindings and flush until the connection closes."""
        conn = self.conn
        assert conn is not None
        self._sync_wanted.set()  # a new connection has no bindings yet
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
    ) -> tuple[list[tuple[int, str, bytes, float, str | None]], tuple[str, str, bool] | None]:
        """Take the next AMQP message's worth from ``out``: the first message and, for a
        host or group, those after it for the same destination (``publish_batch``)."""
        out = self.out
        batch = [out.popleft()]
        kind, name = batch[0][0], batch[0][1]
        dest = self._route(kind, name)
        if kind != L.KIND_OUT_NORMAL:
            size = len(batch[0][2])
            limit = self.cfg.publish_batch
            while out and len(batch) < limit and size < MAX_BATCH_BYTES:
                nxt = out[0]
                if nxt[0] != kind or (nxt[1] != name and self._route(kind, nxt[1]) != dest):
                    break
                batch.append(out.popleft())
                size += len(nxt[2])
        if self.busy and len(out) <= LOW_WATER:
            self.busy = False
            self.p.ns.link_set(L.LQ_BUSY, 0)
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
        batch: list[tuple[int, str, bytes, float, str | None]],
        dest: tuple[str, str, bool] | None,
    ) -> Any:
        """One AMQP message to ``dest`` (``_route`` of the first): one frame, or a batch
        of frames for that one destination. Returns what the caller puts on the
        channel's write queue (``_fast_publish``), else None (published in a task, or
        nothing to publish)."""
        cfg = self.cfg
        c = self.p.counters
        kind, name, _, _, key = batch[0]
        now_mono, now_wall = time.monotonic(), time.time()
        frames = []
        longest = 0.0
        wkind = KIND_TO_WIRE[kind]
        for _, fname, payload, expires_at, _ in batch:
            remaining = expires_at - now_mono
            if remaining <= 0:
                c.dropped_expired += 1
                continue
            longest = max(longest, remaining)
            frames.append(
                wire.encode(wkind, cfg.host_id, fname, now_wall + remaining, payload, self.crypter)
            )
        if not frames:
            return None
        if dest is None:
            c.dropped_no_channel += len(frames)
            return None
        exchange, rk, mandatory = dest
        body = frames[0] if len(frames) == 1 else wire.encode_batch(frames)
        # the broker's own expiry: the latest of the batch (each frame carries its own)
        props = spec.Basic.Properties(delivery_mode=1, expiration=str(max(1, int(longest * 1000))))
        n = len(frames)
        ch = self.ch
        fut: asyncio.Future[Any]
        frame = None
        try:
            if self._fast_publish:
                fut, frame = _publish_frame(ch, body, exchange, rk, props, mandatory)
            else:
                fut = asyncio.ensure_future(
                    ch.basic_publish(
                        body,
                        exchange=exchange,
                        routing_key=rk,
                        properties=props,
                        mandatory=mandatory,
                    )
                )
        except Exception as exc:  # not published: counted, never lost silently
            c.dropped_link_down += n
            limited.warning(
                "publish-failed",
                "hybrid_layer: %d message(s) to %r dropped: cannot publish (%s: %s)",
                n,
                name,
                type(exc).__name__,
                exc,
            )
            return None
        self.in_flight += 1
        fut.add_done_callback(lambda f: self._confirmed(f, key, name, n))
        c.broker_published += n
        if n > 1:
            c.broker_batches += 1
        return frame

    def _confirmed(self, fut: asyncio.Future[Any], key: str | None, name: str, n: int) -> None:
        self.in_flight -= 1
        if self.in_flight < MAX_IN_FLIGHT // 2:
            self._room.set()
        c = self.p.counters
        if fut.cancelled():
            c.dropped_link_down += n
            return
        exc = fut.exception()
        if exc is None:
            c.broker_confirmed += n
        elif isinstance(exc, aiormq.exceptions.PublishError):  # basic.return: unroutable
            c.broker_returned += n
            c.dropped_no_channel += n
            limited.warning(
                "remote-none",
                "hybrid_layer: %d message(s) to %r dropped: no such host or channel on the broker",
                n,
                name,
            )
        elif isinstance(exc, aiormq.exceptions.DeliveryError):  # basic.nack: queue full
            c.dropped_remote_full += n
            limited.warning(
                "remote-full",
                "hybrid_layer: %d message(s) to %r dropped: its queue on the broker is full",
                n,
                name,
            )
            if key is not None:
                self._flag_full(key)
        else:
            c.dropped_link_down += n

    def _flag_full(self, key: str) -> None:
        if key not in self.full:
            with self.p.lock:
                self.p.own.groups.add(name_hash("f", key))
        self.full[key] = time.monotonic()

    def expire_full_flags(self) -> None:
        if not self.full:
            return
        now = time.monotonic()
        for key, since in list(self.full.items()):
            if now - since >= FULL_HOLD:
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

    async def _sync(self) -> None:
        self.p.ns.link_set(L.LQ_SYNCS_STARTED, self.syncs + 1)
        interest = self.p.interest()
        if interest is None:  # a set was mid-rebuild: try again shortly
            self.p.ns.link_set(L.LQ_SYNCS_STARTED, self.syncs)
            self.loop.call_later(0.01, self._sync_wanted.set)
            return
        groups, normals = interest
        ch, cfg = self.ch, self.cfg
        for h in groups - self.bound:
            await ch.queue_bind(
                self.queue, cfg.groups_exchange, routing_key=group_key(cfg.prefix, h)
            )
            self.bound.add(h)
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

    async def _purge(self) -> None:
        """flush(): empty what this host owns on the broker (and holds for its readers)."""
        self.p.counters.dropped_flushed += self._take_all() + self._clear_held()
        with contextlib.suppress(Exception):
            await self.ch.queue_purge(self.queue)
        for h in set(self.consuming) | set(self.declared):
            with contextlib.suppress(Exception):
                await self.ch.queue_purge(normal_queue(self.cfg.prefix, h))

    # ---------------------------------------------------------------- inbound
    def _malformed(self, why: object) -> None:
        self.p.counters.dropped_malformed += 1
        limited.warning(
            "malformed", "hybrid_layer: malformed message from the broker dropped: %s", why
        )

    def _frame(self, data: bytes | memoryview) -> tuple[wire.Frame, float] | None:
        c = self.p.counters
        try:
            frame = wire.decode(data, self.crypter)
        except wire.WireError as exc:  # (an undecodable payload is dropped by receive())
            self._malformed(exc)
            return None
        remaining = frame.expires_wall - time.time()
        if remaining <= 0:
            c.dropped_expired += 1
            return None
        c.broker_received += 1
        return frame, time.monotonic() + min(remaining, self.cfg.expiry)

    # ---------------------------------------------------------------- held deliveries
    def _hold(
        self, q: deque[tuple[bytes, float]], channel: str, payload: bytes, expires_at: float
    ) -> None:
        """Keep a direct message whose reader is full until it has room (or expires).

        While ``HOLD_MAX`` messages are held, deliveries stop being acknowledged, so the
        broker stops sending (prefetch): the host queue fills, its ``x-max-length``
        rejects, and senders on other hosts get ``ChannelFull``."""
        # a bound on memory even against a peer that batches beyond PUBLISH_BATCH_MAX
        # (conforming ones cannot get here: prefetch stops deliveries first)
        if self.held_total >= HOLD_MAX + self._prefetch * PUBLISH_BATCH_MAX:
            self.p.counters.dropped_full += 1
            limited.warning("held-full", "hybrid_layer: copy for %r dropped: full", channel)
            return
        if self.held_total == 0:
            self._held_epoch = self.p.ns.flush_epoch()
        q.append((payload, expires_at))
        self.held_total += 1
        if self._retry_handle is None:
            self._retry_handle = self.loop.call_later(HOLD_RETRY, self._retry_held)

    def _retry_held(self) -> None:
        self._retry_handle = None
        p = self.p
        if self.held_total and p.ns.flush_epoch() != self._held_epoch:
            # flush() freed the readers' capacity: what was held before it goes too
            p.counters.dropped_flushed += self._clear_held()
        now = time.monotonic()
        for channel in list(self.held):
            q = self.held[channel]
            while q:
                payload, expires_at = q[0]
                if expires_at < now:
                    p.counters.dropped_expired += 1
                else:
                    r = p.deliver_direct(channel, payload, expires_at)
                    if r in (FULL_CHANNEL, FULL_RING):
                        break
                q.popleft()
                self.held_total -= 1
            if not q:
                del self.held[channel]
        if self.held:
            self._retry_handle = self.loop.call_later(HOLD_RETRY, self._retry_held)
        if self._ack_held_back and self.held_total < HOLD_LOW:
            self._ack_held_back = False
            if self.ch is not None:
                self._send_ack()

    def _clear_held(self) -> int:
        """Forget every held message; returns how many (the caller counts them)."""
        n, self.held_total = self.held_total, 0
        self.held.clear()
        return n

    def _drop_held(self, why: str) -> None:
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        n = self._clear_held()
        if n:
            self.p.counters.dropped_full += n
            limited.warning("held-drop", "hybrid_layer: %d held messages dropped: %s", n, why)

    def _ack_later(self, msg: DeliveredMessage) -> None:
        """One ``basic.ack(multiple)`` per burst of deliveries (held back while too many
        messages wait for busy readers)."""
        if msg.channel is not self.ch:  # a tag of a channel gone since means nothing now
            return
        self._ack_tag = max(self._ack_tag, msg.delivery.delivery_tag)
        if self.held_total >= HOLD_MAX:
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
        if self.held_total >= HOLD_MAX:
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
        self._ack_later(msg)
        try:
            parts = wire.split(msg.body)
        except wire.WireError as exc:
            self._malformed(exc)
            return
        p = self.p
        for data in parts if parts is not None else (msg.body,):
            got = self._frame(data)
            if got is None:
                continue
            frame, expires_at = got
            if frame.kind == wire.DIRECT:
                held = self.held.get(frame.name)
                if held is not None:  # behind others held for it (FIFO)
                    self._hold(held, frame.name, frame.payload, expires_at)
                    continue
                r = p.deliver_direct(frame.name, frame.payload, expires_at)
                if r in (FULL_CHANNEL, FULL_RING):  # a busy reader: wait for its room
                    q = self.held.setdefault(frame.name, deque())
                    self._hold(q, frame.name, frame.payload, expires_at)
            elif frame.kind == wire.GROUP:
                if frame.origin != self.cfg.host_id:  # our own copy went out locally
                    p.deliver_group(frame.name, frame.payload, expires_at)
            else:
                self._malformed("a normal-channel frame on the host queue")

    async def _on_normal_message(self, msg: DeliveredMessage) -> None:
        """One message from a normal channel's shared queue.

        Acknowledged *before* it is written into a reader's inbox, so that a lost link
        can never make the broker deliver it twice. When this host's readers have no
        room it is rejected back to the queue (where ``capacity`` applies and other
        hosts' readers can take it) and the consumer pauses for a moment.
        """
        got = self._frame(msg.body)
        tag = msg.delivery.delivery_tag
        ch = msg.channel
        if got is None or got[0].kind != wire.NORMAL:
            if got is not None:
                self.p.counters.dropped_malformed += 1
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
        r = self.p.deliver_normal(frame.name, frame.payload, expires_at)
        if r != OK:  # the room went in the meantime: dropped, counted
            self.p._count_forward_failure(r, frame.name)

    # ================================================================ close
    async def aclose(self, linger: float = 2.0) -> None:
        """Publish what is queued (up to ``linger`` s), then close the connection."""
        deadline = time.monotonic() + linger
        while (self.out or self.in_flight) and self.state in (L.LINK_UP, L.LINK_CONNECTING):
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
        self.p.counters.dropped_link_down += self._take_all()
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
            "syncs": self.syncs,
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
    ch: Any, body: bytes, exchange: str, rk: str, props: Any, mandatory: bool
) -> tuple[asyncio.Future[Any], Any]:
    """What ``ch.basic_publish`` does before it waits, without its task, lock, timeout
    and drain: take the next delivery tag, register the confirmation future (and the
    message id that a ``basic.return`` is matched by), and marshal the three frames
    into one write (``wire.publish_frames`` when the body fits one frame, else pamqp).
    Returns (the confirmation, the frame for ``ch.write_queue``).

    The link is the only publisher on ``ch`` and puts each frame on the queue before it
    takes the next tag, so tags follow the order on the wire, which is all confirms
    need. Publishing does not wait for an RPC on the channel (``queue_bind``) to be
    answered: basic.publish is an asynchronous method, which AMQP allows meanwhile.
    Used only where the channel has the state it relies on (aiormq 6.8 to 7).
    """
    tag = ch.delivery_tag + 1
    mid = str(tag)
    props.message_id = mid
    # the frame first: if it cannot be built, no tag is taken (a gap would shift every
    # later confirmation onto the wrong message)
    if 0 < len(body) < getattr(ch, "max_content_size", 0):  # one body frame
        data = wire.publish_frames(
            ch.number, exchange, rk, mandatory, body, props.delivery_mode, props.expiration, mid
        )
        frame = ChannelFrame(payload=data, should_close=False)
    else:
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
