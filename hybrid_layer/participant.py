"""One participant: this process's slot on the host, its inbox and its share of the work.

Theory of operation
-------------------
Every message to a participant is a record in its ring (``shm.ring``), written by the
sender under the ring lock. The owner *drains* the ring - from whichever event loop is
receiving, or from its host thread - into per-channel local queues, fanning group
records out to its local members. ``receive()`` takes from the local queue; when it is
empty the receiver registers a waiter, announces "may be asleep" in the ring's control
page, and sleeps on the FIFO doorbell that writers ring when they see that flag.

Capacity: each process channel carries a bucket index in its name; the sender checks
``enq - deq`` of that bucket under the ring lock (so ``send`` can raise ``ChannelFull``
without asking the reader) and bumps ``enq``; the owner bumps ``deq`` when the message
leaves (received, expired, flushed). Group copies made by the owner reserve a slot by
lowering ``deq``.

Waiters are woken with a bare ``None``: a woken receiver takes its message from the
queue itself, so a receive cancelled after its wake-up leaves the message queued and
passes the wake-up on (cancellation safety).

Threading: ``lock`` guards queues, waiters, groups and the owner's bucket counters;
``read_lock`` makes the owner a single consumer of its ring across threads and loops.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
import weakref
from collections import deque
from typing import Any, NamedTuple

from . import names
from ._log import limited
from .config import LayerConfig
from .envelope import decode_args, encode_args
from .errors import LayerClosed
from .routing import Action, GroupTable, Route, route
from .shm import layout as L
from .shm import spill
from .shm.groupset import TAG_GROUP, TAG_NORMAL, TAG_OTHER, TOMBSTONE, name_hash
from .shm.registry import (
    FULL_CHANNEL,
    FULL_RING,
    LINK_DOWN,
    NO_CHANNEL,
    OK,
    Namespace,
    SlotView,
)
from .shm.ring import BadRecord, RingCorrupt
from .stats import Counters

log = logging.getLogger("hybrid_layer")

TICK = 0.1  # host thread period: election attempts, housekeeping
RECLAIM_EVERY = 0.25
SWEEP_EVERY = 1.0
#: the owner's sweep of its own large-message segments that no record refers to (a
#: writer killed before it published the record): every this many seconds (at most
#: ``expiry``), those older than ``expiry`` + SPILL_GRACE
SPILL_SWEEP_EVERY = 30.0
SPILL_GRACE = 5.0
#: a reader of a normal channel that has taken nothing of it for this long while
#: messages wait in its queue gives them back to the channel's other readers
READER_IDLE = 0.5
_monotonic = time.monotonic
#: how long ``group_add`` waits for the leader to bind a new group on the broker
BIND_WAIT = 2.0
#: how long close() waits for the link to publish what is queued and close
LINK_CLOSE_WAIT = 6.0
LOCAL_DEST_MAX = 65_536
#: the log line of an expired message: channel, where it waited, the expiry
_EXPIRED = "hybrid_layer: message for %r expired unread (%s, expiry %s s)"
MAX_NAME_LENGTH = 100  # channels' BaseChannelLayer: valid names are shorter


class Item(NamedTuple):
    expires_at: float
    pos: int  # ring position the record was read at (flush bookkeeping)
    bucket: int  # owner's capacity bucket, -1 if none
    body: bytes
    name_len: int


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Participant:
    def __init__(self, cfg: LayerConfig) -> None:
        self.cfg = cfg
        self.K = cfg.channel_buckets
        self.ns = Namespace(cfg)
        self.ns.attach()
        self.slot = self.ns.me
        self.gen = self.ns.gen
        self.pid = os.getpid()
        assert self.ns.own is not None
        self.own: SlotView = self.ns.own
        self.counters = Counters()
        if self.ns.site_clash:  # (logged by the namespace)
            self.counters.site_clash += 1
        if self.ns.claimed_dropped:  # our slot's dead owner had left messages unread
            self.counters.drop(
                "dead_reader",
                self.ns.claimed_dropped,
                "hybrid_layer: took over slot %d of a dead process (%d unread messages dropped)",
                self.ns.me,
                self.ns.claimed_dropped,
            )
        self.lock = threading.Lock()
        self.read_lock = threading.Lock()
        self.queues: dict[str, deque[Item]] = {}
        self.waiters: dict[str, deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}
        # loops whose selector watches our doorbell; kept while the loop lives (an idle
        # registration costs nothing: the bell rings only while someone waits)
        self.loop_regs: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self.n_sleeping = 0  # waiters registered and not yet woken
        # our waiting flag is up, and was fenced (prepare_sleep) with the ring empty, and
        # has not been lowered since: a further sleeper needs no fence of its own. Set
        # under self.lock or by the bell handler; lowered before the flag is.
        self._armed = False
        self._last_loop: asyncio.AbstractEventLoop | None = None  # (in loop_regs)
        self.groups = GroupTable()
        self.readers: set[str] = set()
        # normal channel -> (its queue's head, when first seen there): for READER_IDLE
        self._idle_heads: dict[str, tuple[Item, float]] = {}
        self.parked: dict[str, deque[Item]] = {}
        self._flush_word = self.ns.reg_q  # [HQ_FLUSH_EPOCH]: read on every take/drain
        self._skipped = False  # a bad record was skipped: resync buckets when empty
        self.flush_seen = self.ns.flush_epoch()
        self.flush_acked = self.flush_seen
        self.parked_empty_since: dict[str, float] = {}
        self.next_bucket = 0
        self.rr: dict[str, int] = {}
        self._capacity_cache: dict[str, int] = {}
        # same-host process channel -> (slot, gen, name bytes, bucket, capacity): all of
        # it follows from the name, so it never goes stale
        self._local_dest: dict[str, tuple[int, int, bytes, int, int]] = {}
        # broker mode
        self.link: Any = None  # amqp.link.Link while we lead and a broker is configured
        self.early_out: deque[tuple[int, str, bytes, float, str | None]] = deque()
        self.link_closed = False
        self.normal_names: dict[int, str] = {}  # hash -> normal channel read on this host
        self._interest: dict[int, tuple[int, set[int]]] = {}  # slot -> (changes, hashes)
        self._interest_epoch = -1
        self._link_up_seen = False  # for on_disconnect / on_reconnect
        self._gap_told = False
        self._up_mark = (-1, -1)  # (leader epoch, link changes) when last seen up
        self._spill_stem = spill.stem(self.ns.ns, self.slot, self.gen)
        self.closed = False
        self.host = HostThread(self)
        self.host.start()

    # ================================================================ names
    def new_channel(self, prefix: str) -> str:
        with self.lock:
            bucket = self.next_bucket
            self.next_bucket = (bucket + 1) % self.K
        return names.mint(prefix, self.cfg.host_id, self.slot, self.gen, bucket)

    def owns(self, channel: str) -> bool:
        """Whether ``channel`` (a process channel) names this participant."""
        addr = names.parse(channel)
        return (
            addr is not None
            and addr.host_id == self.cfg.host_id
            and addr.slot == self.slot
            and addr.gen == self.gen
        )

    def capacity_for(self, channel: str) -> int:
        cap = self._capacity_cache.get(channel)
        if cap is None:
            if len(self._capacity_cache) > 65536:
                self._capacity_cache.clear()
            cap = self._capacity_cache[channel] = self.cfg.capacity_for(channel)
        return cap

    # ================================================================ sending
    def send(self, channel: str, msg: bytes | memoryview, expires_at: float) -> int:
        """Route one message; OK, FULL_CHANNEL, FULL_RING or NO_CHANNEL."""
        hit = self._local_dest.get(channel)
        if hit is None:  # not a process channel on this host seen before
            dest = route(channel, self.cfg.host_id, self.slot, self.gen)
            if dest.route is Route.NORMAL:
                return self.send_normal(channel, msg, expires_at)
            addr = dest.address
            if dest.route is Route.UNROUTABLE:
                if addr is not None and self.cfg.broker:  # another host's process channel
                    return self.hand_off(
                        L.KIND_OUT_DIRECT, channel, msg, expires_at, f"h:{addr.host_id}"
                    )
                return NO_CHANNEL
            if addr is None or addr.bucket >= self.K:
                return NO_CHANNEL
            hit = self._remember_local(channel, addr)
        slot, gen, name_b, bucket, cap = hit
        sv = self.ns.slot(slot)
        if sv is None:
            return NO_CHANNEL
        return self.ns.write(sv, gen, L.KIND_DIRECT, name_b, expires_at, msg, bucket, cap)

    def _remember_local(self, channel: str, addr: Any) -> tuple[int, int, bytes, int, int]:
        """Cache the route to ``channel``, a process channel on this host (``addr`` its
        parsed name, bucket < K): (slot, gen, name bytes, bucket, capacity)."""
        cache = self._local_dest
        if len(cache) >= LOCAL_DEST_MAX:
            cache.clear()
        hit = cache[channel] = (
            addr.slot,
            addr.gen,
            channel.encode(),
            addr.bucket,
            self.capacity_for(channel),
        )
        return hit

    def normal_bucket(self, channel: str) -> int:
        return self.K + name_hash("n", channel) % self.K

    def _normal_readers(self, channel: str) -> tuple[list[SlotView], int, int]:
        """(slots reading normal channel ``channel`` on this host, its bucket, capacity)."""
        readers = self.ns.slots_with(name_hash("n", channel))
        return readers, self.normal_bucket(channel), self.capacity_for(channel)

    def hand_off(
        self, kind: int, name: str, msg: bytes | memoryview, expires_at: float, key: str | None
    ) -> int:
        """Broker mode: give a message for other hosts to the leader, which publishes it.

        ``key`` names the destination for capacity (a host id, a normal channel): while
        the broker rejects messages for it, this returns FULL_CHANNEL without a round
        trip. Whatever the leader's link is doing (not started, connecting, down, up),
        the message is kept in order and published once it is up; past the leader's
        bound (CONFIG ``outbound_limit``) this returns FULL_RING (send() backs off,
        then raises ChannelFull).
        """
        for _ in range(2):
            ld = self.ns.leader()
            if ld.slot == self.slot and self.ns.is_leader:
                link = self.link
                if link is None:  # we just became leader; the host thread starts it
                    if self._keep_early(kind, name, msg, expires_at, key):
                        return OK
                    link = self.link
                    if link is None:
                        return FULL_RING
                if key is not None and key in link.full:
                    return FULL_CHANNEL
                if link.busy:
                    return FULL_RING  # send() backs off for up to 0.5 s
                return link.submit(kind, name, bytes(msg), expires_at, key)
            sv = self.ns.slot(ld.slot) if ld.slot >= 0 else None
            if sv is not None:
                if key is not None and sv.groups.maybe_contains(name_hash("f", key)):
                    return FULL_CHANNEL
                if self.ns.link_get(L.LQ_BUSY, ld.slot):
                    return FULL_RING  # send() backs off for up to 0.5 s
                r = self.ns.write(sv, ld.gen, kind, name.encode(), expires_at, msg, -1, 0, True)
                if r != NO_CHANNEL:
                    return r
            # no live leader right now (failover in progress): take the lease ourselves
            if self.ns.try_lead():
                self.host.on_leadership()
        return LINK_DOWN

    def _keep_early(
        self, kind: int, name: str, msg: bytes | memoryview, expires_at: float, key: str | None
    ) -> bool:
        """Leader with no link object yet: keep a hand-off for it (in order: the link
        takes them all under this lock). False if the link exists now or the bound is
        reached (``early_out`` is bounded like the link's queue)."""
        with self.lock:
            if self.link is not None:
                return False
            if len(self.early_out) >= self.cfg.outbound_limit:
                return False
            self.early_out.append((kind, name, bytes(msg), expires_at, key))
            return True

    def count_link_drop(self, name: str) -> None:
        self.counters.drop(
            "link_down",
            1,
            "hybrid_layer: message for %r (another host) dropped: the RabbitMQ link is down",
            name,
        )

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

    def group_send(self, group: str, msg: bytes, expires_at: float) -> None:
        self.counters.group_sends += 1
        self.deliver_group(group, msg, expires_at)
        if self.cfg.broker:  # once to the exchange; every other host with members fans out
            r = self.hand_off(L.KIND_OUT_GROUP, group, msg, expires_at, None)
            if r == LINK_DOWN:
                self.count_link_drop(group)
            elif r != OK:  # the leader's inbox is full
                self.count_forward_failure(r, group)

    # ================================================================ broker: inbound
    def deliver_group(self, group: str, msg: bytes | memoryview, expires_at: float) -> None:
        """One copy per local process with members in ``group``."""
        h = name_hash("g", group)
        name_b = group.encode()
        c = self.counters
        for sv in self.ns.slots_with(h):
            r = self.ns.write(sv, 0, L.KIND_GROUP, name_b, expires_at, msg, -1, 0, True)
            if r == FULL_RING:
                c.drop(
                    "full",
                    1,
                    "hybrid_layer: group %r message dropped: inbox of slot %d is full",
                    group,
                    sv.index,
                )

    def deliver_direct(self, channel: str, msg: bytes | memoryview, expires_at: float) -> int:
        """Leader: a message from another host for a process channel of this host.

        Returns OK, FULL_CHANNEL or FULL_RING (the caller holds the message and tries
        again); a message for no channel of this host is dropped and counted here."""
        r = NO_CHANNEL
        # a route-cache hit is a process channel of this host; anything else is parsed
        # here first, as send() would hand another host's channel back to the broker.
        # (a name of 100 characters or more is no channels name: none of ours either,
        # and it may not fit a ring record's name field)
        here = channel in self._local_dest
        if not here and len(channel) >= MAX_NAME_LENGTH:
            self.count_forward_failure(r, channel[:60] + "...")
            return r
        if not here:
            dest = route(channel, self.cfg.host_id, self.slot, self.gen)
            here = dest.route in (Route.OWN, Route.SLOT)
        if here:
            r = self.send(channel, msg, expires_at)
        if r == NO_CHANNEL:
            self.count_forward_failure(r, channel)
        return r

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

    # ================================================================ broker: leader
    def interest(self) -> tuple[set[int], set[int]] | None:
        """Leader: (group hashes, normal-channel hashes) with a member/reader on this
        host, from every live slot's published set; ``None`` if a set was mid-rebuild."""
        live = self.ns.live_slots()
        cache = self._interest
        for i in list(cache):
            if i not in live:
                del cache[i]
        union: set[int] = set()
        for i in live:
            sv = self.ns.slot(i)
            if sv is None:
                continue
            changes = sv.groups.changes
            got = cache.get(i)
            if got is None or got[0] != changes:
                snap = sv.groups.snapshot()
                if snap is None:
                    return None
                got = cache[i] = (changes, snap)
            union |= got[1]
        groups = {h for h in union if h & 3 == TAG_GROUP}
        normals = {h for h in union if h & 3 == TAG_NORMAL}
        return groups, normals

    def interest_changed(self) -> bool:
        """Leader: cheap check whether any slot's published set moved since ``interest``."""
        if self.ns.reg_q[L.HQ_SLOTS_EPOCH] != self._interest_epoch:
            self._interest_epoch = self.ns.reg_q[L.HQ_SLOTS_EPOCH]
            return True
        for i, (changes, _) in self._interest.items():
            sv = self.ns.slot(i)
            if sv is not None and sv.groups.changes != changes:
                return True
        return False

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
        return self.normal_names.get(h)

    def start_link(self) -> None:
        """Host thread, on becoming leader in broker mode."""
        if self.link is not None or self.closed or self.link_closed or not self.cfg.broker:
            return
        from .amqp.link import Link

        assert self.host.loop is not None
        link = Link(self, self.host.loop)
        with self.lock:
            for name in self.readers:
                self.normal_names[name_hash("n", name)] = name
            # what was handed over before the link existed goes first, in order: no
            # hand-off can slip in between, they all take this lock while link is None
            for item in self.early_out:
                link.out.append(item)
                link.out_bytes += len(item[2])
            self.early_out.clear()
            self.link = link
        link.kick()
        # every process tells the new leader the names of the normal channels it reads
        for i in self.ns.live_slots():
            sv = self.ns.slot(i)
            if i != self.slot and sv is not None:
                self.control(sv, "readers?")

    def watch_link(self) -> None:
        """Every process: tell consumers that opted in about a gap in cross-host traffic."""
        cfg = self.cfg
        if not (cfg.on_disconnect or cfg.on_reconnect):
            return
        ld = self.ns.leader()
        state, _, changes = self.ns.link_state()
        if self.ns.leader() != ld:
            return  # the leader is changing: look again next tick
        if state == L.LINK_UP:
            mark = (ld.epoch, changes)
            same_leader = self._up_mark[0] == ld.epoch
            if self._link_up_seen and not self._gap_told and same_leader and self._up_mark != mark:
                # down and up again between two looks (a tick): a gap all the same
                self._gap_told = True
                if cfg.on_disconnect:
                    self._tell_group_members(cfg.on_disconnect)
            if self._gap_told and cfg.on_reconnect:
                self._tell_group_members(cfg.on_reconnect)
            self._gap_told = False
            self._link_up_seen = True
            self._up_mark = mark
        elif self._link_up_seen and not self._gap_told and state != L.LINK_CONNECTING:
            self._gap_told = True
            if cfg.on_disconnect:
                self._tell_group_members(cfg.on_disconnect)

    def _tell_group_members(self, type_: str) -> None:
        from .envelope import encode_message

        with self.lock:
            channels = {ch for members in self.groups.groups.values() for ch in members}
        msg = encode_message({"type": type_, "host_id": self.cfg.host_id})
        expires_at = _monotonic() + self.cfg.expiry
        for channel in channels:
            r = self.send(channel, msg, expires_at)
            if r != OK:
                self.count_forward_failure(r, channel)

    def control(self, sv: SlotView, verb: str, *args: Any) -> int:
        return self.ns.write(
            sv, 0, L.KIND_CONTROL, verb.encode(), _monotonic() + 60, encode_args(*args), -1, 0, True
        )

    # ================================================================ groups
    def group_add(self, group: str, channel: str) -> bool:
        """True if this process joined ``group`` (its first member here)."""
        self.check_flush()
        with self.lock:
            if self.groups.add(group, channel, time.time()) is Action.JOIN:
                self.own.groups.add(name_hash("g", group))
                return True
        return False

    async def wait_bound(self) -> None:
        """Broker mode, after joining a group: return once the leader has bound it on the
        broker (a binding sync that started after our change completed), or at once
        while the link is down (bindings are restored when it is up again). A link that
        is still coming up (a new leader, or none elected yet) is waited for: its first
        sync binds what we joined. ``BIND_WAIT`` caps it all."""
        deadline = _monotonic() + BIND_WAIT
        target = 0  # the leader's binding syncs that cover our change; 0: not up yet
        epoch = 0
        while True:
            state, syncs, _ = self.ns.link_state()
            if state == L.LINK_UP:
                leader = self.ns.leader()
                if not target:  # up: the next sync to start includes our change
                    epoch = leader.epoch
                    target = self.ns.link_get(L.LQ_SYNCS_STARTED, leader.slot) + 1
                    self.request_sync()
                elif leader.epoch != epoch:  # a new leader binds everything at once
                    epoch, target = leader.epoch, 1
                elif syncs >= target:
                    return
            elif state == L.LINK_DOWN or target:  # down, or went down after up
                return
            if _monotonic() >= deadline:
                limited.warning(
                    "bind-slow",
                    "hybrid_layer: group binding not confirmed within %.1fs%s",
                    BIND_WAIT,
                    "" if target else ": the broker link is not up yet",
                )
                return
            await asyncio.sleep(0.0005 if target else 0.002)

    def request_sync(self) -> None:
        if self.ns.is_leader:
            if self.link is not None:
                self.link.request_sync()
            return
        ld = self.ns.leader()
        sv = self.ns.slot(ld.slot) if ld.slot >= 0 else None
        if sv is not None:
            self.control(sv, "sync")

    def group_discard(self, group: str, channel: str, *, local_only: bool = False) -> None:
        self.check_flush()
        h = name_hash("g", group)
        with self.lock:
            if self.groups.discard(group, channel) is Action.LEAVE:
                self.own.groups.discard(h)
        if local_only:
            return
        # the membership may belong to another process (it called group_add): tell
        # every process that has members in the group; its owner drops it
        for sv in self.ns.slots_with(h, exclude=self.slot):
            self.control(sv, "discard", group, channel)

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

    # ================================================================ receiving
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
                    c.drop("expired", 1, _EXPIRED, channel, "in its queue", self.cfg.expiry)
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

    def _resync_buckets(self) -> int:
        """After discarding the unread ring (caller holds the ring lock, so ``enq`` is
        still): count only what is queued locally, or the dropped records would hold
        their channels' capacity for ever. Returns how many messages that wrote off
        (direct and normal-channel records that were in the ring)."""
        gone = 0
        with self.lock:
            local: dict[int, int] = {}
            for store in (self.queues, self.parked):
                for q in store.values():
                    for item in q:
                        if item.bucket >= 0:
                            local[item.bucket] = local.get(item.bucket, 0) + 1
            bk = self.own.bk
            for b in range(len(bk) // 2):
                want = (bk[2 * b] - local.get(b, 0)) & 0xFFFFFFFF
                if bk[2 * b + 1] != want:
                    gone += (want - bk[2 * b + 1]) & 0xFFFFFFFF
                    bk[2 * b + 1] = want
        return gone if gone < 0x80000000 else 0

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

    # ================================================================ draining
    def drain(self, loop: asyncio.AbstractEventLoop | None) -> int:
        """Move every record from the ring into local queues. Returns records read."""
        if self._flush_word[L.HQ_FLUSH_EPOCH] != self.flush_seen:
            self.check_flush()
        ring = self.own.ring
        if self.closed:
            return 0
        if ring.tail == ring.head:
            if self.flush_acked != self.flush_seen:
                self._ack_flush()
            return 0
        n = 0
        with self.read_lock:
            upto = self.ns.flush_upto()
            if upto > ring.tail:  # a corrupted word: it would discard every record
                self.check_words()
                upto = self.ns.flush_upto()
            now = _monotonic()
            while True:
                pos = ring.head
                try:
                    rec = ring.try_read()
                except BadRecord as exc:  # one record skipped; its neighbours are fine
                    self._skipped = True
                    self.counters.drop("corrupt", 1, "hybrid_layer: %s", exc)
                    continue
                except RingCorrupt as exc:  # the framing is broken: nothing to read on
                    with self.ns.ring_locked(self.own):
                        ring.reset()
                        gone = self._resync_buckets()
                    self._skipped = False
                    self.counters.drop(
                        "corrupt",
                        max(gone, 1),
                        "hybrid_layer: inbox reset, at least %d message(s) dropped: %s",
                        max(gone, 1),
                        exc,
                    )
                    break
                if rec is None:
                    break
                n += 1
                body = rec.body
                if len(body) > rec.name_len and body[rec.name_len] == 0xC1:  # spill.TAG
                    rec = self._unspill(rec, pos, upto, now)
                    if rec is None:
                        continue
                try:
                    self._dispatch(rec, pos, upto, now, loop)
                except Exception as exc:  # never let one bad record stop the pump
                    self.counters.drop(
                        "corrupt",
                        1,
                        "hybrid_layer: a kind-%s record for %r dropped: cannot dispatch it: %r",
                        rec.kind,
                        rec.name,
                        exc,
                    )
                    log.debug("hybrid_layer: dispatch failure", exc_info=True)
            if self._skipped:
                self._resync_after_skip()
        if self.flush_acked != self.flush_seen:
            self._ack_flush()
        return n

    def _resync_after_skip(self) -> None:
        """A skipped record may have held a capacity slot of a channel (its name was
        unreadable): once the ring is seen empty under its lock, count only what is
        queued locally, as after a reset. Caller holds ``read_lock``."""
        ring = self.own.ring
        with self.ns.ring_locked(self.own):
            if ring.tail == ring.head:
                self._resync_buckets()
                self._skipped = False

    def _unspill(self, rec: Any, pos: int, upto: int, now: float) -> Any:
        """A record whose message is in a segment of its own (``shm.spill``): the record
        with the message copied in, the segment removed. An expired or flushed one's
        segment is removed unread (``_dispatch`` then drops the record and counts it);
        one that cannot be read is dropped and counted here (None)."""
        kind = rec.kind
        ref = rec.message
        local = kind < L.KIND_CONTROL  # (hand-offs: the link checks their expiry)
        if local and (pos < upto or rec.expires_at < now):
            spill.discard(ref, self._spill_stem)
            return rec
        try:
            return rec._replace(body=spill.read(ref, self._spill_stem))
        except (spill.SpillError, OSError) as exc:
            bucket = self._record_bucket(kind, rec.name) if local else -1
            if bucket >= 0:
                with self.lock:
                    self._deq(bucket, 1)
            self._spill_failed(rec.name, exc)
            return None

    def _ack_flush(self) -> None:
        """Tell a flusher we applied its flush (local queues and ring both cleaned)."""
        with self.read_lock:
            self.flush_acked = self.flush_seen
            self.ns.ack_flush(self.flush_seen)

    def _record_bucket(self, kind: int, name: str) -> int:
        if kind == L.KIND_DIRECT:
            addr = names.parse(name)
            if addr is not None and addr.slot == self.slot and addr.bucket < self.K:
                return addr.bucket
            return -1
        if kind == L.KIND_NORMAL:
            return self.normal_bucket(name)
        return -1

    def _dispatch(
        self, rec: Any, pos: int, upto: int, now: float, loop: asyncio.AbstractEventLoop | None
    ) -> None:
        kind = rec.kind
        c = self.counters
        if kind == L.KIND_CONTROL:
            self._control(rec.name, decode_args(rec.message))
            return
        if kind >= L.KIND_OUT_DIRECT:
            self._outbound(rec)
            return
        if pos < upto or rec.expires_at < now:
            bucket = self._record_bucket(kind, rec.name)
            if bucket >= 0:
                with self.lock:
                    self._deq(bucket, 1)
            if pos < upto:
                c.drop("flushed", 1, "hybrid_layer: message for %r flushed unread", rec.name)
            else:
                c.drop("expired", 1, _EXPIRED, rec.name, "in the inbox", self.cfg.expiry)
            return
        if kind == L.KIND_DIRECT:
            item = Item(
                rec.expires_at, pos, self._record_bucket(kind, rec.name), rec.body, rec.name_len
            )
            with self.lock:
                self._put(rec.name, item, loop)
        elif kind == L.KIND_GROUP:
            self._fan_out(rec, pos, loop)
        elif kind == L.KIND_NORMAL:
            item = Item(rec.expires_at, pos, self.normal_bucket(rec.name), rec.body, rec.name_len)
            with self.lock:
                parked = self.parked.get(rec.name)
                if rec.name in self.readers and not parked:
                    self._put(rec.name, item, loop)
                    return
                if self.ns.is_leader and not self.cfg.broker:
                    self._park(rec.name, item)
                    park = True
                else:
                    self._deq(item.bucket, 1)
                    park = False
            if park:  # hand it (and anything parked before it) over now if we can
                self.forward_parked(rec.name)
                return
            # not a reader (any more) and not the leader: route it on
            r = self.send_normal(rec.name, rec.message, rec.expires_at)
            if r != OK:
                self.count_forward_failure(r, rec.name)

    def _outbound(self, rec: Any) -> None:
        """A message handed to us (as leader) for other hosts: publish it."""
        name = rec.name
        key = _out_key(rec.kind, name)
        link = self.link
        if link is None and self.ns.is_leader and self.cfg.broker:
            if self._keep_early(rec.kind, name, rec.message, rec.expires_at, key):
                return
            link = self.link
        if link is not None and self.ns.is_leader:
            # (a view of the record's own bytes, copied out of the ring: no copy here)
            got = link.submit(rec.kind, name, rec.message, rec.expires_at, key)
            if got == LINK_DOWN:
                self.count_link_drop(name)
            elif got == FULL_RING:
                self.counters.drop(
                    "full",
                    1,
                    "hybrid_layer: message for %r (another host) dropped: the leader's "
                    "outbound queue is full (the broker does not keep up)",
                    name,
                )
            return
        # leadership moved on since the sender looked: pass it to the current leader
        r = self.hand_off(rec.kind, name, rec.message, rec.expires_at, key)
        if r == LINK_DOWN:
            self.count_link_drop(name)
        elif r != OK:
            self.count_forward_failure(r, name)

    def _park(self, channel: str, item: Item) -> None:
        """Leader, holding ``self.lock``: keep ``item`` until a reader can take it."""
        q = self.parked.get(channel)
        if q is None:
            q = self.parked[channel] = deque()
            self.own.groups.add(name_hash("p", channel))  # senders: route via me
        self.parked_empty_since.pop(channel, None)
        q.append(item)

    def count_forward_failure(self, r: int, name: str) -> None:
        if r in (FULL_CHANNEL, FULL_RING):
            self.counters.drop("full", 1, "hybrid_layer: copy for %r dropped: full", name)
        else:
            self.counters.drop(
                "no_channel", 1, "hybrid_layer: copy for %r dropped: no reader", name
            )

    # (the link's name for it until the link split lands: amqp.link calls this one)
    _count_forward_failure = count_forward_failure

    def _fan_out(self, rec: Any, pos: int, loop: asyncio.AbstractEventLoop | None) -> None:
        group = rec.name
        c = self.counters
        body = rec.body
        name_len = rec.name_len
        expires_at = rec.expires_at
        others = []
        own_pending = self.own.pending
        local = self._local_dest
        me, gen = self.slot, self.gen
        with self.lock:  # one round: the members, then a copy for each
            members, _expired, action = self.groups.members(
                group, time.time(), self.cfg.group_expiry
            )
            if action is Action.LEAVE:
                self.own.groups.discard(name_hash("g", group))
            for channel in members:
                hit = local.get(channel)
                if hit is None:
                    dest = route(channel, self.cfg.host_id, me, gen)
                    if dest.route is not Route.OWN or dest.address is None:
                        others.append(channel)
                        continue
                    if dest.address.bucket >= self.K:
                        c.drop(
                            "no_channel",
                            1,
                            "hybrid_layer: group %r copy for %r dropped: not a channel of "
                            "this layer (bucket out of range)",
                            group,
                            channel,
                        )
                        continue
                    hit = self._remember_local(channel, dest.address)
                elif hit[0] != me or hit[1] != gen:  # another process's channel
                    others.append(channel)
                    continue
                _, _, _, bucket, cap = hit
                if own_pending(bucket) >= cap:
                    c.drop(
                        "full",
                        1,
                        "hybrid_layer: group %r copy for %r dropped: channel full",
                        group,
                        channel,
                    )
                    continue
                # the copy carries the member's channel name in the queue, the group's body
                self._deq(bucket, -1)
                self._put(channel, Item(expires_at, pos, bucket, body, name_len), loop)
                c.group_copies += 1
        if others:  # members that another process added (rare): a copy each
            msg = bytes(rec.message)
            for channel in others:
                r = self.send(channel, msg, expires_at)
                if r == OK:
                    c.group_copies += 1
                else:
                    self.count_forward_failure(r, channel)

    def _control(self, verb: str, args: list[Any]) -> None:
        if verb == "reader" and self.ns.is_leader and args:
            if self.cfg.broker:
                self.normal_names[name_hash("n", str(args[0]))] = str(args[0])
                if self.link is not None:
                    self.link.request_sync()
            else:
                self.forward_parked(str(args[0]))
        elif verb == "sync" and self.link is not None:
            self.link.request_sync()
        elif verb == "readers?":
            with self.lock:
                readers = list(self.readers)
            ld = self.ns.leader()
            sv = self.ns.slot(ld.slot) if ld.slot >= 0 else None
            if sv is not None:
                for channel in readers:
                    self.control(sv, "reader", channel)
        elif verb == "discard" and len(args) == 2:
            self.group_discard(str(args[0]), str(args[1]), local_only=True)

    # ================================================================ leader duties
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
                    self.counters.drop("expired", 1, _EXPIRED, channel, "parked", self.cfg.expiry)
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

    def reclaim_dead(self) -> None:
        # a dead leader's unread hand-offs are published by us instead, ahead of what
        # was handed to us since (they are older: FIFO per sender)
        salvaged: list[tuple[int, str, bytes, float, str | None]] = []

        def salvage(rec: Any) -> bool:
            if not self.ns.is_leader:
                return False
            k = rec.kind
            msg = rec.message
            if len(msg) and msg[0] == spill.TAG:
                msg = self._unspill_salvaged(rec)
                if msg is None:
                    return True
            salvaged.append((k, rec.name, bytes(msg), rec.expires_at, _out_key(k, rec.name)))
            return True

        for i in self.ns.live_slots():
            if i == self.slot or self.ns.owner_alive(i):
                continue
            pid = self.ns.reg_slot(i)[2]
            n = self.ns.reclaim(i, salvage if self.cfg.broker else None)
            if n >= 0:
                self.counters.drop(
                    "dead_reader",
                    n,
                    "hybrid_layer: reclaimed slot %d of dead process %d (%d unread messages "
                    "dropped, its group memberships released)",
                    i,
                    pid,
                    n,
                )
        if salvaged:
            self._take_over_out(salvaged)

    def _spill_failed(self, name: str, exc: Exception) -> None:
        """A large message whose segment cannot be had: a reference that is none (a bad
        or forged message: malformed) or a segment gone or unreadable (corrupt)."""
        self.counters.drop(
            "malformed" if isinstance(exc, spill.BadReference) else "corrupt",
            1,
            "hybrid_layer: a large message for %r dropped: %s",
            name,
            exc,
        )

    def _unspill_salvaged(self, rec: Any) -> memoryview | None:
        """A dead leader's hand-off whose message is in a segment of its own (named
        for the dead slot: any of this namespace's spill names is accepted here)."""
        try:
            return memoryview(spill.read(rec.message, spill.stem(self.ns.ns)))[rec.name_len :]
        except (spill.SpillError, OSError) as exc:
            self._spill_failed(rec.name, exc)
            return None

    def sweep_spills(self) -> None:
        """Backstop: remove this slot's large-message segments that no record can
        refer to any more (see ``shm.spill``)."""
        n = spill.sweep(
            spill.stem(self.ns.ns, self.slot),
            self._spill_stem,
            self.cfg.expiry + SPILL_GRACE,
        )
        if n:
            limited.warning(
                "spill-sweep",
                "hybrid_layer: removed %d large-message segment(s) no record referred to "
                "(a sender died while writing one)",
                n,
            )

    def _take_over_out(self, items: list[tuple[int, str, bytes, float, str | None]]) -> None:
        """Put a dead leader's hand-offs at the head of what we publish."""
        with self.lock:
            link = self.link
            if link is None:
                self.early_out.extendleft(reversed(items))
            else:
                link.out.extendleft(reversed(items))
                link.out_bytes += sum(len(it[2]) for it in items)
        if link is not None:
            link.kick()
        log.warning(
            "hybrid_layer: %d cross-host messages handed to the dead leader taken over",
            len(items),
        )

    # ================================================================ maintenance
    def check_flush(self) -> None:
        epoch, repaired = self.ns.flush_epoch_checked(self.flush_seen)
        if repaired:
            self.counters.repaired += 1
        if epoch == self.flush_seen:
            return
        with self.lock:
            if epoch == self.flush_seen:
                return
            self.flush_seen = epoch
            upto = self.ns.flush_upto()
            c = self.counters
            for store in (self.queues, self.parked):
                for channel in list(store):
                    q = store[channel]
                    kept = deque(i for i in q if i.pos >= upto)
                    n = 0
                    for item in q:
                        if item.pos < upto:
                            n += 1
                            if item.bucket >= 0:
                                self._deq(item.bucket, 1)
                    if n:
                        c.drop(
                            "flushed",
                            n,
                            "hybrid_layer: %d queued message(s) for %r flushed",
                            n,
                            channel,
                        )
                    if kept:
                        store[channel] = kept
                    else:
                        del store[channel]
            self.groups.clear()
            self.own.groups.clear()
            if self.link is not None:
                self.link.request_flush()
            for channel in self.readers:  # readers are live receivers: keep them
                self.own.groups.add(name_hash("n", channel))

    def check_words(self) -> int:
        """Validate this process's control words in shared memory and repair what a
        corrupted byte changed; each repair is counted (``repaired``) and logged.
        Called by the host thread every SWEEP_EVERY. Returns the repairs made."""
        fixed = self.ns.repair_own_words(self.ns.is_leader)
        own = self.own
        with self.lock:
            gs = own.groups
            if gs.cq[L.Q_GROUP_SEQ] & 1:  # we write it only under self.lock: stuck odd
                fixed.append(f"group set seqlock {gs.cq[L.Q_GROUP_SEQ]:#x}")
                gs.cq[L.Q_GROUP_SEQ] = (gs.cq[L.Q_GROUP_SEQ] + 1) & 0xFFFFFFFFFFFFFFFF
            want = {name_hash("g", g) for g in self.groups.groups}
            want |= {name_hash("n", ch) for ch in self.readers}
            want |= {name_hash("p", ch) for ch in self.parked}
            have = [v for v in gs.table if v]
            live = {v for v in have if v > TOMBSTONE}
            extra = {h for h in live - want if h & 3 != TAG_OTHER}  # (flags: the link's)
            if not want <= live or extra or gs.used != len(have) or gs.used > gs.slots:
                fixed.append(f"group set ({len(want - live)} missing, {len(extra)} foreign)")
                keep = want | {h for h in live if h & 3 == TAG_OTHER and h not in extra}
                gs.clear()
                for h in keep:
                    gs.add(h)
        if self._buckets_corrupt():
            with self.read_lock, self.ns.ring_locked(own):
                if own.ring.used() == 0:  # else: writers are busy, look again later
                    before = own.bk.tobytes()
                    self._resync_buckets()  # exact: the ring is empty
                    if own.bk.tobytes() != before:
                        fixed.append("capacity counters")
        if fixed:
            self.counters.repaired += len(fixed)
            limited.warning(
                "repaired",
                "hybrid_layer: repaired corrupted shared words of slot %d: %s",
                self.slot,
                "; ".join(fixed),
            )
        return len(fixed)

    def _buckets_corrupt(self) -> bool:
        """A capacity counter that cannot be: over every capacity (a writer counts a
        message only while its channel is under capacity; a negative difference is a
        huge one here), or - while the inbox is empty - not what is queued here."""
        own = self.own
        bk = own.bk
        cfg = self.cfg
        bound = max([cfg.capacity, *(c for _, c in cfg.channel_capacity)])
        local: dict[int, int] | None = None
        if own.ring.used() == 0:
            local = {}
            with self.lock:
                for store in (self.queues, self.parked):
                    for q in store.values():
                        for item in q:
                            if item.bucket >= 0:
                                local[item.bucket] = local.get(item.bucket, 0) + 1
        for k in range(0, len(bk), 2):
            d = (bk[k] - bk[k + 1]) & 0xFFFFFFFF
            if d > bound or (local is not None and d != local.get(k >> 1, 0)):
                return True  # (a race with a writer is rechecked under the ring lock)
        return False

    def sweep(self) -> None:
        """Drop expired messages from local queues (and parked ones)."""
        now = _monotonic()
        c = self.counters
        with self.lock:
            for store in (self.queues, self.parked):
                for channel in list(store):
                    q = store[channel]
                    n = 0
                    while q and q[0].expires_at < now:
                        item = q.popleft()
                        n += 1
                        if item.bucket >= 0:
                            self._deq(item.bucket, 1)
                    if n:
                        where = "parked" if store is self.parked else "in its queue"
                        c.drop("expired", n, _EXPIRED, channel, where, self.cfg.expiry)
                    if not q:
                        del store[channel]

    def pending(self) -> int:
        """Messages waiting for this process's channels: in its inbox ring and queues."""
        bk = self.own.bk
        total = 0
        for k in range(0, len(bk), 2):
            d = (bk[k] - bk[k + 1]) & 0xFFFFFFFF
            if d < 0x80000000:
                total += d
        return total

    # ================================================================ close
    def close(self) -> None:
        if self.closed:
            return
        fut = self.close_link_soon()
        if fut is not None:
            try:
                fut.result(LINK_CLOSE_WAIT)
            except Exception:
                log.exception("hybrid_layer: closing the RabbitMQ link failed")
        self.closed = True
        self.host.stop()
        if self.ns.is_leader and self.parked:
            self.ns.resign()
            dropped = sum(len(q) for q in self.parked.values())
            self.parked.clear()
            if dropped:
                self.counters.drop(
                    "no_channel",
                    dropped,
                    "hybrid_layer: %d messages parked for normal channels without a reader "
                    "dropped at close",
                    dropped,
                )
        with self.lock:
            waiters = [w for ws in self.waiters.values() for w in ws]
            self.waiters.clear()
            regs = list(self.loop_regs)
            self.loop_regs = weakref.WeakSet()
        for wloop, fut in waiters:
            with contextlib.suppress(RuntimeError):
                wloop.call_soon_threadsafe(_fail_closed, fut)
        bell = self.ns.bell
        for rloop in regs:
            if bell is None or rloop.is_closed():
                continue
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if rloop is running:
                rloop.remove_reader(bell.fd)
            else:
                with contextlib.suppress(RuntimeError):
                    rloop.call_soon_threadsafe(rloop.remove_reader, bell.fd)
        self._drop_unread()
        self.ns.publish_stats(self.counters.values())
        self.ns.detach()
        limited.flush(force=True)  # what was suppressed is not left unsaid

    def _drop_unread(self) -> None:
        """At close: count what is left unread in our queues and inbox ring (detach
        discards it), so that a close with messages waiting is no silent loss."""
        with self.lock:
            left = sum(len(q) for q in self.queues.values())
            self.queues.clear()
        ring = self.own.ring
        with self.ns.ring_locked(self.own):
            while True:
                try:
                    rec = ring.try_read()
                except RingCorrupt:
                    left += 1
                    break
                if rec is None:
                    break
                if rec.kind != L.KIND_CONTROL:
                    left += 1
        if left:
            self.counters.drop(
                "no_channel",
                left,
                "hybrid_layer: %d message(s) left unread in this process's inbox dropped at close",
                left,
            )

    def close_link_soon(self) -> concurrent.futures.Future[None] | None:
        """Broker mode: publish what is still queued for other hosts, then close the
        connection - on the host loop, after any start of the link already scheduled
        there. ``None`` if there is nothing to close (or we are that loop's thread)."""
        loop = self.host.loop
        if (
            not self.cfg.broker
            or self.link_closed
            or loop is None
            or threading.current_thread() is self.host
        ):
            return None
        return asyncio.run_coroutine_threadsafe(self._close_link(), loop)

    async def _close_link(self) -> None:
        if self.link is None and self.early_out and self.ns.is_leader:
            self.start_link()  # messages handed over before the link started
        self.link_closed = True
        link = self.link
        if link is not None:
            await link.aclose()  # hand-offs keep reaching it until it stops taking them
            self.link = None
        if self.early_out:
            self.counters.drop(
                "link_down",
                len(self.early_out),
                "hybrid_layer: %d message(s) for other hosts dropped at close: the RabbitMQ "
                "link never came up",
                len(self.early_out),
            )
            self.early_out.clear()

    def abandon(self) -> None:
        """In a forked child: forget the parent's attachment without touching it."""
        self.closed = True
        self.ns.abandon()


def _out_key(kind: int, name: str) -> str | None:
    """The capacity key of a hand-off: its destination host, or its normal channel."""
    if kind == L.KIND_OUT_DIRECT:
        addr = names.parse(name)
        return f"h:{addr.host_id}" if addr is not None else None
    if kind == L.KIND_OUT_NORMAL:
        return f"n:{name}"
    return None


def _fail_closed(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(LayerClosed("the channel layer was closed while receiving"))


def _finish_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Before the host loop closes: cancel what still runs on it (a link that was still
    connecting, aiormq's reader and writer) and let it unwind, as ``asyncio.run`` does,
    so nothing is left pending ("Task was destroyed but it is pending", a coroutine
    finalised after its loop closed)."""
    try:
        tasks = asyncio.all_tasks(loop)
        for t in tasks:
            t.cancel()
        if tasks:
            loop.run_until_complete(asyncio.wait(tasks, timeout=2.0))
        for t in tasks:
            if t.done() and not t.cancelled():
                t.exception()  # (retrieved: not logged as "never retrieved")
        loop.run_until_complete(loop.shutdown_asyncgens())
    except Exception:  # never let the thread's exit fail
        log.debug("hybrid_layer: unwinding the host loop's tasks failed", exc_info=True)


class HostThread(threading.Thread):
    """Per-process background loop: leader election, housekeeping, rescue drains.

    It owns an asyncio loop so that broker mode can run the leader's AMQP connection
    on it. It never touches the users' event loops.
    """

    def __init__(self, p: Participant) -> None:
        super().__init__(name=f"hybrid-layer-host-{p.slot}", daemon=True)
        self.p = p
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ready = threading.Event()
        self._next_reclaim = 0.0
        self._next_sweep = 0.0
        self._next_spill_sweep = 0.0

    def run(self) -> None:
        loop = self.loop = asyncio.new_event_loop()
        rescue = self.p.ns.rescue
        assert rescue is not None
        fd = rescue.fd
        loop.add_reader(fd, self._on_rescue)
        loop.call_soon(self._tick)
        self.ready.set()
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
            _finish_tasks(loop)
            loop.close()

    def start(self) -> None:
        super().start()
        self.ready.wait(5)

    def _on_rescue(self) -> None:
        p = self.p
        if p.closed or p.ns.rescue is None:
            return
        p.ns.rescue.drain()
        p.drain(None)

    def on_leadership(self) -> None:
        log.info("hybrid_layer: pid %d leads host %s", os.getpid(), self.p.cfg.host_id)
        self._next_reclaim = 0.0
        loop = self.loop
        if self.p.cfg.broker and loop is not None:
            if threading.current_thread() is self:
                self.p.start_link()
            else:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self.p.start_link)

    def _tick(self) -> None:
        p = self.p
        if p.closed or self.loop is None:
            return
        try:
            now = _monotonic()
            if not p.ns.is_leader and p.ns.try_lead():
                self.on_leadership()
            if p.ns.is_leader and now >= self._next_reclaim:
                self._next_reclaim = now + RECLAIM_EVERY
                p.reclaim_dead()
                if p.parked:
                    p.forward_parked()
                    p.unpark_idle()
            link = p.link
            if link is None and p.cfg.broker and p.ns.is_leader and not p.link_closed:
                p.start_link()  # (a failed start is retried here)
                link = p.link
            if link is not None:
                link.expire_full_flags()
                if p.interest_changed():
                    link.request_sync()
            if p.cfg.broker:
                p.watch_link()
            if p.readers:
                p.hand_back_idle()
            limited.flush()  # the suppressed drops' summaries that are due (a peek if none)
            if now >= self._next_sweep:
                self._next_sweep = now + SWEEP_EVERY
                p.drain(None)
                p.sweep()
                p.ns.registry_unlinked()
                p.check_words()
                p.ns.publish_stats(p.counters.values())
            if now >= self._next_spill_sweep:
                self._next_spill_sweep = now + min(SPILL_SWEEP_EVERY, max(1.0, p.cfg.expiry))
                p.sweep_spills()
        except Exception:
            log.exception("hybrid_layer: housekeeping failed; retrying")
        self.loop.call_later(TICK, self._tick)

    def stop(self) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
        if self.is_alive() and threading.current_thread() is not self:
            self.join(5)
