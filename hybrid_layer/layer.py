"""The ``CHANNEL_LAYERS`` backend: validates arguments, encodes, delegates.

One :class:`HybridChannelLayer` object is one participant of its host namespace, attached
lazily on first use in each process (so an object created before ``fork()`` - gunicorn
``--preload`` - works in every child). ``send`` never waits on anything but a full inbox;
``receive`` sleeps on a file-descriptor doorbell in whatever event loop calls it.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import signal
import threading
import time
import weakref
from typing import Any, ClassVar

import msgspec
from channels.layers import BaseChannelLayer

from .config import LayerConfig, parse_config, shm_dir_problem
from .envelope import decode_message, encode_message
from .errors import ChannelFull, ChannelNotOwned, MessageTooLarge
from .names import parse
from .participant import LINK_CLOSE_WAIT, Item, Participant
from .shm import layout as L
from .shm.groupset import name_hash
from .shm.layout import Q_HEAD, Q_TAIL, STATS_FIELDS
from .shm.registry import FULL_RING, LINK_DOWN, NO_CHANNEL, OK
from .stats import (
    ChannelStatistics,
    Statistics,
    broker_counts,
    bucket_pending,
    integrity_counts,
    split,
)

_monotonic = time.monotonic
_perf = time.perf_counter
LINK_NAMES = {
    L.LINK_NONE: "none",
    L.LINK_DOWN: "down",
    L.LINK_UP: "up",
    L.LINK_CONNECTING: "connecting",
}
_layers: weakref.WeakSet[HybridChannelLayer] = weakref.WeakSet()
#: bumped in every forked child: a participant belongs to the process that attached it
#: (cheaper than comparing os.getpid() on every call)
_fork_gen = 0
#: names that passed channels' validation (a regex) are not checked again
VALID_NAMES_MAX = 65536

#: how long ``send`` waits for a live but busy reader to make room in its inbox
RING_FULL_WAIT = 0.5
#: receive_spin_us: after this many fruitless spins in a row, skip the next SPIN_BACKOFF
SPIN_MISSES_MAX = 8
SPIN_BACKOFF = 64
#: how long ``flush`` waits for every live process to apply it
FLUSH_WAIT = 2.0
#: how long the SIGTERM handler waits for the layers to close before the process dies
#: anyway (below docker's default stop timeout of 10 s; systemd's is 90 s)
SIGTERM_CLOSE_WAIT = 8.0


class HybridChannelLayer(BaseChannelLayer):  # type: ignore[misc]
    """Channel layer over POSIX shared memory on one host, RabbitMQ across hosts."""

    extensions: ClassVar[list[str]] = ["groups", "flush"]

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        cfg = parse_config(config, **kwargs)
        problem = shm_dir_problem(cfg.shm_dir)
        if problem:
            raise ValueError(f"CONFIG['shm_dir']: {problem}")
        super().__init__(expiry=cfg.expiry, capacity=cfg.capacity)
        self.config: LayerConfig = cfg
        self.group_expiry = cfg.group_expiry
        self.channel_capacity = list(cfg.channel_capacity)
        self._participant: Participant | None = None
        self._pid = 0
        self._gen = -1  # _fork_gen when _participant was attached
        self._valid: set[str] = set()
        self._spin = cfg.receive_spin_us / 1e6
        self._spin_misses = 0
        self._spin_skip = 0
        self._attach_lock = threading.Lock()
        self._finalizer: weakref.finalize[Any, Any] | None = None
        _layers.add(self)
        _install_sigterm_handler()

    # ------------------------------------------------------------------ plumbing
    def _p(self) -> Participant:
        p = self._participant
        if p is not None and self._gen == _fork_gen:
            return p
        with self._attach_lock:
            if self._participant is None or self._pid != os.getpid():
                p = self._participant = Participant(self.config)
                self._pid = os.getpid()
                # dropped without close() (a test building a layer per test, Django's
                # override_settings): leave the namespace when the object is collected
                self._finalizer = weakref.finalize(self, _release_collected, p)
                _install_sigterm_handler()
            self._gen = _fork_gen
            return self._participant

    def _valid_channel(self, name: str) -> None:
        """channels' own check (type, length, characters) of a name not seen yet (the
        callers look it up in ``_valid`` first: that lookup is the hot path)."""
        self.require_valid_channel_name(name)
        if len(self._valid) >= VALID_NAMES_MAX:
            self._valid.clear()
        self._valid.add(name)

    def _after_fork_in_child(self) -> None:
        p = self._participant
        self._participant = None
        self._attach_lock = threading.Lock()
        if self._finalizer is not None:
            self._finalizer.detach()  # (the parent's participant: never closed from here)
            self._finalizer = None
        if p is not None:
            p.abandon()

    def _check_size(self, data: bytes) -> None:
        if len(data) > self.config.max_message_bytes:
            self._p().counters.raised_too_large += 1
            raise MessageTooLarge(
                f"message is {len(data)} bytes encoded, over max_message_bytes="
                f"{self.config.max_message_bytes}"
            )

    # ------------------------------------------------------------------ core API
    async def new_channel(self, prefix: str = "specific.") -> str:
        if not isinstance(prefix, str):
            raise TypeError(f"new_channel prefix must be a str, got {type(prefix).__name__}")
        name = self._p().new_channel(prefix)
        self.require_valid_channel_name(name)
        return name

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        if channel not in self._valid:
            self._valid_channel(channel)
        data = encode_message(message)
        self._check_size(data)
        p = self._p()
        expires_at = _monotonic() + self.config.expiry
        r = p.send(channel, data, expires_at)
        if r == FULL_RING:
            r = await self._wait_for_room(p, channel, data, expires_at)
        c = p.counters
        if r == OK:
            c.sent += 1
        elif r == LINK_DOWN:
            p.count_link_drop(channel)
        elif r == NO_CHANNEL:
            c.drop(
                "no_channel",
                1,
                "hybrid_layer: message to %r dropped: no such channel on this "
                "host (its process is gone, or the name is not one of this layer's)",
                channel,
            )
        else:
            c.raised_full += 1
            raise ChannelFull(channel)

    async def _wait_for_room(
        self, p: Participant, channel: str, data: bytes, expires_at: float
    ) -> int:
        """The reader's inbox is full: it may just be busy. Wait a little, then give up."""
        deadline = _monotonic() + RING_FULL_WAIT
        delay = 0.0005
        while True:
            await asyncio.sleep(delay)
            r = p.send(channel, data, expires_at)
            if r != FULL_RING or _monotonic() >= deadline:
                return r
            delay = min(delay * 2, 0.02)

    async def receive(self, channel: str) -> dict[str, Any]:
        if channel not in self._valid:
            self._valid_channel(channel)
        p = self._p()
        ring_q = p.own.ring.q
        while True:
            if ring_q[Q_TAIL] != ring_q[Q_HEAD]:
                # records still in the inbox come first: a group copy is checked against
                # capacity before what is queued makes room, as if fanned out when sent
                p.drain(asyncio.get_running_loop())
            item = p.take(channel)
            if item is None:
                if "!" not in channel:
                    p.ensure_reader(channel)
                elif not p.owns(channel):
                    raise ChannelNotOwned(
                        f"receive({channel!r}): this process did not create that channel, "
                        "so nothing sent to it can reach this process; receive only on "
                        "names from this layer's new_channel() in this process (or on "
                        "normal channels, without '!')"
                    )
                loop = asyncio.get_running_loop()
                if p.drain(loop):
                    item = p.take(channel)
                if item is None and self._spin:
                    item = self._spin_take(p, channel, loop)
                while item is None:
                    fut: asyncio.Future[None] = loop.create_future()
                    p.add_waiter(channel, loop, fut)
                    try:
                        await fut
                    except BaseException:  # cancelled: maybe woken first, so pass it on
                        p.remove_waiter(channel, loop, fut, True)
                        raise
                    p.remove_waiter(channel, loop, fut, False)
                    item = p.take(channel)
            try:
                return decode_message(memoryview(item.body)[item.name_len :])
            except msgspec.DecodeError as exc:  # (MalformedMessage) outside the contract
                c = p.counters
                c.received -= 1
                c.drop(
                    "malformed",
                    1,
                    "hybrid_layer: malformed message for %r dropped: %s",
                    channel,
                    exc,
                )

    def _spin_take(
        self, p: Participant, channel: str, loop: asyncio.AbstractEventLoop
    ) -> Item | None:
        """``receive_spin_us``: poll the inbox a moment before sleeping on the doorbell.

        A reply that comes within the spin costs no kernel wake-up on either side (the
        sender sees no sleeper, so it does not ring). Only while the event loop has
        nothing else ready to run, and only while spinning pays: after
        ``SPIN_MISSES_MAX`` spins in a row that found nothing, the next
        ``SPIN_BACKOFF`` receives sleep at once.
        """
        if self._spin_skip:
            self._spin_skip -= 1
            return None
        ready = getattr(loop, "_ready", None)  # asyncio's run queue (uvloop: unknown)
        if ready:
            return None
        ring_q = p.own.ring.q
        deadline = _perf() + self._spin
        while _perf() < deadline:
            if ring_q[Q_TAIL] != ring_q[Q_HEAD]:
                p.drain(loop)
                item = p.take(channel)
                if item is not None:
                    self._spin_misses = 0
                    return item
        self._spin_misses += 1
        if self._spin_misses >= SPIN_MISSES_MAX:
            self._spin_misses = 0
            self._spin_skip = SPIN_BACKOFF
        return None

    # ------------------------------------------------------------------ groups
    async def group_add(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        p = self._p()
        if p.group_add(group, channel) and self.config.broker:
            await p.wait_bound()  # so that a group_send from another host finds it

    async def group_discard(self, group: str, channel: str) -> None:
        self.require_valid_channel_name(channel)
        self.require_valid_group_name(group)
        self._p().group_discard(group, channel)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        self.require_valid_group_name(group)
        data = encode_message(message)
        self._check_size(data)
        self._p().group_send(group, data, _monotonic() + self.config.expiry)

    # ------------------------------------------------------------------ flush / close
    async def flush(self) -> None:
        """Empty every inbox and queue and forget every group, on the whole host.

        Returns once every live process has applied it (at most ``FLUSH_WAIT`` s; a
        process that is stopped or stuck is named in a warning instead).
        """
        p = self._p()
        epoch = p.ns.flush_all()
        p.drain(None)  # applies it here: queues, groups, ring, capacity counters
        deadline = _monotonic() + FLUSH_WAIT
        while (left := p.ns.flush_unacked(epoch)) and _monotonic() < deadline:
            await asyncio.sleep(0.001)
        if left:
            logging.getLogger("hybrid_layer").warning(
                "hybrid_layer: flush not applied within %.1fs by slots %s (stopped or busy "
                "processes); they will apply it when they resume",
                FLUSH_WAIT,
                left,
            )

    async def close(self) -> None:
        p = self._participant
        fut = p.close_link_soon() if p is not None and self._pid == os.getpid() else None
        if fut is not None:  # publish what other hosts still have to get, not blocking
            try:
                await asyncio.wait_for(asyncio.wrap_future(fut), LINK_CLOSE_WAIT)
            except Exception:
                logging.getLogger("hybrid_layer").exception(
                    "hybrid_layer: closing the RabbitMQ link failed"
                )
        self.close_sync()

    def close_sync(self) -> None:
        """Leave the host namespace; the last process out removes the shared memory."""
        p = self._participant
        self._participant = None
        fin = self._finalizer
        if fin is not None:
            fin.detach()
            self._finalizer = None
        if p is not None and self._pid == os.getpid():
            p.close()

    # ------------------------------------------------------------------ statistics
    def statistics(self) -> Statistics:
        """This process's counters and its view of the host."""
        p = self._p()
        raised, dropped = split(p.counters.as_dict())
        ring = p.own.ring
        ld = p.ns.leader()
        c = p.counters
        return Statistics(
            sent=c.sent,
            received=c.received,
            group_sends=c.group_sends,
            group_copies=c.group_copies,
            raised=raised,
            dropped=dropped,
            pending=p.pending(),
            ring_used_bytes=ring.used(),
            ring_size_bytes=ring.size,
            participants=len(p.ns.live_slots()),
            leader_pid=ld.pid,
            leader_epoch=ld.epoch,
            is_leader=p.ns.is_leader,
            pid=os.getpid(),
            slot=p.slot,
            extra={
                "groups": len(p.groups),
                "normal_readers": len(p.readers),
                "parked": sum(len(q) for q in p.parked.values()),
                # sends whose wake-up was not written: the bell was not a FIFO of ours
                "doorbells_refused": p.ns.doorbells_refused(),
                **integrity_counts(p.counters.as_dict()),
            },
            broker=self._broker_info(p, p.counters.as_dict()),
        )

    def _broker_info(self, p: Participant, counts: dict[str, int]) -> dict[str, Any]:
        """The leader's link as this process sees it (plus details if it leads)."""
        if not self.config.broker:
            return {}
        state, syncs, changes = p.ns.link_state()
        info: dict[str, Any] = {
            "link": LINK_NAMES.get(state, "none"),
            "link_changes": changes,
            "binding_syncs": syncs,
            # why it is not up ("" while up); the leader's own entry says more
            "reason": L.REASONS.get(p.ns.link_get(L.LQ_REASON, p.ns.leader().slot), "")
            if state != L.LINK_UP
            else "",
            "last_sync": p.ns.link_get(L.LQ_SYNC_AT, p.ns.leader().slot) / 1000.0,
            **broker_counts(counts),
        }
        link = p.link
        if link is not None:
            info.update(link.info())
        return info

    def global_statistics(self) -> Statistics:
        """Counters summed over every live participant of the host (mirrored ~1/s).

        ``pending`` is read live from shared memory, not from the mirror: the messages
        waiting for a receiver on this host, summed over every live participant's
        capacity counters (each process channel's and normal channel's ``enq - deq``,
        the same numbers ``capacity`` is checked against). That covers what waits in
        inbox rings, in local queues and parked with the leader for a normal channel
        without a reader. Not in it: a group message still in a member's ring (counted
        once fanned out) and cross-host messages the leader holds (``broker``'s
        ``outbound``, ``in_flight``, ``held``); ``ring_used_bytes`` shows the former.
        """
        p = self._p()
        p.ns.publish_stats(p.counters.values())
        totals = dict.fromkeys(STATS_FIELDS, 0)
        live = p.ns.live_slots()
        ring_used = 0
        pending = 0
        for i in live:
            for k, v in zip(STATS_FIELDS, p.ns.slot_stats(i), strict=True):
                totals[k] += v
            sv = p.ns.slot(i)
            if sv is not None:
                ring_used += sv.ring.used()
                pending += bucket_pending(sv.bk)
        raised, dropped = split(totals)
        ld = p.ns.leader()
        return Statistics(
            sent=totals["sent"],
            received=totals["received"],
            group_sends=totals["group_sends"],
            group_copies=totals["group_copies"],
            raised=raised,
            dropped=dropped,
            pending=pending,
            ring_used_bytes=ring_used,
            ring_size_bytes=p.own.ring.size * len(live),
            participants=len(live),
            leader_pid=ld.pid,
            leader_epoch=ld.epoch,
            is_leader=p.ns.is_leader,
            pid=os.getpid(),
            slot=p.slot,
            extra=integrity_counts(totals),
            broker=self._broker_info(p, totals),
        )

    def channel_statistics(self, channel: str) -> ChannelStatistics:
        """Messages waiting on ``channel`` (its reader's capacity counters) and capacity."""
        self.require_valid_channel_name(channel)
        p = self._p()
        cap = self.config.capacity_for(channel)
        if "!" in channel:
            addr = parse(channel)
            if addr is None or addr.host_id != self.config.host_id or addr.bucket >= p.K:
                return ChannelStatistics(channel, 0, cap, False)
            sv = p.ns.slot(addr.slot)
            pending = sv.pending(addr.bucket) if sv is not None and sv.gen == addr.gen else 0
            return ChannelStatistics(channel, pending, cap, True)
        # a normal channel's messages wait with its readers and, parked, with the leader
        bucket = p.normal_bucket(channel)
        holders = {sv.index: sv for sv in p.ns.slots_with(name_hash("n", channel))}
        leader = p.ns.slot(p.ns.leader().slot) if p.ns.leader().slot >= 0 else None
        if leader is not None:
            holders[leader.index] = leader
        pending = sum(sv.pending(bucket) for sv in holders.values())
        return ChannelStatistics(channel, pending, cap, True)

    def __repr__(self) -> str:
        return f"<HybridChannelLayer {self.config.namespace}>"


def _after_fork_in_child() -> None:
    global _fork_gen
    _fork_gen += 1
    for layer in list(_layers):
        layer._after_fork_in_child()


def _release_collected(p: Participant) -> None:
    """A layer object was garbage-collected while attached: leave the namespace.

    Collection can happen in any thread, the host thread and a running event loop's
    included, so the close (which may wait for the link to publish what is queued)
    runs on a thread of its own; at interpreter exit it runs here.
    """
    if p.closed or p.pid != os.getpid():
        return
    try:
        threading.Thread(target=_close_quietly, args=(p,), name="hybrid-layer-release").start()
    except RuntimeError:  # interpreter shutting down: no new threads
        _close_quietly(p)


def _close_quietly(p: Participant) -> None:
    try:
        p.close()
    except Exception:  # pragma: no cover - best effort
        logging.getLogger("hybrid_layer").exception("hybrid_layer: releasing a layer failed")


def _close_all_at_exit() -> None:
    """Servers rarely call ``close()``: leave the namespace cleanly at interpreter exit,
    so the last process out still removes the shared-memory names."""
    for layer in list(_layers):
        try:
            layer.close_sync()
        except Exception:  # pragma: no cover - best effort at exit
            logging.getLogger("hybrid_layer").exception("hybrid_layer: close at exit failed")


_sigterm_installed = False


def _install_sigterm_handler() -> None:
    """Close the layers on SIGTERM (systemd's and docker's stop signal), where that is
    safe: only from the main thread, and only while SIGTERM has its default disposition
    - a handler someone else installed (uvicorn, gunicorn, the application) is never
    replaced; there the server's own shutdown (the ASGI lifespan wrapper of
    ``hybrid_layer.asgi``) closes. Installed once per process; a handler installed
    later by anyone simply replaces it."""
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # (not the main interpreter, no signals here)
        return
    _sigterm_installed = True


#: how long a SIGTERM waits for the main thread's event loop to run the close
SIGTERM_LOOP_WAIT = 1.0


def _on_sigterm(signum: int, frame: object) -> None:
    """Leave the namespace (the last process out removes the names, another frees its
    slot at once), then die of SIGTERM as if there had been no handler: same exit
    status, same meaning for the supervisor. A second SIGTERM ends it at once.

    A signal handler runs in the main thread between two bytecodes: maybe in the middle
    of a ``send`` holding one of the layer's locks, which the close needs. When the main
    thread runs an event loop (``runworker``, a consumer), the close is therefore done
    from that loop's next callback, where no layer code is half-way through; otherwise
    (the main thread blocked in ``async_to_sync``, a sleep) at once.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    loop = asyncio._get_running_loop()
    if loop is not None and not loop.is_closed():
        started = threading.Event()
        try:
            loop.call_soon_threadsafe(_close_then_die, started)
        except RuntimeError:  # (closing under us: do it here)
            pass
        else:
            # a loop whose tasks never yield would never run it: then die within a
            # second without a clean close (as with SIGKILL: the leader reclaims the slot)
            threading.Thread(target=_unless_started, args=(started,), daemon=True).start()
            return
    _close_then_die()


def _unless_started(started: threading.Event) -> None:
    if not started.wait(SIGTERM_LOOP_WAIT):
        logging.getLogger("hybrid_layer").warning(
            "hybrid_layer: SIGTERM: the event loop did not run the close within %.0f s "
            "(a task that never yields?); exiting without it",
            SIGTERM_LOOP_WAIT,
        )
        os.kill(os.getpid(), signal.SIGTERM)


def _close_then_die(started: threading.Event | None = None) -> None:
    """The close runs in a thread and gets at most ``SIGTERM_CLOSE_WAIT`` s (then the
    process dies without a clean close, as with SIGKILL, and the leader reclaims its
    slot); then SIGTERM again, now with the default disposition."""
    if started is not None:
        started.set()
    closer = threading.Thread(target=_close_all_at_exit, name="hybrid-layer-sigterm", daemon=True)
    closer.start()
    closer.join(SIGTERM_CLOSE_WAIT)
    if closer.is_alive():
        logging.getLogger("hybrid_layer").warning(
            "hybrid_layer: SIGTERM: the layers did not close within %.0f s; exiting anyway",
            SIGTERM_CLOSE_WAIT,
        )
    signal.raise_signal(signal.SIGTERM)
    # still here: the default disposition ignores SIGTERM, which the kernel does for a
    # namespace's init - python as PID 1 in a container without --init. Exit as a
    # SIGTERM'd process would (a closed layer must not go on serving)
    os._exit(128 + signal.SIGTERM)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all_at_exit)
