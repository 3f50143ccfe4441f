"""``flush()`` across the host: marking every live ring flushed, and the flush epoch.

A flusher takes ``FLUSH_LOCK``, stores in every live slot the ring's current tail as
its flush position (``Q_FLUSH_UPTO``), then bumps the registry's flush epoch and its
check word, and rings each owner's rescue bell. Each owner (its drain or its host
thread) sees the new epoch, discards records before its flush position and what it had
queued locally from before it, and acknowledges (``ack_flush``); the flusher waits for
the live slots that have not (``flush_unacked``). ``flush_epoch_checked`` tells a
corrupted epoch word from a real flush by its check word, and repairs it.

Owns the registry's flush words and each slot's ``Q_FLUSH_UPTO``/``Q_FLUSH_ACK``.
Invariants: the epoch is stored before its check word, both under ``FLUSH_LOCK``; only
the owner moves ``head``. Per drain, not per message: a drain compares the epoch word
(read directly) and calls ``flush_upto`` once per batch.
"""

from __future__ import annotations

import logging

from . import layout as L
from .liveness import Liveness
from .registry_state import _U64

log = logging.getLogger("hybrid_layer")


class Flushing(Liveness):
    """Part of ``Namespace``: flush the host, apply and acknowledge a flush."""

    def flush_epoch(self) -> int:
        return self.reg_q[L.HQ_FLUSH_EPOCH]

    def flush_all(self) -> int:
        """Mark everything now in every live ring as flushed, then bump the flush epoch.

        Owners discard records before ``CTRL_FLUSH_UPTO`` when they read them, and drop
        what they had already queued locally from before that position when they see
        the new epoch. Only the owner ever moves ``head``.
        """
        lf = self.lockfile
        assert lf is not None
        touched = []
        lf.acquire(L.FLUSH_LOCK)
        try:
            for i in self.live_slots():
                sv = self.slot(i)
                if sv is None:
                    continue
                with self.ring_locked(sv):
                    sv.cq[L.Q_FLUSH_UPTO] = sv.ring.tail
                touched.append(sv)
            epoch = (self.flush_epoch() + 1) & _U64
            self.reg_q[L.HQ_FLUSH_EPOCH] = epoch
            self.reg_q[L.H_FLUSH_CHECK // 8] = epoch ^ L.FLUSH_CHECK_KEY
        finally:
            lf.release(L.FLUSH_LOCK)
        for sv in touched:
            if sv.index != self.me:
                sv.rescue.ring()  # the owner's host thread applies it and acknowledges
        return epoch

    def flush_epoch_checked(self, seen: int) -> tuple[int, bool]:
        """The flush epoch, validated against its check word: (epoch, repaired).

        A flusher stores the epoch then its check word, under ``FLUSH_LOCK``; a mismatch
        that outlasts that lock is a corrupted word. The check word's epoch wins if it
        is a plausible successor of ``seen`` (the epoch this process last applied), else
        ``seen`` is restored: a corrupted epoch must not be taken for a flush (which
        would erase every process's group memberships), nor stall every flush after."""
        q = self.reg_q
        ck = L.H_FLUSH_CHECK // 8
        epoch = q[L.HQ_FLUSH_EPOCH]
        if q[ck] ^ L.FLUSH_CHECK_KEY == epoch:
            return epoch, False
        lf = self.lockfile
        assert lf is not None
        lf.acquire(L.FLUSH_LOCK)
        try:
            epoch = q[L.HQ_FLUSH_EPOCH]
            from_check = q[ck] ^ L.FLUSH_CHECK_KEY
            if from_check == epoch:
                return epoch, False  # a flusher was between its two stores
            # an epoch its check word does not confirm is never taken for a flush (it
            # would erase every membership); a flush whose check word was hit in the
            # same instant is lost instead, and logged
            good = from_check if 0 <= from_check - seen <= 1024 else seen
            q[L.HQ_FLUSH_EPOCH] = good
            q[ck] = good ^ L.FLUSH_CHECK_KEY
        finally:
            lf.release(L.FLUSH_LOCK)
        log.error(
            "hybrid_layer: corrupted flush epoch of %s repaired (epoch %#x, check word "
            "said %#x, kept %d)",
            self.ns,
            epoch,
            from_check,
            good,
        )
        return good, True

    def flush_upto(self) -> int:
        assert self.own is not None
        return self.own.cq[L.Q_FLUSH_UPTO]

    def ack_flush(self, epoch: int) -> None:
        assert self.own is not None
        self.own.cq[L.Q_FLUSH_ACK] = epoch

    def flush_unacked(self, epoch: int) -> list[int]:
        """Live slots (other than ours) that have not applied flush ``epoch`` yet."""
        out = []
        for i in self.live_slots():
            sv = self.slot(i)
            if i == self.me or sv is None or not sv.live:
                continue
            if sv.cq[L.Q_FLUSH_ACK] < epoch and self.owner_alive(i):
                out.append(i)
        return out
