"""Normal channels (no ``!`` in the name): many readers, each message to one of them.

Theory of operation
-------------------
A process becomes a reader of a normal channel on its first ``receive()`` of it
(``ensure_reader``): it publishes the channel's tagged hash (``own.groups``) and tells
the leader. A sender picks a reader on this host round robin (``deliver_normal``;
``rr`` is the round-robin cursor) and writes into its ring; the message holds the
channel's capacity bucket (``normal_bucket``: K + hash mod K) in that reader's counters.

With no reader on this host:

- single host: the leader *parks* the message (``_park``: ``parked``, under ``lock``)
  and publishes a ``p`` hash so that senders route the channel through it while it
  holds any (FIFO per sender); ``forward_parked`` hands them to a reader that appeared,
  ``unpark_idle`` stops routing through the leader once its parked queue stayed empty;
- broker mode: the message goes to the channel's shared queue on the broker (a
  hand-off), where any host's reader gets it; the leader's link consumes that queue
  while this host has a reader, and asks ``normal_room``/``deliver_normal`` here.

A reader that stopped receiving gives back what waits for it (``hand_back_idle``, from
the host thread, after ``READER_IDLE``).

The parked messages stay on the participant (not on ``Leadership``): ``_dispatch``
checks them per normal-channel record, flush, sweep and the capacity checks count
them, and statistics show them.

Hot: ``deliver_normal`` (a send to a normal channel; the link's delivery from the
broker) and ``send_normal``.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from .shm import layout as L
from .shm.groupset import name_hash
from .shm.registry import FULL_CHANNEL, NO_CHANNEL, OK, SlotView
from .state import EXPIRED, Item, ParticipantState

log = logging.getLogger("hybrid_layer")

_monotonic = time.monotonic
#: a reader of a normal channel that has taken nothing of it for this long while
#: messages wait in its queue gives them back to the channel's other readers
READER_IDLE = 0.5


class NormalChannels(ParticipantState):
    def normal_bucket(self, channel: str) -> int:
        return self.K + name_hash("n", channel) % self.K

    def _normal_readers(self, channel: str) -> tuple[list[SlotView], int, int]:
        """(slots reading normal channel ``channel`` on this host, its bucket, capacity)."""
        readers = self.ns.slots_with(name_hash("n", channel))
        return readers, self.normal_bucket(channel), self.capacity_for(channel)

    def send_normal(self, channel: str, msg: bytes | memoryview, expires_at: float) -> int:
        if self.cfg.broker:
            r = self.deliver_normal(channel, msg, expires_at)
            if r != NO_CHANNEL:
                return r
            # no reader on this host: the channel's shared queue on the broker
            return self.hand_off(L.KIND_OUT_NORMAL, channel, msg, expires_at, f"n:{channel}")
        bucket = self.normal_bucket(channel)
        cap = self.capacity_for(channel)
        name_b = channel.encode()
        # while the leader holds parked messages for this channel, everything goes
        # through it so that it can hand them over in order (FIFO per sender)
        ld = self.ns.leader()
        ldsv = self.ns.slot(ld.slot) if ld.slot >= 0 else None
        if ldsv is not None and ldsv.groups.maybe_contains(name_hash("p", channel)):
            r = self.ns.write(
                ldsv, ld.gen, L.KIND_NORMAL, name_b, expires_at, msg, bucket, cap, True
            )
            if r != NO_CHANNEL:
                return r
        r = self.deliver_normal(channel, msg, expires_at)
        if r != NO_CHANNEL:
            return r
        # nobody reads it yet: park it with the leader until a reader appears
        for _ in range(2):
            ld = self.ns.leader()
            sv = self.ns.slot(ld.slot) if ld.slot >= 0 else None
            if sv is not None:
                r = self.ns.write(
                    sv, ld.gen, L.KIND_NORMAL, name_b, expires_at, msg, bucket, cap, True
                )
                if r != NO_CHANNEL:
                    return r
            # no live leader right now (failover in progress): take the lease ourselves
            if self.ns.try_lead():
                self.host.on_leadership()
        return NO_CHANNEL

    def deliver_normal(self, channel: str, msg: bytes | memoryview, expires_at: float) -> int:
        """To one reader of normal channel ``channel`` on this host (round robin)."""
        readers, bucket, cap = self._normal_readers(channel)
        if not readers:
            return NO_CHANNEL
        name_b = channel.encode()
        start = self.rr.get(channel, 0)
        self.rr[channel] = start + 1
        n = len(readers)
        result = NO_CHANNEL
        for k in range(n):
            sv = readers[(start + k) % n]
            r = self.ns.write(sv, 0, L.KIND_NORMAL, name_b, expires_at, msg, bucket, cap, True)
            if r == OK:
                return OK
            if r != NO_CHANNEL:
                result = r
        return result

    def normal_room(self, channel: str) -> int:
        """OK if a reader of ``channel`` on this host has room for one more message,
        FULL_CHANNEL if they are all full, NO_CHANNEL if there is none."""
        readers, bucket, cap = self._normal_readers(channel)
        if not readers:
            return NO_CHANNEL
        for sv in readers:
            if sv.pending(bucket) < cap:
                return OK
        return FULL_CHANNEL

    def normal_name(self, h: int) -> str | None:
        lead = self.leading  # (the link asks: we lead)
        return lead.normal_names.get(h) if lead is not None else None

    def ensure_reader(self, channel: str) -> None:
        """Become a reader of normal channel ``channel`` (on first receive of it)."""
        if channel in self.readers:
            return
        with self.lock:
            if channel in self.readers:
                return
            self.readers.add(channel)
            self.own.groups.add(name_hash("n", channel))
        if self.ns.is_leader and self.cfg.broker:
            self._control("reader", [channel])
            return
        ld = self.ns.leader()
        sv = self.ns.slot(ld.slot) if ld.slot >= 0 else None
        if sv is not None:  # ask the leader for what it parked; its tick retries anyway
            self.control(sv, "reader", channel)

    def hand_back_idle(self) -> None:
        """Normal channels: a process that stopped receiving one gives back what waits.

        A process becomes a reader on its first ``receive()`` of a normal channel and
        senders pick readers round-robin, so a process that received once and stopped
        (a worker busy with a long job, a management command that took one message)
        would keep its share until ``expiry``. Once the head of its queue has stayed
        there ``READER_IDLE`` seconds with no ``receive()`` waiting, the process stops
        being a reader (its next ``receive()`` makes it one again) and routes the queued
        messages on, in order: to another reader on this host, else (single host) to the
        leader, which parks them until a reader appears, else (broker mode) to the
        channel's queue on the broker, where other hosts' readers get them.
        """
        now = _monotonic()
        back: list[tuple[str, list[Item]]] = []
        with self.lock:
            marks = self._idle_heads
            for channel in list(self.readers):
                q = self.queues.get(channel)
                if not q or channel in self.waiters:
                    marks.pop(channel, None)
                    continue
                seen = marks.get(channel)
                if seen is None or seen[0] is not q[0]:
                    marks[channel] = (q[0], now)
                    continue
                if now - seen[1] < READER_IDLE:
                    continue
                del marks[channel]
                self.readers.discard(channel)
                self.own.groups.discard(name_hash("n", channel))
                items = list(q)
                del self.queues[channel]
                for item in items:
                    if item.bucket >= 0:
                        self._deq(item.bucket, 1)
                back.append((channel, items))
        for channel, items in back:
            log.info(
                "hybrid_layer: pid %d stopped receiving normal channel %r: %d waiting "
                "message(s) handed back to its other readers",
                self.pid,
                channel,
                len(items),
            )
            for item in items:
                if item.expires_at < _monotonic():
                    self.counters.drop(
                        "expired",
                        1,
                        "hybrid_layer: message for normal channel %r expired while handed back",
                        channel,
                    )
                    continue
                r = self.send_normal(
                    channel, memoryview(item.body)[item.name_len :], item.expires_at
                )
                if r != OK:
                    self.count_forward_failure(r, channel)

    def _park(self, channel: str, item: Item) -> None:
        """Leader, holding ``self.lock``: keep ``item`` until a reader can take it."""
        q = self.parked.get(channel)
        if q is None:
            q = self.parked[channel] = deque()
            self.own.groups.add(name_hash("p", channel))  # senders: route via me
        self.parked_empty_since.pop(channel, None)
        q.append(item)

    def forward_parked(self, only: str | None = None) -> None:
        """Leader: hand parked normal-channel messages to readers that appeared."""
        with self.lock:
            channels = [only] if only is not None else list(self.parked)
        now = _monotonic()
        for channel in channels:
            with self.lock:
                q = self.parked.get(channel)
                if not q:
                    continue
                items = list(q)
                q.clear()
            keep: list[Item] = []
            for idx, item in enumerate(items):
                if item.expires_at < now:
                    with self.lock:
                        self._deq(item.bucket, 1)
                    self.counters.drop("expired", 1, EXPIRED, channel, "parked", self.cfg.expiry)
                    continue
                if channel in self.readers:  # we read it ourselves
                    with self.lock:
                        self._put(channel, item, None)
                    continue
                r = self._forward_to_reader(channel, item)
                if r == OK:
                    with self.lock:
                        self._deq(item.bucket, 1)
                else:  # no reader yet, or all full: keep order, try again next tick
                    keep.extend(items[idx:])
                    break
            with self.lock:
                q = self.parked.setdefault(channel, deque())
                if keep:
                    q.extendleft(reversed(keep))
                elif not q:
                    self.parked_empty_since.setdefault(channel, now)

    def unpark_idle(self, linger: float = 1.0) -> None:
        """Leader: stop routing a channel through us once its parked queue stayed empty
        for ``linger`` seconds (longer than any sender's check-then-write)."""
        now = _monotonic()
        with self.lock:
            for channel, since in list(self.parked_empty_since.items()):
                if now - since >= linger and not self.parked.get(channel):
                    del self.parked_empty_since[channel]
                    self.parked.pop(channel, None)
                    self.own.groups.discard(name_hash("p", channel))

    def _forward_to_reader(self, channel: str, item: Item) -> int:
        msg = memoryview(item.body)[item.name_len :]
        cap = self.capacity_for(channel)
        for sv in self.ns.slots_with(name_hash("n", channel), exclude=self.slot):
            r = self.ns.write(
                sv, 0, L.KIND_NORMAL, channel.encode(), item.expires_at, msg, item.bucket, cap
            )
            if r == OK:
                return OK
        return NO_CHANNEL
