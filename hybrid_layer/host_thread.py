"""The host thread: each process's background loop (election, housekeeping, rescues).

Theory of operation
-------------------
Every participant starts one daemon thread with an asyncio loop of its own; it never
touches the users' event loops. Every ``TICK`` it:

- tries to take the leader lease if nobody holds it (a dead leader's lock was released
  by the kernel), and while we lead runs the leader's duties (``Leadership.tick``:
  reclaiming dead slots, parked messages, starting the link);
- broker mode: watches the leader's link for gaps (``groups.watch_link``);
- gives back what waits for a normal channel this process stopped receiving;
- every ``SWEEP_EVERY``: drains the inbox (a receiver may be slow to), drops expired
  messages, checks and repairs its shared words, publishes its statistics;
- every ``SPILL_SWEEP_EVERY`` (at most ``expiry``): removes stray large-message segments.

It also watches the *rescue* FIFO (``_on_rescue``): a writer rings it when the ring is
full or past half full, when the owner's doorbell failed, or for a record that must not
wait for a receiver (``Namespace.write``'s ``urgent``: group, normal-channel, control
records, hand-offs), and the host thread drains - so a process with no receiver
running still empties its inbox.

In broker mode the leader's AMQP link (``amqp.link.Link``) runs on this loop; before the
loop closes, ``_finish_tasks`` cancels and unwinds whatever still runs on it. State: the
loop, the sweep schedules. Nothing here is on a per-message path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from ._log import limited

if TYPE_CHECKING:
    from .participant import Participant

log = logging.getLogger("hybrid_layer")

_monotonic = time.monotonic
TICK = 0.1  # host thread period: election attempts, housekeeping
SWEEP_EVERY = 1.0
#: the owner's sweep of its own large-message segments that no record refers to (a
#: writer killed before it published the record): every this many seconds (at most
#: ``expiry``), those older than ``expiry`` + ``housekeeping.SPILL_GRACE``
SPILL_SWEEP_EVERY = 30.0


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
        lead = self.p.leadership()
        lead.next_reclaim = 0.0
        loop = self.loop
        if self.p.cfg.broker and loop is not None:
            if threading.current_thread() is self:
                lead.start_link()
            else:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(lead.start_link)

    def _tick(self) -> None:
        p = self.p
        if p.closed or self.loop is None:
            return
        try:
            now = _monotonic()
            if not p.ns.is_leader and p.ns.try_lead():
                self.on_leadership()
            if p.ns.is_leader:  # reclaim, parked messages, the link (a link implies this)
                p.leadership().tick(now)
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
