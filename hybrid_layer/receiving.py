"""Receiving: this process's local queues, the receivers waiting on them, wake-ups.

Theory of operation
-------------------
``drain`` (``draining``) moves records from the inbox ring into per-channel local
queues (``queues``: channel -> deque of :class:`~.state.Item`) through ``_put``.
``receive()`` (``layer``) takes from the local queue with ``take``; when it is empty
it registers a waiter (``add_waiter``), announces "may be asleep" in the ring's control
page (``Namespace.prepare_sleep``), and sleeps on the FIFO doorbell that writers ring
when they see that flag; the doorbell's reader callback is ``_on_bell``, which drains.

Waiters are woken with a bare ``None`` (``_wake_one``): a woken receiver takes its
message from the queue itself, so a receive cancelled after its wake-up leaves the
message queued and passes the wake-up on (``remove_waiter``: cancellation safety).

Capacity: a message holds its bucket (``own.bk``: ``enq`` written by senders, ``deq``
by us) until it leaves - received, expired, flushed (``_deq``, under ``lock``).

State: ``queues``, ``waiters``, ``n_sleeping``, ``_armed``, ``loop_regs`` (loops whose
selector watches our doorbell), all under ``lock``. Hot: ``take`` and ``_put`` run once
per message received; ``_wake_one`` once per wake-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

from .shm import layout as L
from .state import EXPIRED, Item, ParticipantState

_monotonic = time.monotonic


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Receiving(ParticipantState):
    def take(self, channel: str) -> Item | None:
        """Pop the next live message of ``channel`` from the local queue."""
        if self._flush_word[L.HQ_FLUSH_EPOCH] != self.flush_seen:
            self.check_flush()
        if not self.queues.get(channel):  # (a lock-free peek; add_waiter looks again)
            return None
        with self.lock:
            q = self.queues.get(channel)
            if not q:
                return None
            now = _monotonic()
            c = self.counters
            while q:
                item = q.popleft()
                if item.bucket >= 0:
                    self._deq(item.bucket, 1)
                if item.expires_at < now:
                    c.drop("expired", 1, EXPIRED, channel, "in its queue", self.cfg.expiry)
                    continue
                if not q:
                    del self.queues[channel]
                c.received += 1
                return item
            del self.queues[channel]
            return None

    def _deq(self, bucket: int, n: int) -> None:
        """Owner-only counter; caller holds ``self.lock``."""
        bk = self.own.bk
        k = 2 * bucket + 1
        bk[k] = (bk[k] + n) & 0xFFFFFFFF

    def _put(self, channel: str, item: Item, loop: asyncio.AbstractEventLoop | None) -> None:
        """Caller holds ``self.lock``."""
        q = self.queues.get(channel)
        if q is None:
            q = self.queues[channel] = deque()
        q.append(item)
        if channel in self.waiters:
            self._wake_one(channel, loop)

    def _wake_one(self, channel: str, loop: asyncio.AbstractEventLoop | None) -> None:
        ws = self.waiters.get(channel)
        while ws:
            wloop, fut = ws.popleft()
            self.n_sleeping -= 1
            if fut.done():
                continue
            if wloop is loop:
                fut.set_result(None)
            else:
                with contextlib.suppress(RuntimeError):  # that loop is closed
                    wloop.call_soon_threadsafe(_wake, fut)
            break
        if ws is not None and not ws:
            del self.waiters[channel]

    def add_waiter(
        self, channel: str, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]
    ) -> None:
        with self.lock:
            if self.queues.get(channel):  # queued since the caller's take(): no sleep
                fut.set_result(None)
                return
            self.waiters.setdefault(channel, deque()).append((loop, fut))
            self.n_sleeping += 1
            armed = self._armed
            register = loop is not self._last_loop and loop not in self.loop_regs
            if register:
                self.loop_regs.add(loop)
            self._last_loop = loop
        if register:
            assert self.ns.bell is not None
            loop.add_reader(self.ns.bell.fd, self._on_bell, loop)
        if armed:  # the flag is up and fenced since the ring was last seen empty
            return
        if self.ns.prepare_sleep():
            self._armed = True
        else:
            self.drain(loop)

    def remove_waiter(
        self,
        channel: str,
        loop: asyncio.AbstractEventLoop,
        fut: asyncio.Future[None],
        cancelled: bool,
    ) -> None:
        """After a receiver's wait ends; ``cancelled``: its task was cancelled (maybe
        after ``fut`` got its result, i.e. after it was woken for a message)."""
        with self.lock:
            # woken normally: _wake_one already took it off the list and counted it
            ws = self.waiters.get(channel) if not fut.done() or fut.cancelled() else None
            if ws is not None:
                try:
                    ws.remove((loop, fut))
                except ValueError:
                    pass  # already woken (and counted off) by _wake_one
                else:
                    self.n_sleeping -= 1
                if not ws:
                    del self.waiters[channel]
            if self.n_sleeping == 0 and not self.closed:
                self._armed = False
                self.ns.set_waiting(False)
            # a cancelled receiver that had been woken passes the wake-up on
            if cancelled and self.queues.get(channel) and channel in self.waiters:
                self._wake_one(channel, loop)

    def _on_bell(self, loop: asyncio.AbstractEventLoop) -> None:
        bell = self.ns.bell
        if bell is None or self.closed:
            return
        bell.drain()
        self._armed = False  # (before the flag: see add_waiter)
        self.ns.set_waiting(False)  # writers skip the bell while we are awake and draining
        self.drain(loop)
        # re-arm only if someone is still asleep (not for a waiter we just woke)
        while self.n_sleeping and not self.closed:
            if self.ns.prepare_sleep():
                self._armed = True
                break
            self.drain(loop)

    def pending(self) -> int:
        """Messages waiting for this process's channels: in its inbox ring and queues."""
        bk = self.own.bk
        total = 0
        for k in range(0, len(bk), 2):
            d = (bk[k] - bk[k + 1]) & 0xFFFFFFFF
            if d < 0x80000000:
                total += d
        return total
