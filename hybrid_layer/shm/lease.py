"""The leader lease of a host, and the leader's published link words.

Exactly one participant per host leads (holds the AMQP link, reclaims dead slots,
keeps parked messages). The lease is ``LEADER_LOCK``, a byte of the registry's lock
file: ``try_lead`` takes it without blocking (the host thread tries every tick), the
kernel releases it when the leader dies, so a successor takes it within a tick. The
holder publishes itself in the registry header (slot, incarnation, pid, and an epoch
bumped at each new leader); ``leader()`` reads that record. The leader also publishes
its link's state in its own slot record (``LQ_*`` words: state, binding syncs, state
changes, why it is down), which every participant reads to decide how to hand off a
cross-host message.

Owns ``is_leader`` (in ``registry_state``). Invariants: the leader slot word is set to
-1 before the other fields change and to ``me`` last, so nobody pairs a new
incarnation with the old slot. Not per message except ``link_get`` (a hand-off reads
the link state).
"""

from __future__ import annotations

import os
from typing import NamedTuple

from . import layout as L
from .registry_state import _U64, RegistryState


class Leader(NamedTuple):
    slot: int
    gen: int
    pid: int
    epoch: int


class Lease(RegistryState):
    """Part of ``Namespace``: the leader lease and the leader's link words."""

    def try_lead(self) -> bool:
        """Take the leader lease if it is free; publish ourselves as leader."""
        if self.is_leader:
            return True
        lf = self.lockfile
        if lf is None or not lf.acquire(L.LEADER_LOCK, blocking=False):
            return False
        self.is_leader = True
        self.reg_s[L.Hi_LEADER_SLOT] = -1  # readers never pair our gen with the old slot
        self.reg_i[L.HI_LEADER_GEN] = self.gen
        self.reg_s[L.Hi_LEADER_PID] = os.getpid()
        self.reg_s[L.Hi_LEADER_SLOT] = self.me
        self.reg_q[L.HQ_LEADER_EPOCH] = (self.reg_q[L.HQ_LEADER_EPOCH] + 1) & _U64
        return True

    def leader(self) -> Leader:
        s, q = self.reg_s, self.reg_q
        return Leader(
            s[L.Hi_LEADER_SLOT],
            self.reg_i[L.HI_LEADER_GEN],
            s[L.Hi_LEADER_PID],
            q[L.HQ_LEADER_EPOCH],
        )

    def resign(self) -> None:
        if self.is_leader and self.lockfile is not None:
            self.reg_s[L.Hi_LEADER_SLOT] = -1
            self.reg_s[L.Hi_LEADER_PID] = 0
            self.lockfile.release(L.LEADER_LOCK)
        self.is_leader = False

    # ------------------------------------------------------------------ broker link words
    def _link_base(self, i: int) -> int:
        return (L.reg_slot_offset(i) + L.REG_LINK_OFFSET) // 8

    def link_set(self, word: int, value: int) -> None:
        """Leader: publish one of its link words (``L.LQ_*``)."""
        if self.reg is not None and self.me >= 0:
            self.reg_all_q[self._link_base(self.me) + word] = value

    def link_get(self, word: int, i: int | None = None) -> int:
        """Link word ``word`` of slot ``i`` (default: ours); 0 (LINK_NONE) if no slot."""
        i = self.me if i is None else i
        if self.reg is None or i < 0:
            return 0
        return self.reg_all_q[self._link_base(i) + word]

    def link_state(self) -> tuple[int, int, int]:
        """The leader's (state, syncs, changes); LINK_NONE without a live leader."""
        slot = self.leader().slot
        g = self.link_get
        return g(L.LQ_STATE, slot), g(L.LQ_SYNCS, slot), g(L.LQ_CHANGES, slot)
