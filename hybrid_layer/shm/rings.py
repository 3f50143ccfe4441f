"""Writing into a participant's inbox ring, and the owner's announcement that it sleeps.

This is the per-message core of the namespace: ``send`` and the leader's deliveries
call :meth:`RingAccess.write` for every message, which takes the destination's ring
lock (a byte of the registry's lock file, behind the process-local ``tlock``), checks
the slot's state and incarnation and the channel's capacity bucket, appends one
record, and rings the destination's bells as needed. Records too large for the ring go
into a segment of their own (``shm.spill``) first. ``slot`` maps another slot's segment
on first use (``_slot_segment``) and caches the view.

Owns no state of its own (see ``registry_state``). The outcome codes (``OK``,
``FULL_CHANNEL``, ``FULL_RING``, ``NO_CHANNEL``, ``LINK_DOWN``) are what the senders
branch on.

Invariants: a writer stores ``tail`` then, after its unlock, loads the owner's waiting
flag; the owner stores the flag then loads ``tail`` (``prepare_sleep``): each side has
a full barrier between the two, so a sleeping receiver is always woken. Hot: ``write``
and ``slot`` (no added calls or lookups: keep it so).
"""

from __future__ import annotations

import contextlib
import logging
import platform
import threading
from collections.abc import Iterator

from .._log import limited
from . import layout as L
from . import spill
from .registry_state import RegistryState
from .segment import Segment
from .slotview import SlotView

log = logging.getLogger("hybrid_layer")

# results of a write into a ring
OK = 0
FULL_CHANNEL = 1
FULL_RING = 2
NO_CHANNEL = 3
LINK_DOWN = 4  # broker mode: a message for another host while the leader's link is down


