"""The leader's duties: an object that exists only while this process leads its host.

Theory of operation
-------------------
Exactly one process per host holds the leader lease (``Namespace.try_lead``: an
``fcntl`` lock the kernel releases when the process dies). The process that wins it
gets a :class:`Leadership` (``Participant.leadership()``, made on first need after the
lease is won - normally by ``HostThread.on_leadership`` - and dropped at close, the only
time a lease is given up). Its duties:

- reclaim the slots of dead processes (``reclaim_dead``): their memberships are
  released, their unread messages counted; a dead *leader's* unread hand-offs for other
  hosts are salvaged and published first (``_take_over_out``: FIFO per sender);
- broker mode: start the host's one AMQP link (``start_link``, on the host loop), keep
  what is handed over before it exists (``early_out``, bounded like the link's queue,
  taken over by the link in order), tell it when the host's interest changed
  (``interest_changed``) and answer what that interest is (``interest``: the union of
  every live slot's published group and normal-channel hashes, cached per slot by its
  change counter), and remember the names of normal channels read on this host
  (``normal_names``: the link needs the name to declare the channel's queue);
- every ``RECLAIM_EVERY``: forward messages parked for normal channels (single host).

What a message path touches while leading stays on the participant: ``link`` (the
leader's own ``send`` to another host submits to it directly), ``parked`` (``_dispatch``
looks at it per normal-channel record). Lock order: ``Participant._lead_lock`` (only to
make this object) is never taken while holding ``lock``; ``early_out`` is guarded by
``lock`` (the link takes it over under that lock, so no hand-off slips in between).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

from .sending import out_key
from .shm import layout as L
from .shm import spill
from .shm.groupset import TAG_GROUP, TAG_NORMAL, name_hash

if TYPE_CHECKING:
    from .participant import Participant
    from .shm.ring import Record

log = logging.getLogger("hybrid_layer")

RECLAIM_EVERY = 0.25

#: a hand-off for other hosts: (kind, name, message, expires_at, capacity key)
Out = tuple[int, str, bytes, float, "str | None"]


class Leadership:
    """This process's duties as its host's leader (see the module docstring)."""

    def __init__(self, p: Participant) -> None:
        self.p = p
        self.early_out: deque[Out] = deque()  # hand-offs before the link exists
        self.normal_names: dict[int, str] = {}  # hash -> normal channel read on this host
        self._interest: dict[int, tuple[int, set[int]]] = {}  # slot -> (changes, hashes)
        self._interest_epoch = -1
        self.next_reclaim = 0.0

    def tick(self, now: float) -> None:
        """Host thread, every tick while we lead."""
        p = self.p
        if now >= self.next_reclaim:
            self.next_reclaim = now + RECLAIM_EVERY
            self.reclaim_dead()
            if p.parked:
                p.forward_parked()
                p.unpark_idle()
        link = p.link
        if link is None and p.cfg.broker and not p.link_closed:
            self.start_link()  # (a failed start is retried here)
            link = p.link
        if link is not None:
            link.expire_full_flags()
            if self.interest_changed():
                link.request_sync()

    # ================================================================ the link
    def keep_early(
        self, kind: int, name: str, msg: bytes | memoryview, expires_at: float, key: str | None
    ) -> bool:
        """Leader with no link object yet: keep a hand-off for it (in order: the link
        takes them all under this lock). False if the link exists now or the bound is
        reached (``early_out`` is bounded like the link's queue)."""
        p = self.p
        with p.lock:
            if p.link is not None:
                return False
            if len(self.early_out) >= p.cfg.outbound_limit:
                return False
            self.early_out.append((kind, name, bytes(msg), expires_at, key))
            return True

    def start_link(self) -> None:
        """Host thread, on becoming leader in broker mode."""
        p = self.p
        if p.link is not None or p.closed or p.link_closed or not p.cfg.broker:
            return
        from .amqp.link import Link

        assert p.host.loop is not None
        link = Link(p, p.host.loop)
        with p.lock:
            for name in p.readers:
                self.normal_names[name_hash("n", name)] = name
            # what was handed over before the link existed goes first, in order: no
            # hand-off can slip in between, they all take this lock while link is None
            with link.out_lock:
                for item in self.early_out:
                    link.out.append(item)
                    link.out_bytes += len(item[2])
            self.early_out.clear()
            p.link = link
        link.kick()
        # every process tells the new leader the names of the normal channels it reads
        for i in p.ns.live_slots():
            sv = p.ns.slot(i)
            if i != p.slot and sv is not None:
                p.control(sv, "readers?")

    def interest(self) -> tuple[set[int], set[int]] | None:
        """Leader: (group hashes, normal-channel hashes) with a member/reader on this
        host, from every live slot's published set; ``None`` if a set was mid-rebuild."""
        ns = self.p.ns
        live = ns.live_slots()
        cache = self._interest
        for i in list(cache):
            if i not in live:
                del cache[i]
        union: set[int] = set()
        for i in live:
            sv = ns.slot(i)
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
        ns = self.p.ns
        if ns.reg_q[L.HQ_SLOTS_EPOCH] != self._interest_epoch:
            self._interest_epoch = ns.reg_q[L.HQ_SLOTS_EPOCH]
            return True
        for i, (changes, _) in self._interest.items():
            sv = ns.slot(i)
            if sv is not None and sv.groups.changes != changes:
                return True
        return False

    # ================================================================ dead processes
    def reclaim_dead(self) -> None:
        p = self.p
        # a dead leader's unread hand-offs are published by us instead, ahead of what
        # was handed to us since (they are older: FIFO per sender)
        salvaged: list[Out] = []

        def salvage(rec: Record) -> bool:
            if not p.ns.is_leader:
                return False
            k = rec.kind
            msg = rec.message
            if len(msg) and msg[0] == spill.TAG:
                got = self._unspill_salvaged(rec)
                if got is None:
                    return True
                msg = got
            salvaged.append((k, rec.name, bytes(msg), rec.expires_at, out_key(k, rec.name)))
            return True

        for i in p.ns.live_slots():
            if i == p.slot or p.ns.owner_alive(i):
                continue
            pid = p.ns.reg_slot(i)[2]
            n = p.ns.reclaim(i, salvage if p.cfg.broker else None)
            if n >= 0:
                p.counters.drop(
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

    def _unspill_salvaged(self, rec: Record) -> memoryview | None:
        """A dead leader's hand-off whose message is in a segment of its own (named
        for the dead slot: any of this namespace's spill names is accepted here)."""
        p = self.p
        try:
            return memoryview(spill.read(rec.message, spill.stem(p.ns.ns)))[rec.name_len :]
        except (spill.SpillError, OSError) as exc:
            p._spill_failed(rec.name, exc)
            return None

    def _take_over_out(self, items: list[Out]) -> None:
        """Put a dead leader's hand-offs at the head of what we publish."""
        p = self.p
        with p.lock:
            link = p.link
            if link is None:
                self.early_out.extendleft(reversed(items))
            else:
                with link.out_lock:
                    link.out.extendleft(reversed(items))
                    link.out_bytes += sum(len(it[2]) for it in items)
        if link is not None:
            link.kick()
        log.warning(
            "hybrid_layer: %d cross-host messages handed to the dead leader taken over",
            len(items),
        )
