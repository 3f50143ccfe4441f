"""The link's state, in one place: ``LinkState``, the base of every part of the link.

``amqp.link.Link`` is assembled from mixins, one module per job (``connection``,
``publisher``, ``confirms``, ``bindings``, ``delivery``, ``holding``, ``deadletters``).
They share one object and its attributes (``self.ch``, ``self.out``, ...) so that the hot
paths (publish, confirm, delivery) keep plain ``self.x`` lookups; this module says what
that state is and which part writes it (``LinkState.__init__``, grouped by part), and
declares, for the type checker only, the methods one part calls on another.

Also here: ``Pub``, one AMQP message published or about to be (the publisher makes
it, confirms/retries keep it until the broker confirms it, a new connection publishes
it again), and the ``Out`` tuple of the outbound queue.

Threads: everything is touched on the host thread's event loop, except what
``submit`` and ``kick`` touch from any thread (a sender in the leader process):
``out`` and ``out_bytes`` (changed together under ``out_lock``), ``busy``, ``_kicked``
and ``closing``; senders also read ``full`` and ``busy`` (``Participant.hand_off``).
Nothing here runs per message: it is construction, and declarations.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

from ..shm import layout as L
from . import wire
from .dedup import DedupTable
from .topology import host_queue

if TYPE_CHECKING:
    from aiormq.abc import DeliveredMessage

    from .host import LinkHost

MAX_IN_FLIGHT = 4096  # publishes awaiting a confirm
HOST_PREFETCH = 64  # unacknowledged deliveries from the host queue (AMQP messages, each a
# batch of up to CONFIG publish_batch messages)

#: one outbound message: (kind, name, payload, expires_at, capacity key); the payload may
#: be a view of an immutable record body (never of shared memory)
Out = tuple[int, str, bytes | memoryview, float, str | None]


class Pub:
    """One AMQP message published (or about to be): kept until the broker confirms it,
    so that it can be published again after a lost connection or a return."""

    __slots__ = (
        "body",
        "dest",
        "gen",
        "key",
        "kind",
        "n",
        "nacked",
        "name",
        "order",
        "sealed",
        "seq",
        "until",
    )

    def __init__(
        self,
        kind: int,
        name: str,
        key: str | None,
        dest: tuple[str, str, bool],
        body: bytes | wire.Parts,  # a large message's frame not joined
        n: int,
        until: float,
    ) -> None:
        self.kind, self.name, self.key, self.dest = kind, name, key, dest
        self.body, self.n, self.until = body, n, until  # until: the latest frame's expiry
        self.seq = 0
        self.gen = 0  # the connection it was published on
        self.order = 0  # the seq it was first published with (its place in its stream)
        self.nacked = False  # rejected by its queue (full or failing) at least once
        self.sealed: tuple[int, bytes] | None = None  # (seq, body sealed with that id)


class LinkState:
    """Every attribute of the link, set up before the link starts (``Link.__init__``)."""

    task: asyncio.Task[None]  # the connection loop (``Connection._run``), set by Link

    def __init__(self, p: LinkHost, loop: asyncio.AbstractEventLoop) -> None:
        self.p = p
        cfg = self.cfg = p.cfg
        self.loop = loop
        self.thread_id = threading.get_ident()
        self.crypter = wire.Crypter(cfg.encryption_keys) if cfg.encryption_keys else None
        self.queue = host_queue(cfg.prefix, cfg.host_id)
        self.closing = False

        # ---- connection (connection.py): the connection, its channels and its state
        self.state = L.LINK_NONE
        self.reason = ""  # why the link is not up, for logs and statistics
        self.ever_up = False
        self.url_index = 0
        self.connect_failures = 0  # failed attempts to connect, since the start
        self.url = ""
        self.conn: Any = None
        self.ch: Any = None  # publishing, host queue, bindings
        self._fast_publish = False  # publishes queued by _publish_frame (see there)
        self.nch: Any = None  # normal-channel queues (prefetch, acks)
        self.conn_gen = 0

        # ---- publishing (publisher.py): the outbound queue, handed over from any thread
        self.out: deque[Out] = deque()
        self.out_bytes = 0
        # out and out_bytes change together under this lock: senders' threads append,
        # the link's loop pops (a += on an attribute from two threads can lose an update)
        self.out_lock = threading.Lock()
        self.limit, self.limit_bytes = cfg.outbound_limit, cfg.outbound_limit_bytes
        self.busy = False
        self._kicked = False
        self._publishing = False  # the publisher task is at work (not waiting for _wake)
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.nonce = random.getrandbits(63) | 1
        self.seq = 0

        # ---- confirms (confirms.py): what awaits the broker's word, and what it refused
        # publishes awaiting a confirm, in publish order (seq); those of a lost
        # connection are published again on the next one (same ids: deduplicated)
        self.unconfirmed: dict[int, Pub] = {}
        # routing key -> messages returned for want of a queue (a host not up yet) and
        # everything for that queue published after them, in order. One at a time is
        # tried (the probe) until the broker routes it; then the rest go, in order.
        self.retry: dict[str, deque[Pub]] = {}
        self.probing: dict[str, Pub] = {}  # routing key -> the probe awaiting its fate
        self.retry_timer: dict[str, asyncio.TimerHandle] = {}
        self.retry_delay: dict[str, float] = {}
        self.retry_count = 0
        self.full: dict[str, float] = {}  # destination key -> flagged at (monotonic)
        # destination key -> routing key of a queue found full: flagged while messages
        # rejected by it wait to be tried again
        self.full_waiting: dict[str, str] = {}
        self._nack_checked: dict[str, float] = {}  # routing key -> last looked at
        # routing key -> since when its queue, NOT full, rejects everything (confirms.py)
        self.failing_since: dict[str, float] = {}
        self.forced_at = 0.0  # when _confirm_watch last ended a connection

        # ---- bindings (bindings.py): the broker's side of this host's interest
        self.bound: set[int] = set()
        self.consuming: dict[int, str] = {}  # normal hash -> consumer tag
        self.declared: dict[int, float] = {}  # normal hash -> when we declared it
        self.paused: dict[int, float] = {}  # normal hash -> consume again after
        self.syncs = 0
        self.last_sync_wall = 0.0
        self._sync_wanted = asyncio.Event()
        self._flush_wanted = False

        # ---- delivery (delivery.py, deadletters.py)
        self.dedup = DedupTable(p.ns.reg_q, L.DQ_BASE, L.DEDUP_ENTRIES)
        self.dedup.claim_own(self.nonce)  # our group sends' echoes are no spoofs
        self.seen: set[str] = set()  # normal-channel message ids delivered here
        self.seen_order: deque[str] = deque()
        self.max_frame = cfg.max_message_bytes + 4096  # frames over it dropped on arrival
        self.dead_lettered: dict[str, int] = {}  # the broker's drops, by reason

        # ---- holding and acks (holding.py)
        self._prefetch = min(HOST_PREFETCH, cfg.remote_capacity)
        self._ack_tag = 0
        self._ack_scheduled = False
        self._ack_held_back = False
        self._ack_task: asyncio.Future[Any] | None = None  # the one basic.ack under way
        # direct messages from other hosts waiting for room in a busy reader's inbox
        self.held: dict[str, deque[tuple[bytes | memoryview, float]]] = {}
        self.held_total = 0
        self.held_bytes = 0
        self._held_epoch = 0  # the host's flush epoch when the oldest held message came
        self._retry_handle: asyncio.TimerHandle | None = None

    if TYPE_CHECKING:  # what one part calls on another (defined in the part named)
        # connection.py
        def _set_state(self, state: int, reason: int = 0, text: str = "") -> None: ...
        async def _run(self) -> None: ...
        # publisher.py
        @property
        def in_flight(self) -> int: ...
        async def _publisher(self) -> None: ...
        async def _republish(self) -> None: ...
        def _take_all(self) -> int: ...
        def _expire_out(self) -> None: ...
        def _emit(self, pub: Pub) -> Any: ...
        # confirms.py
        async def _confirm_watch(self) -> None: ...
        def _confirmed(self, fut: asyncio.Future[Any], pub: Pub) -> None: ...
        def _returned(self, pub: Pub) -> None: ...
        def _keep_for_retry(self, pub: Pub) -> None: ...
        def _flag_full(self, key: str) -> None: ...
        def _diagnose_nack(self, pub: Pub) -> None: ...
        def _schedule_probe(self, rk: str, delay: float | None = None) -> None: ...
        def _release(self, rk: str) -> None: ...
        def expire_kept_soon(self, rk: str, now: float) -> None: ...
        # bindings.py
        async def _syncer(self) -> None: ...
        async def _sync(self) -> bool: ...
        async def _declare_normal(self, h: int, channel: str) -> None: ...
        # delivery.py
        def _on_host_message(self, msg: DeliveredMessage) -> None: ...
        async def _on_normal_message(self, msg: DeliveredMessage) -> None: ...
        # holding.py
        def _clear_held(self) -> int: ...
        def _drop_held(self, why: str) -> None: ...
        def _send_ack(self) -> None: ...
        def _hold(
            self,
            q: deque[tuple[bytes | memoryview, float]],
            channel: str,
            payload: bytes | memoryview,
            expires_at: float,
        ) -> None: ...
        def _ack_later(self, msg: DeliveredMessage) -> None: ...
        # deadletters.py
        def _on_dead(self, msg: DeliveredMessage, where: str = "") -> None: ...
        def _on_normal_dead(self, msg: DeliveredMessage) -> None: ...
        async def _declare_normal_dead(self, ndq: str, dx: str) -> None: ...


def _ignore_result(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # a lost connection is handled by the link's loop