class RingAccess(RegistryState):
    """Part of ``Namespace``: ring locks, slot views, writes into rings, sleeping."""

    def _slot_segment(self, i: int, *, create: bool) -> SlotView | None:
        with self.slots_lock:
            sv = self.slots.get(i)
            if sv is not None:
                return sv
            try:
                seg = Segment(self.slot_name(i), self.lay.size, self.cfg.mode, create=create)
            except (ValueError, OSError) as exc:
                if create:
                    raise
                log.debug("cannot open slot %d: %s", i, exc)
                return None
            except Exception:  # posix_ipc.ExistentialError: no such segment
                if create:
                    raise
                return None
            sv = SlotView(seg, self.lay, i, self.bell_path(i), self.rescue_path(i))
            self.slots[i] = sv
            return sv

    # ------------------------------------------------------------------ rings
    @contextlib.contextmanager
    def ring_locked(self, sv: SlotView) -> Iterator[None]:
        lf = self.lockfile
        assert lf is not None
        with sv.tlock:
            lf.acquire(L.RING_LOCK_BASE + sv.index)
            try:
                yield
            finally:
                lf.release(L.RING_LOCK_BASE + sv.index)

    def slot(self, i: int) -> SlotView | None:
        sv = self.slots.get(i)
        if sv is None and 0 <= i < self.max_p:
            sv = self._slot_segment(i, create=False)
        return sv

    def write(
        self,
        sv: SlotView,
        gen: int,
        kind: int,
        name: bytes,
        expires_at: float,
        message: bytes | memoryview,
        bucket: int,
        capacity: int,
        urgent: bool = False,
    ) -> int:
        """Write one record into slot ``sv``'s ring; one of OK/FULL_*/NO_CHANNEL.

        ``gen`` 0 accepts any live incarnation; ``bucket`` -1 skips the capacity check.
        ``urgent`` records (group, normal-channel and control records, which the owner
        may have to act on even if it is not receiving) wake its host thread when no
        receiver of it is waiting.
        """
        if len(name) + len(message) > self.spill_at:
            return self._write_spilled(
                sv, gen, kind, name, expires_at, message, bucket, capacity, urgent
            )
        lf = self.lockfile
        assert lf is not None
        ci = sv.ci
        lock_byte = L.RING_LOCK_BASE + sv.index
        with sv.tlock:
            lf.acquire(lock_byte)
            try:
                if ci[L.I_STATE] != L.SLOT_LIVE or (gen and ci[L.I_GEN] != gen):
                    return NO_CHANNEL
                if bucket >= 0:
                    bk = sv.bk
                    enq = bk[2 * bucket]
                    d = (enq - bk[2 * bucket + 1]) & 0xFFFFFFFF
                    if capacity <= d < 0x80000000:
                        return FULL_CHANNEL
                before = sv.ring.try_write(kind, name, expires_at, message)
                if before >= 0 and bucket >= 0:
                    bk[2 * bucket] = (enq + 1) & 0xFFFFFFFF
            finally:
                lf.release(lock_byte)
            # read the flag only after the unlock: the kernel's lock code is a full
            # barrier between our tail store and this load (see prepare_sleep)
            waiting = ci[L.I_WAITING]
        if before < 0:
            sv.bell.ring()
            sv.rescue.ring()  # the owner's host thread drains even if no one receives
            return FULL_RING
        if waiting:
            if not sv.bell.ring():  # owner gone, or its bell refused (not a FIFO of ours):
                sv.rescue.ring()  # its host thread drains and wakes the receiver
        elif urgent:
            sv.rescue.ring()
        half = sv.half
        if before <= half < sv.ring.tail - sv.ring.head:
            sv.rescue.ring()  # past half full: drain even if no one receives
        return OK

    def _write_spilled(
        self,
        sv: SlotView,
        gen: int,
        kind: int,
        name: bytes,
        expires_at: float,
        message: bytes | memoryview,
        bucket: int,
        capacity: int,
        urgent: bool,
    ) -> int:
        """``write`` for a record too large for the ring: the message goes into a
        segment of its own (``shm.spill``), the ring record refers to it. The segment
        is named for the destination's incarnation, so the record is written for that
        one only; if it is not written, the segment is removed here."""
        ci = sv.ci
        g = gen or ci[L.I_GEN]
        if ci[L.I_STATE] != L.SLOT_LIVE or ci[L.I_GEN] != g:
            return NO_CHANNEL
        if bucket >= 0 and sv.pending(bucket) >= capacity:
            return FULL_CHANNEL  # (checked again under the lock) no copy for nothing
        try:
            ref = spill.write(self.ns, sv.index, g, self.cfg.mode, name, message)
        except OSError as exc:
            limited.warning(
                "spill",
                "hybrid_layer: no room for a %d-byte message in shared memory (%s): "
                "free space in /dev/shm (a message in flight takes its size there)",
                len(name) + len(message),
                exc,
            )
            return FULL_RING
        r = self.write(sv, g, kind, name, expires_at, ref, bucket, capacity, urgent)
        if r != OK:
            spill.discard(ref, spill.stem(self.ns, sv.index, g))
        return r

    def prepare_sleep(self) -> bool:
        """Owner: announce a sleeping receiver. True if the ring is empty (safe to sleep).

        Dekker-style: we store the flag then load ``tail``; a writer stores ``tail`` then
        (after its unlock) loads the flag. Each side needs a full barrier between its
        store and its load so that at least one of them sees the other. The writer's is
        the kernel's lock code; ours is a locked instruction (an uncontended
        ``threading.Lock`` round trip) on x86-64, else the ring lock itself.
        """
        sv = self.own
        assert sv is not None
        if _CHEAP_FENCE:
            sv.ci[L.I_WAITING] = 1
            _fence_lock.acquire()
            _fence_lock.release()
            return sv.ring.used() == 0
        with self.ring_locked(sv):
            sv.ci[L.I_WAITING] = 1
            return sv.ring.used() == 0

    def set_waiting(self, flag: bool) -> None:
        assert self.own is not None
        self.own.ci[L.I_WAITING] = 1 if flag else 0


# x86-64 orders everything but store->load; a lock-prefixed instruction (what an
# uncontended pthread/sem lock does) is a full barrier there
_CHEAP_FENCE = platform.machine().lower() in ("x86_64", "amd64")
_fence_lock = threading.Lock()
