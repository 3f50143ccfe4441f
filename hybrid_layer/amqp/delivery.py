"""Delivery: what arrives from the broker, opened, checked and put into inboxes.

Two consumers, both called by aiormq as it reads (``aiormq_shortcuts._run_inline``: no
task per delivery, for the host queue):

* ``_on_host_message``: a delivery from this host's queue, one frame or a batch. It is
  acknowledged later in bursts (``holding._ack_later``); opened (``_open`` ->
  ``wire.open_delivery``: unsealed with the keys, checked against its route
  ``_route_of``, split into frames); each frame skipped if already delivered (its id in
  the shared ``dedup`` table: a dead leader's unacknowledged deliveries, a sender's
  republish, a replay), refused if it is no frame for a host queue or a group copy
  that spoofs this host as its origin, dropped if expired (``_expires_at``); then
  ``LinkHost.deliver_direct`` (a busy reader: held, ``holding._hold``) or
  ``deliver_group``. Our own group copies (origin this host) went out locally: skipped.
* ``_on_normal_message``: one message of a normal channel's shared queue, acknowledged
  *before* it is written (a lost link never delivers it twice); rejected back to the
  queue when no reader here has room (``LinkHost.normal_room``), and the consumer
  pauses ``NORMAL_PAUSE`` s so other hosts' readers take it; a redelivered id already
  delivered here is skipped (``seen``, ``SEEN_MAX`` ids).

Everything refused is counted and logged (``_malformed``, ``_unauthenticated``,
``_too_large``, ``_refused``), never raised out of the callback: the reader goes on.
State owned here: ``seen``, ``seen_order`` (``dedup`` lives in shared memory).

Hot: ``_on_host_message``, ``_open``, ``_expires_at`` and the ``deliver_*`` calls run
for every message from another host.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from typing import TYPE_CHECKING

from aiormq.abc import DeliveredMessage

from ..shm.groupset import name_hash
from ..shm.registry import FULL_CHANNEL, FULL_RING, NO_CHANNEL, OK
from . import wire
from .dedup import mark, message_id, parse_message_id
from .state import LinkState
from .topology import group_key, normal_queue

if TYPE_CHECKING:
    from pamqp.commands import Basic

SEEN_MAX = 65_536  # normal-channel message ids remembered against redeliveries
NORMAL_PAUSE = 0.05  # stop consuming a normal queue this long when its readers are full


class Delivery(LinkState):
    """The host queue's and the normal channels' consumers."""

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
        # (aiormq types ``delivery`` as any method with content; a consumer's is a Deliver)
        d: Basic.Deliver = msg.delivery  # type: ignore[assignment]
        try:
            return wire.open_delivery(
                msg.body,
                d.exchange,
                d.routing_key,  # type: ignore[arg-type]  # (always set on a Deliver)
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

    async def _on_normal_message(self, msg: DeliveredMessage) -> None:
        """One message from a normal channel's shared queue.

        Acknowledged *before* it is written into a reader's inbox, so that a lost link
        can never make the broker deliver it twice. When this host's readers have no
        room it is rejected back to the queue (where ``capacity`` applies and other
        hosts' readers can take it) and the consumer pauses for a moment.

        A broker that fails over a mirrored queue may deliver again what we had
        acknowledged: a redelivered message whose id this host has delivered is skipped.
        """
        tag: int = msg.delivery.delivery_tag  # type: ignore[union-attr, assignment]  # (a Deliver)
        ch = msg.channel
        mid = msg.header.properties.message_id
        if self.crypter is None and mid and msg.delivery.redelivered and mid in self.seen:  # type: ignore[union-attr]
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
            self.p.count_forward_failure(r, frame.name)

    def _remember(self, mid: str) -> None:
        seen, order = self.seen, self.seen_order
        seen.add(mid)
        order.append(mid)
        if len(order) > SEEN_MAX:
            seen.discard(order.popleft())
