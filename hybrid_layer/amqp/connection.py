"""The link's connection lifecycle: connect, claim, declare, serve, reconnect, close.

``Connection._run`` is the link's one long-lived task (``Link.task``) on the host loop:

1. **connect** (``_connect``) to the next URL of CONFIG ``host`` (with a heartbeat,
   ``ssl_context`` and ``connect_timeout``); on failure the reason is explained
   (``explain._explain``), published (``_not_up`` -> the ``LQ_STATE``/``LQ_REASON``
   registry words), what waits in ``out`` and has expired is dropped (``_expire_out``),
   and the next attempt follows after a jittered, doubling backoff
   (``BACKOFF_MIN``..``BACKOFF_MAX``), for ever;
2. **claim** the host's identity (``_claim``: an exclusive queue per host_id, so that
   two hosts never share one host queue; a clash is waited out, then said loudly);
3. **declare** (``_declare``): the groups exchange, the dead-letter exchange and queues,
   the host's queue, and consume it (the publishing channel ``ch``) and the dead-letter
   queues (the normal-channel channel ``nch``);
4. **serve** (``_serve``): sync the bindings, publish again what the last connection
   left unconfirmed, set the state to up, then run the publisher and the syncer tasks
   until the connection or one of its channels closes (raised as an error: reconnect).

State owned here (see ``state.LinkState``): ``conn``, ``ch``, ``nch``, ``state``,
``reason``, ``url``, ``url_index``, ``connect_failures``, ``ever_up``, ``conn_gen`` (bumped
per connection served: a confirm of an older connection's publish is ignored).
Invariants: the link is "up" only once every binding is in place; a
``CancelledError`` means "stop" only when the link itself is being cancelled
(``_cancelled``), else it is aiormq failing a stuck connection's calls: reconnect.
``aclose`` publishes what is queued (up to ``linger``), then stops and counts the rest.

Called by ``Link.__init__`` (the task) and the participant (``aclose``, ``info``);
nothing here runs per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from typing import Any

import aiormq

from .._log import limited
from ..shm import layout as L
from .aiormq_shortcuts import _can_publish_directly, _join_content, _run_inline
from .explain import _explain, _safe
from .state import LinkState
from .topology import (
    DEAD_MAX,
    claim_queue,
    dead_exchange,
    dead_queue,
    host_queue_args,
    normal_dead_queue,
)

log = logging.getLogger("hybrid_layer")

BACKOFF_MIN = 0.1
BACKOFF_MAX = 10.0
PREFETCH = 256  # unacknowledged deliveries from normal-channel queues


def _with_heartbeat(url: str, heartbeat: int) -> str:
    if "heartbeat=" in url:
        return url
    return f"{url}{'&' if '?' in url else '?'}heartbeat={heartbeat}"


class Connection(LinkState):
    """Connect, claim, declare, serve and reconnect for ever; close."""

    def _set_state(self, state: int, reason: int = 0, text: str = "") -> None:
        self.state = state
        self.reason = text or L.REASONS.get(reason, "")
        ns = self.p.ns
        ns.link_set(L.LQ_REASON, reason)
        ns.link_set(L.LQ_STATE, state)
        ns.link_set(L.LQ_CHANGES, ns.link_get(L.LQ_CHANGES) + 1)

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
            asyncio.ensure_future(self._confirm_watch()),
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
