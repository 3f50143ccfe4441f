"""The state a participant's parts share, declared once; and the item its queues hold.

Theory of operation
-------------------
A :class:`~hybrid_layer.participant.Participant` is one object assembled from mixins,
one per job (``sending``, ``receiving``, ``draining``, ``groups``, ``normal``,
``housekeeping``), plus two objects of its own: the :class:`~.host_thread.HostThread`
and, while this process leads its host, the :class:`~.leadership.Leadership`. Every
mixin derives from :class:`ParticipantState`, which only *declares* (annotations, no
values) the attributes ``Participant.__init__`` sets and, for the type checker only,
the methods one part calls on another. At run time it adds nothing: ``self.x`` is an
instance attribute and ``self.f()`` one type-attribute lookup, as in a single class -
which is why the hot paths (``send``, ``drain`` -> ``_dispatch`` -> ``_put`` ->
``take``, ``_fan_out``, the ``deliver_*`` the link calls) were split this way and not
into objects of their own.

Who guards what (the lock is the participant's, shared by every part):

- ``lock``: the local queues, waiters, group table, readers, parked messages, the
  owner's capacity counters (``own.bk`` odd words: ``deq``), ``early_out``;
- ``read_lock``: makes the owner the single consumer of its ring across threads and
  event loops (``drain``, a flush's ack, a bucket resync);
- the route caches (``_local_dest``, ``_capacity_cache``) and the round-robin cursors
  (``rr``) are read and written without a lock: a cache entry follows from the name
  alone (a lost update costs a recomputation), a lost cursor update skews the round
  robin by one.

An :class:`Item` is one message in a local queue: the record's body (name bytes then
message bytes) with where it came from in the ring (flush bookkeeping) and the capacity
bucket it holds until it leaves.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from .amqp.link import Link
    from .config import LayerConfig
    from .host_thread import HostThread
    from .leadership import Leadership
    from .names import ProcessAddress
    from .routing import GroupTable
    from .shm.registry import Namespace, SlotView
    from .shm.ring import Record
    from .stats import Counters

#: the log line of an expired message: channel, where it waited, the expiry
EXPIRED = "hybrid_layer: message for %r expired unread (%s, expiry %s s)"


class Item(NamedTuple):
    expires_at: float
    pos: int  # ring position the record was read at (flush bookkeeping)
    bucket: int  # owner's capacity bucket, -1 if none
    body: bytes
    name_len: int


Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]


class ParticipantState:
    """Declarations only: what ``Participant.__init__`` sets, for the parts to share."""

    # ------------------------------------------------------------ identity
    cfg: LayerConfig
    K: int  # channel_buckets
    ns: Namespace
    slot: int
    gen: int
    pid: int
    own: SlotView  # our slot: ring, control words, capacity buckets, published hashes
    counters: Counters
    lock: threading.Lock
    read_lock: threading.Lock
    host: HostThread
    closed: bool
    # ------------------------------------------------------------ receiving
    queues: dict[str, deque[Item]]
    waiters: dict[str, deque[Waiter]]
    loop_regs: weakref.WeakSet[asyncio.AbstractEventLoop]
    n_sleeping: int
    _armed: bool
    _last_loop: asyncio.AbstractEventLoop | None
    _flush_word: memoryview
    _skipped: bool
    flush_seen: int
    flush_acked: int
    _spill_stem: str
    # ------------------------------------------------------------ groups, normal channels
    groups: GroupTable
    readers: set[str]
    _idle_heads: dict[str, tuple[Item, float]]
    parked: dict[str, deque[Item]]
    parked_empty_since: dict[str, float]
    next_bucket: int
    rr: dict[str, int]
    # ------------------------------------------------------------ sending
    _capacity_cache: dict[str, int]
    _local_dest: dict[str, tuple[int, int, bytes, int, int]]
    # ------------------------------------------------------------ broker mode
    link: Link | None  # while we lead and a broker is configured
    link_closed: bool
    leading: Leadership | None  # while we lead (see ``leadership``)
    _lead_lock: threading.Lock
    _link_up_seen: bool
    _gap_told: bool
    _up_mark: tuple[int, int]

    if TYPE_CHECKING:  # what one part calls on another (defined in the module named)
        # participant
        def leadership(self) -> Leadership: ...

        # sending
        def capacity_for(self, channel: str) -> int: ...

        def send(self, channel: str, msg: bytes | memoryview, expires_at: float) -> int: ...

        def _remember_local(
            self, channel: str, addr: ProcessAddress
        ) -> tuple[int, int, bytes, int, int]: ...

        def hand_off(
            self,
            kind: int,
            name: str,
            msg: bytes | memoryview,
            expires_at: float,
            key: str | None,
        ) -> int: ...

        def count_link_drop(self, name: str) -> None: ...

        def count_forward_failure(self, r: int, name: str) -> None: ...

        def _outbound(self, rec: Record) -> None: ...

        # receiving
        def _deq(self, bucket: int, n: int) -> None: ...

        def _put(
            self, channel: str, item: Item, loop: asyncio.AbstractEventLoop | None
        ) -> None: ...

        def _wake_one(self, channel: str, loop: asyncio.AbstractEventLoop | None) -> None: ...

        # draining
        def drain(self, loop: asyncio.AbstractEventLoop | None) -> int: ...

        def control(self, sv: SlotView, verb: str, *args: Any) -> int: ...

        def _control(self, verb: str, args: list[Any]) -> None: ...

        def _spill_failed(self, name: str, exc: Exception) -> None: ...

        # groups
        def deliver_group(self, group: str, msg: bytes | memoryview, expires_at: float) -> None: ...

        def _fan_out(
            self, rec: Record, pos: int, loop: asyncio.AbstractEventLoop | None
        ) -> None: ...

        def group_discard(self, group: str, channel: str, *, local_only: bool = False) -> None: ...

        def request_sync(self) -> None: ...

        # normal channels
        def normal_bucket(self, channel: str) -> int: ...

        def send_normal(self, channel: str, msg: bytes | memoryview, expires_at: float) -> int: ...

        def deliver_normal(
            self, channel: str, msg: bytes | memoryview, expires_at: float
        ) -> int: ...

        def _park(self, channel: str, item: Item) -> None: ...

        def forward_parked(self, only: str | None = None) -> None: ...

        # housekeeping
        def check_flush(self) -> None: ...

        def check_words(self) -> int: ...

        def _resync_buckets(self) -> int: ...
