"""What the broker says about each publish: confirmed, returned, or nacked; retries.

Every publish awaits its fate in ``unconfirmed`` (by sequence number) until
``_confirmed`` runs (the confirmation future's callback):

* **ack**: done (``broker_confirmed``); if it was a probe, what waited behind it for its
  queue follows, in order (``_release``);
* **basic.return** (mandatory, no queue: a host not up yet, or a classic queue whose
  node died; a normal channel's queue not declared): ``_returned`` keeps it in
  ``retry[routing key]``, at its place in its stream (``_keep_for_retry``), and from then
  on everything for that queue queues behind it; one message at a time is tried again
  (the *probe*, ``_schedule_probe`` -> ``_probe``, backing off ``RETRY_MIN`` to
  ``RETRY_MAX``) until the queue is there or the messages expire (counted);
* **basic.nack** from one queue (full, ``x-max-length`` with reject-publish, or its node
  failing over): kept and retried the same way; its capacity key is flagged full
  (``_flag_full``: a hash in the leader's own published set that senders check, so
  ``send`` raises ``ChannelFull``) for ``FULL_HOLD`` s, longer while the queue is found
  full (``_diagnose_nack`` looks, at most once a second per queue, and logs why);
* a group's nack (several queues: some may have taken it), or out of time or retry room:
  dropped and counted (``remote_full``).

State owned here: ``unconfirmed``, ``retry``, ``probing``, ``retry_timer``,
``retry_delay``, ``retry_count``, ``full``, ``full_waiting``, ``_nack_checked``.
Invariants: at most one probe per routing key; FIFO per routing key (a retried
message gets a new id, as newer messages may have reached its queue meanwhile);
``retry_count`` is the number of messages in ``retry`` and bounded by ``outbound_limit``.

Hot: ``_confirmed`` runs once per AMQP message published (its ack path); the rest only
on returns and nacks. ``expire_full_flags`` is called by the host thread's tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any

import aiormq

from .._log import limited
from ..shm import layout as L
from ..shm.groupset import name_hash
from .state import MAX_IN_FLIGHT, LinkState, Pub, _ignore_result

RETRY_MIN = 0.05  # a message returned for want of a queue: first retry after this
RETRY_MAX = 1.0  # ... doubling up to this, until the message expires
FULL_HOLD = 0.2  # seconds a destination stays "full" after a nack
#: a publish that RabbitMQ neither confirms nor rejects for this long, on a connection
#: that is otherwise alive, ends the connection (see ``_confirm_watch``)
CONFIRM_STALL = 10.0
FORCED_EVERY = 60.0  # ... at most once a minute


class Confirms(LinkState):
    """Confirms, returns and nacks of what the publisher published; retries; full flags."""

    async def _confirm_watch(self) -> None:
        """Runs while the link is up: ends the connection when the oldest unconfirmed
        publish has waited ``CONFIRM_STALL`` seconds with no answer. RabbitMQ 3.10, after
        the node of a quorum queue's leader dies, can leave a channel that published to
        that queue waiting for ever - no ack, no nack - while a new channel's publishes
        to it are confirmed at once (seen in tests/broker/test_cluster.py); heartbeats
        keep flowing, so nothing else notices. The link reconnects as after any lost
        connection: what was unconfirmed is published again with its ids (receivers
        skip what they already have), and what was kept for the queue is tried again on
        the new channel."""
        oldest, since = 0, time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            seq = next(iter(self.unconfirmed), 0)
            now = time.monotonic()
            if seq != oldest:
                oldest, since = seq, now
            elif seq and now - since >= CONFIRM_STALL:  # (logged by _run: "link lost")
                self.forced_at = now
                raise ConnectionError(
                    f"RabbitMQ answered no publish for {now - since:.0f} s on a live "
                    "connection (a queue's failover can leave a channel waiting)"
                )
            # the same failover can leave the channel's publishes to a queue rejected
            # (nack) for ever, the queue NOT full, while a new channel's are taken
            # (only while messages are kept for that queue: a queue nothing waits for any
            # more is forgotten)
            for rk in [rk for rk in self.failing_since if not self.retry.get(rk)]:
                del self.failing_since[rk]
            failing = min(self.failing_since.values(), default=now)
            if now - failing >= CONFIRM_STALL and now - self.forced_at >= FORCED_EVERY:
                self.forced_at = now
                self.failing_since.clear()
                raise ConnectionError(
                    f"RabbitMQ rejected every publish to a queue that is not full for "
                    f"{now - failing:.0f} s (a queue's failover can leave a channel "
                    "behind): a new connection"
                )

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
            if self.failing_since:
                self.failing_since.pop(rk, None)
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
        else:
            self.expire_kept_soon(rk, time.monotonic())

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
            self.expire_kept_soon(rk, now)
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
        self.expire_kept_soon(rk, now)

    def expire_kept_soon(self, rk: str, now: float) -> None:
        """While the probe for queue ``rk`` is out, the messages kept behind it are not
        tried, but they still expire on time and are counted: a check at the oldest
        one's deadline (at most ``RETRY_MAX`` away). A probe may go unanswered for long:
        a quorum queue left without a leader, a stalled connection."""
        q = self.retry.get(rk)
        if q and rk not in self.retry_timer:
            self._schedule_probe(rk, min(RETRY_MAX, max(RETRY_MIN, q[0].until - now)))

    def _release(self, rk: str) -> None:
        """Queue ``rk`` exists: publish what waited for it, in order; newer messages
        keep queueing behind until it is all out."""
        timer = self.retry_timer.pop(rk, None)
        if timer is not None:  # (a deadline check scheduled while the probe was out)
            timer.cancel()
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
                        self.failing_since.setdefault(rk, now)
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
