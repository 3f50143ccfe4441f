"""The ``CHANNEL_LAYERS`` backend: validates arguments, encodes, delegates.

One :class:`HybridChannelLayer` object is one participant of its host namespace, attached
lazily on first use in each process (so an object created before ``fork()`` - gunicorn
``--preload`` - works in every child). ``send`` never waits on anything but a full inbox;
``receive`` sleeps on a file-descriptor doorbell in whatever event loop calls it.

This module is the API surface and its hot paths (``send``, ``receive``, the groups,
``flush``, ``close``): it validates and encodes, then hands to the process's
``Participant``. The statistics it reports are assembled in ``reporting``; leaving the
namespace at exit, on SIGTERM and when a layer is garbage-collected is ``shutdown``'s
job. The fork hook stays here: ``_p()`` compares ``_fork_gen`` on every call.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from typing import Any, ClassVar

import msgspec
from channels.layers import BaseChannelLayer

from . import reporting
from .config import LayerConfig, parse_config, shm_dir_problem
from .envelope import decode_message, encode_message
from .errors import ChannelFull, ChannelNotOwned, MessageTooLarge
from .participant import LINK_CLOSE_WAIT, Item, Participant
from .shm.layout import Q_HEAD, Q_TAIL
from .shm.registry import FULL_RING, LINK_DOWN, NO_CHANNEL, OK
from .shutdown import _install_sigterm_handler, _layers, _release_collected
from .stats import ChannelStatistics, Statistics

_monotonic = time.monotonic
_perf = time.perf_counter
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
        return reporting.process_statistics(self._p(), self.config)

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
        return reporting.host_statistics(self._p(), self.config)

    def channel_statistics(self, channel: str) -> ChannelStatistics:
        """Messages waiting on ``channel`` (its reader's capacity counters) and capacity."""
        self.require_valid_channel_name(channel)
        return reporting.channel_statistics(self._p(), self.config, channel)

    def __repr__(self) -> str:
        return f"<HybridChannelLayer {self.config.namespace}>"


def _after_fork_in_child() -> None:
    global _fork_gen
    _fork_gen += 1
    for layer in list(_layers):
        layer._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
