"""Which slots are alive, reclaiming a dead participant's slot, repairing one's own words.

A participant's liveness is its slot lock (a byte of the registry's lock file, held
while it lives: the kernel releases it when the process dies, however it dies). The
registry's slot records say which slots have an owner (``live_slots``, cached until
the slots epoch changes); ``slots_with`` finds the live slots whose published interest
set may hold a hash (a group, a normal channel, a parked channel). The leader's
periodic reclaim calls :meth:`Liveness.reclaim` for each listed slot whose lock is
free: it counts what the dead owner had not read, offers records it held for the
broker to the leader (``salvage``), resets the ring and frees the slot.
``repair_own_words`` puts back an owner's words that a stray write corrupted.

Owns no state of its own (see ``registry_state``). Invariants: a slot is freed only by
someone holding both ``INIT_LOCK`` and the slot's lock; only the owner moves its
ring's ``head`` except when it is dead. Hot: ``live_slots`` and ``slots_with`` (group
fan-out and normal channels: one epoch load when nothing changed).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from . import layout as L
from . import spill
from .ring import Record
from .rings import RingAccess
from .slotview import SlotView

log = logging.getLogger("hybrid_layer")

# ring records (messages) that their destination's capacity buckets do not count
_OUT_KINDS = frozenset({L.KIND_OUT_DIRECT, L.KIND_OUT_GROUP, L.KIND_OUT_NORMAL})
_NOT_IN_BUCKETS = frozenset({L.KIND_GROUP, L.KIND_OUT_DIRECT, L.KIND_OUT_GROUP, L.KIND_OUT_NORMAL})


class Liveness(RingAccess):
    """Part of ``Namespace``: live slots, interest lookups, reclaim, word repair."""

    def live_slots(self) -> list[int]:
        """Slots with a live owner per the registry; cached until a slot changes hands."""
        epoch = self.reg_q[L.HQ_SLOTS_EPOCH]
        cached_epoch, cached = self._live_cache
        if epoch == cached_epoch:
            return cached
        live = [i for i in range(self.max_p) if self._reg_state(i) == L.SLOT_LIVE]
        self._live_cache = (epoch, live)
        return live

    def slots_with(self, h: int, *, exclude: int = -1) -> list[SlotView]:
        """Live slots whose published set may hold hash ``h`` (a group, a normal
        channel's readers, a channel parked with the leader)."""
        out = []
        for i in self.live_slots():
            if i == exclude:
                continue
            sv = self.slot(i)
            if sv is not None and sv.groups.maybe_contains(h):
                out.append(sv)
        return out

    def owner_alive(self, i: int) -> bool:
        if i == self.me:
            return True
        assert self.lockfile is not None
        return self.lockfile.held_by_other(L.SLOT_LOCK_BASE + i)

    def reclaim(self, i: int, salvage: Callable[[Record], bool] | None = None) -> int:
        """Free slot ``i`` if its owner died. Returns records dropped, -1 if alive.

        ``salvage`` (the leader's) is offered each record handed to the dead process
        for the broker (``KIND_OUT_*``: it was a leader): True if it took it over."""
        lf = self.lockfile
        if lf is None or i == self.me:
            return -1
        with self._init_locked():
            if not lf.acquire(L.SLOT_LOCK_BASE + i, blocking=False):
                return -1
            try:
                if self._reg_state(i) != L.SLOT_LIVE:
                    return 0
                return self._reclaim_locked(i, salvage)
            finally:
                lf.release(L.SLOT_LOCK_BASE + i)

    def _reclaim_locked(self, i: int, salvage: Callable[[Record], bool] | None = None) -> int:
        """Caller holds INIT_LOCK and slot ``i``'s liveness lock. Returns the messages
        the dead owner had not read: what is left in its ring, and what it had already
        moved into its own memory (queued, parked) - those still count against their
        channels' buckets, as do direct and normal-channel records in the ring."""
        assert self.reg is not None
        dropped = 0
        sv = self._slot_segment(i, create=False)
        if sv is not None:
            dead_gen = sv.gen
            with self.ring_locked(sv):
                while True:
                    try:
                        rec = sv.ring.try_read()
                    except Exception:
                        dropped += 1
                        break
                    if rec is None:
                        break
                    if rec.kind in _OUT_KINDS and salvage is not None and salvage(rec):
                        continue
                    if rec.kind in _NOT_IN_BUCKETS:  # (direct, normal: counted below)
                        dropped += 1
                dropped += sum(sv.pending(b) for b in range(len(sv.bk) // 2))
                sv.ring.reset()
                sv.ci[L.I_STATE] = L.SLOT_FREE
                sv.ci[L.I_WAITING] = 0
            self._remove_spills(i, dead_gen)
        self.reg_i[L.reg_slot_offset(i) // 4] = L.SLOT_FREE
        self._bump_slots_epoch()
        return dropped

    def _remove_spills(self, i: int, gen: int) -> None:
        """Slot ``i``'s incarnation ``gen`` reads no more: remove the segments of the
        large messages its ring still referred to (and any a writer left half-made)."""
        n = spill.remove(spill.stem(self.ns, i, gen))
        if n:
            log.info("hybrid_layer: removed %d unread large message(s) of slot %d", n, i)

    def repair_own_words(self, is_leader: bool) -> list[str]:
        """Owner: put back any of its shared words that do not say what it knows (its
        slot's state and incarnation, its registry record, its leader fields, a flush
        position past the ring's tail). Returns what was repaired."""
        sv, reg = self.own, self.reg
        if sv is None or reg is None or self.me < 0:
            return []
        fixed = []
        ci, gen, me, pid = sv.ci, self.gen, self.me, os.getpid()
        if ci[L.I_STATE] != L.SLOT_LIVE or ci[L.I_GEN] != gen:
            with self.ring_locked(sv):
                fixed.append(f"slot state/gen {ci[L.I_STATE]}/{ci[L.I_GEN]:#x}")
                ci[L.I_GEN] = gen
                ci[L.I_STATE] = L.SLOT_LIVE
        w = L.reg_slot_offset(me) // 4
        ri, rs = self.reg_i, self.reg_s
        if ri[w] != L.SLOT_LIVE or ri[w + 1] != gen or ri[w + 2] != pid:
            fixed.append(f"registry record {ri[w]}/{ri[w + 1]:#x}/{ri[w + 2]}")
            ri[w + 1] = gen
            ri[w + 2] = pid
            ri[w] = L.SLOT_LIVE
            self._bump_slots_epoch()
        if is_leader and (
            rs[L.Hi_LEADER_SLOT] != me or ri[L.HI_LEADER_GEN] != gen or rs[L.Hi_LEADER_PID] != pid
        ):
            fixed.append("leader fields")
            rs[L.Hi_LEADER_SLOT] = -1
            ri[L.HI_LEADER_GEN] = gen
            rs[L.Hi_LEADER_PID] = pid
            rs[L.Hi_LEADER_SLOT] = me
        if sv.cq[L.Q_FLUSH_UPTO] > sv.ring.tail:
            with self.ring_locked(sv):
                if sv.cq[L.Q_FLUSH_UPTO] > sv.ring.tail:
                    fixed.append(f"flush position {sv.cq[L.Q_FLUSH_UPTO]:#x}")
                    sv.cq[L.Q_FLUSH_UPTO] = sv.ring.head
        return fixed
