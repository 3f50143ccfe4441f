"""Holding for busy readers, and acknowledging the host queue's deliveries in bursts.

A direct message from another host whose reader's inbox is full is not dropped: it is
held (``_hold``, per channel, FIFO: later messages for that channel queue behind it)
and placed again every ``HOLD_RETRY`` s (``_retry_held``) until it fits or expires.
Back-pressure reaches the senders through the broker: while ``HOLD_MAX`` messages (or
``HOLD_BYTES``) are held, deliveries stop being acknowledged (``_ack_held_back``), so
the broker stops delivering (prefetch ``_prefetch``), the host queue fills, its
``x-max-length`` rejects, and senders on other hosts get ``ChannelFull``. Acks resume
under ``HOLD_LOW``. A hard cap (twice ``HOLD_BYTES``, or beyond what prefetch allows)
drops and counts. A ``flush()`` on this host (its epoch moved) drops what was held.

Acks: ``_ack_later`` notes the newest delivery tag and schedules one
``basic.ack(multiple)`` ``ACK_DELAY`` s later (``_send_ack``); one ack at a time
(``_ack_task``), as two could reach the wire out of order and an older multiple ack
after a newer one is an unknown tag to the broker, which closes the channel. A tag of a
channel gone since is ignored.

State owned here: ``held``, ``held_total``, ``held_bytes``, ``_held_epoch``,
``_retry_handle``, ``_ack_tag``, ``_ack_scheduled``, ``_ack_held_back``, ``_ack_task``
(reset by ``connection._declare`` on each new channel). Hot: ``_ack_later`` runs for
every delivery; the rest only while a reader is busy, and once per burst of acks.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from aiormq.abc import DeliveredMessage

from ..config import PUBLISH_BATCH_MAX
from ..shm.registry import FULL_CHANNEL, FULL_RING
from .state import LinkState, _ignore_result

HOLD_MAX = 10_000  # direct messages held for busy readers before acks are held back
HOLD_BYTES = 32 * 1024 * 1024  # ... or bytes held (a hard cap at twice it: dropped)
HOLD_LOW = 5_000  # ... and acknowledged again under this
HOLD_RETRY = 0.002  # seconds between attempts to place held messages
ACK_DELAY = 0.001  # deliveries are acknowledged (multiple) this long after the first


class Holding(LinkState):
    """Direct messages held for busy readers; the host queue's acks."""

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
        # (aiormq types ``delivery`` as any method with content; a consumer's is a Deliver)
        self._ack_tag = max(self._ack_tag, msg.delivery.delivery_tag)  # type: ignore[union-attr, type-var, assignment]
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
