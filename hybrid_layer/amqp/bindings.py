"""Bindings: keep the broker's side equal to this host's interest; flush.

The host's queue is bound to the groups exchange for each group with a member on this
host, and the link consumes the shared queue of each normal channel with a reader on
this host. Both sets are read from shared memory (``LinkHost.interest``: the tagged hash
sets every participant publishes), so the link never hears about a ``group_add`` as
such: the host thread notices a change (``interest_changed``) and calls
``request_sync``; the ``_syncer`` task (run by ``connection._serve``) then ``_sync``\\s:

* new bindings pipelined (``queue.bind`` no-wait, then one synchronous passive
  declare as the fence: the broker answers it only after every bind before it); gone
  ones unbound;
* normal channels: declared (``_declare_normal``, on a channel of its own: a host with
  other ``capacity``/``expiry`` settings makes it fail, which must not take the link
  down) and consumed; no longer read: cancelled; paused ones (their readers here full,
  ``delivery``) skipped until their pause ends.

Each completed sync is counted (``syncs``, ``LQ_SYNCS``; ``LQ_SYNCS_STARTED`` before):
participants wait on it where they need a binding in place. ``request_flush`` makes the
syncer ``_purge`` first: forget what is queued here and purge the host's and the normal
channels' queues on the broker.

State owned here: ``bound``, ``consuming``, ``declared``, ``paused``, ``syncs``,
``last_sync_wall``, ``_sync_wanted``, ``_flush_wanted``. Called from any thread
(``request_*``) and the loop; not per message (``_declare_normal`` also runs from the
publisher for a normal channel not declared in ``DECLARE_AGAIN`` s).
"""

from __future__ import annotations

import contextlib
import time

import aiormq

from .._log import limited
from ..shm import layout as L
from .state import LinkState
from .topology import group_key, normal_queue, normal_queue_args


class Bindings(LinkState):
    """The host queue's bindings and the normal-channel consumers, synced to interest."""

    def request_sync(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._sync_wanted.set)

    def request_flush(self) -> None:
        self._flush_wanted = True
        self.request_sync()

    def _bump_syncs(self) -> None:
        self.syncs += 1
        self.last_sync_wall = time.time()
        self.p.ns.link_set(L.LQ_SYNC_AT, int(self.last_sync_wall * 1000))
        self.p.ns.link_set(L.LQ_SYNCS, self.syncs)

    async def _declare_normal(self, h: int, channel: str) -> None:
        """Declare a normal channel's shared queue on a channel of its own: a host with
        other ``capacity``/``expiry`` settings (a rolling config change) makes this fail
        with PRECONDITION_FAILED, which must not take the link down."""
        name = normal_queue(self.cfg.prefix, h)
        tmp = await self.conn.channel(publisher_confirms=False)
        try:
            await tmp.queue_declare(name, arguments=normal_queue_args(self.cfg, channel))
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

    async def _syncer(self) -> None:
        while True:
            await self._sync_wanted.wait()
            self._sync_wanted.clear()
            if self._flush_wanted:
                self._flush_wanted = False
                await self._purge()
            await self._sync()

    async def _sync(self) -> bool:
        """Make the broker's bindings and normal-channel consumers match this host's
        interest; False if a group set was mid-rebuild (nothing done: try again).

        New bindings are pipelined: ``queue.bind`` with no-wait, one after another,
        then one synchronous call on the same channel, which the broker answers only
        after every bind before it (a failed bind closes the channel instead)."""
        self.p.ns.link_set(L.LQ_SYNCS_STARTED, self.syncs + 1)
        interest = self.p.interest()
        if interest is None:  # a set was mid-rebuild: try again shortly
            self.p.ns.link_set(L.LQ_SYNCS_STARTED, self.syncs)
            self.loop.call_later(0.01, self._sync_wanted.set)
            return False
        groups, normals = interest
        ch, cfg = self.ch, self.cfg
        new = groups - self.bound
        for h in new:
            await ch.queue_bind(
                self.queue, cfg.groups_exchange, routing_key=group_key(cfg.prefix, h), nowait=True
            )
        if new:
            await ch.queue_declare(self.queue, passive=True)  # the fence
            self.bound |= new
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
        return True

    async def _purge(self) -> None:
        """flush(): empty what this host owns on the broker (and holds for its readers)."""
        n = self._take_all() + self._clear_held()
        if n:
            self.p.counters.drop(
                "flushed", n, "hybrid_layer: %d message(s) for or from other hosts flushed", n
            )
        with contextlib.suppress(Exception):
            await self.ch.queue_purge(self.queue)
        for h in set(self.consuming) | set(self.declared):
            with contextlib.suppress(Exception):
                await self.ch.queue_purge(normal_queue(self.cfg.prefix, h))
