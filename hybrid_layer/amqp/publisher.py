"""Publishing: the outbound queue, batching, and putting AMQP messages on the wire.

What participants hand the leader for other hosts (``submit``, from any thread: the
host thread's drain or a sender in the leader process) waits in ``out`` (a deque of
``state.Out``) until the publisher takes it:

* ``kick`` schedules ``_publish_soon`` on the loop once per burst; when nothing needs
  waiting (link up, aiormq's write queue and the in-flight window have room, no normal
  channel to declare) it publishes at once, else it wakes the ``_publisher`` task, which
  also takes over whenever it is already at work (order);
* ``_next_batch`` takes the next AMQP message's worth: one message, or for a host or a
  group those after it for the same destination, up to CONFIG ``publish_batch``
  messages and ``MAX_BATCH_BYTES`` (a message of ``LARGE`` bytes or more goes alone,
  not joined: ``wire.Parts``);
* ``_publish`` encodes the frames (dropping what expired), makes a ``state.Pub`` and
  either queues it behind messages waiting for the same queue (``confirms``) or
  ``_emit``\\s it: a sequence number (its message id, ``dedup``), sealed with the keys
  if any, and ``aiormq_shortcuts._publish_frame`` (or aiormq's ``basic_publish``).

Flow control: over CONFIG ``outbound_limit(_bytes)`` the ``LQ_BUSY`` word goes up
(senders back off, then get ``ChannelFull``) and down again under a quarter of it; over
twice it a hand-off is refused (``FULL_RING``). At most ``MAX_IN_FLIGHT`` publishes await
a confirm. ``_republish`` publishes again, in order and with their ids, what a lost
connection left unconfirmed; ``_take_all`` forgets everything (flush, close).

Hot: ``submit``, ``kick``, ``_publish_soon``, ``_next_batch``, ``_route``, ``_publish``
and ``_emit`` run for every cross-host message. Order per destination is kept: one
publisher at a time (``_publishing``), and tags follow the write queue's order.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

from pamqp import commands as spec

from .. import names
from ..shm import layout as L
from ..shm.groupset import name_hash
from ..shm.registry import FULL_RING, LINK_DOWN, OK
from . import wire
from .aiormq_shortcuts import _publish_frame
from .dedup import message_id
from .state import MAX_IN_FLIGHT, LinkState, Out, Pub
from .topology import group_key, host_queue, normal_queue

DECLARE_AGAIN = 60.0  # re-declare a normal queue we publish to (keeps x-expires away)
MAX_BATCH_BYTES = 256 * 1024  # a batch (CONFIG publish_batch) stops at about this size
# a message this long goes out not joined (wire.Parts); as LARGE <= MAX_BATCH_BYTES, it
# is always alone in its AMQP message (``_next_batch``)
LARGE = wire.LARGE
KIND_TO_WIRE = {
    L.KIND_OUT_DIRECT: wire.DIRECT,
    L.KIND_OUT_GROUP: wire.GROUP,
    L.KIND_OUT_NORMAL: wire.NORMAL,
}


class Publisher(LinkState):
    """The outbound queue and publishing (``submit`` from any thread; the rest on the loop)."""

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
        n = len(payload)
        with self.out_lock:
            out.append((kind, name, payload, expires_at, key))
            self.out_bytes += n
        if not self.busy and (len(out) >= self.limit or self.out_bytes >= self.limit_bytes):
            self.busy = True
            self.p.ns.link_set(L.LQ_BUSY, 1)
        self.kick()
        return OK

    def _popleft(self) -> Out:
        with self.out_lock:
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

    # ================================================================ loop thread
    def _take_all(self) -> int:
        """Forget everything not yet confirmed; returns how many messages."""
        with self.out_lock:
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
            self.expire_kept_soon(dest[1], now_mono)
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
