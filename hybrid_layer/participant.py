"""One participant: this process's slot on the host, its inbox and its share of the work.

Theory of operation
-------------------
A participant is what one process (one layer object) is on its host: a slot in the
host's namespace (``shm.registry.Namespace``) with an inbox ring, local queues, group
memberships, and - for one process per host - the leader's duties. This module is the
assembly: :class:`Participant` is made of one mixin per job, each in a module named
after it, sharing the state declared in ``state``:

==================  =======================================================
``sending``         ``send`` -> ring write, the route cache, hand-offs to the leader
``receiving``       local queues, ``take``, waiters, doorbell wake-ups
``draining``        the inbox ring -> local queues (``drain``, ``_dispatch``), control
``groups``          membership, ``group_send``, the fan-out to local members
``normal``          normal channels: readers, round robin, parking, hand-back
``housekeeping``    flushes, expiry sweeps, self-repair of shared words
==================  =======================================================

and owns two objects: its :class:`~.host_thread.HostThread` (election, housekeeping,
the broker link's loop) and, while it leads, a :class:`~.leadership.Leadership` (the
leader's duties). Here: the state (``__init__``), names, and closing.

To follow a message: ``layer.send`` -> ``sending.send`` -> ``Namespace.write`` (the
reader's ring) ... ``draining.drain`` -> ``_dispatch`` -> ``receiving._put`` ->
``receiving.take`` <- ``layer.receive``.

The link (``amqp.link.Link``, broker mode) is handed this object as its host and uses
only what ``amqp.host.LinkHost`` names: ``counters``, ``ns``, ``own``, ``lock``,
``normal_room``, ``normal_name``, ``interest``, ``deliver_normal``,
``count_forward_failure`` (and ``deliver_direct``, ``deliver_group``, ``cfg``).

Threading: ``lock`` guards queues, waiters, groups and the owner's bucket counters;
``read_lock`` makes the owner a single consumer of its ring across threads and loops
(see ``state``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import weakref
from collections import deque

from . import names
from ._log import limited
from .config import LayerConfig
from .draining import Draining
from .errors import LayerClosed
from .groups import Groups
from .host_thread import HostThread
from .housekeeping import Housekeeping
from .leadership import Leadership
from .normal import NormalChannels
from .receiving import Receiving
from .routing import GroupTable
from .sending import Sending
from .shm import layout as L
from .shm import spill
from .shm.registry import Namespace, SlotView
from .shm.ring import RingCorrupt
from .state import Item
from .stats import Counters

__all__ = ["LINK_CLOSE_WAIT", "Item", "Participant"]

log = logging.getLogger("hybrid_layer")

#: how long close() waits for the link to publish what is queued and close
LINK_CLOSE_WAIT = 6.0


class Participant(Sending, Receiving, Draining, Groups, NormalChannels, Housekeeping):
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
        self.link = None  # amqp.link.Link while we lead and a broker is configured
        self.leading = None  # Leadership while we lead (see leadership())
        self._lead_lock = threading.Lock()
        self.link_closed = False
        self._link_up_seen = False  # for on_disconnect / on_reconnect
        self._gap_told = False
        self._up_mark = (-1, -1)  # (leader epoch, link changes) when last seen up
        self._spill_stem = spill.stem(self.ns.ns, self.slot, self.gen)
        self.closed = False
        self.host = HostThread(self)
        self.host.start()

    def leadership(self) -> Leadership:
        """The leader's duties (``leadership.Leadership``): made the first time they are
        needed once this process holds the lease (callers have seen ``ns.is_leader``),
        dropped at close. Never called holding ``lock``."""
        lead = self.leading
        if lead is None:
            with self._lead_lock:
                lead = self.leading
                if lead is None:
                    lead = self.leading = Leadership(self)
        return lead

    def interest(self) -> tuple[set[int], set[int]] | None:
        """The link's question (leader): see ``Leadership.interest``."""
        return self.leadership().interest()

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
        for wloop, wfut in waiters:
            with contextlib.suppress(RuntimeError):
                wloop.call_soon_threadsafe(_fail_closed, wfut)
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
        self.ns.detach()  # (resigns the lease: the leader's duties end with it)
        self.leading = None
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
        lead = self.leading
        if self.link is None and lead is not None and lead.early_out and self.ns.is_leader:
            lead.start_link()  # messages handed over before the link started
        self.link_closed = True
        link = self.link
        if link is not None:
            await link.aclose()  # hand-offs keep reaching it until it stops taking them
            self.link = None
        lead = self.leading
        if lead is not None and lead.early_out:
            self.counters.drop(
                "link_down",
                len(lead.early_out),
                "hybrid_layer: %d message(s) for other hosts dropped at close: the RabbitMQ "
                "link never came up",
                len(lead.early_out),
            )
            lead.early_out.clear()

    def abandon(self) -> None:
        """In a forked child: forget the parent's attachment without touching it."""
        self.closed = True
        self.ns.abandon()


def _fail_closed(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(LayerClosed("the channel layer was closed while receiving"))
