"""What one process holds of its host namespace, and the registry's slot records.

:class:`RegistryState` owns the per-process state every part of a ``Namespace`` reads:
the config and layout, the lock file (every lock is a byte of the registry's own file,
``/dev/shm/<ns>.reg``), the registry segment and its typed views (``reg_q``, ``reg_s``,
``reg_i``, ``reg_all_q``), the map of slot views, this process's slot (``me``, ``gen``,
``own``) and its bells. It also holds the small helpers on the registry's words that
several parts share: the names of the slot segments and bells, ``INIT_LOCK``, the slot
records (state, incarnation), the slots epoch (bumped whenever a slot changes hands)
and the statistics mirror.

It is the base of the mixins that make up :class:`hybrid_layer.shm.registry.Namespace`
(attach, rings, liveness, lease, site, flush); nothing here does I/O but the locks.
Invariants: a slot record's state word is stored last, in one store (readers see FREE
or LIVE); the slots epoch changes whenever a record's state does. Nothing here is on a
per-message path.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from ..config import LayerConfig
from . import layout as L
from . import spill
from .doorbell import Bell
from .locks import LockFile
from .segment import Segment
from .slotview import SlotView

_U64 = (1 << 64) - 1


class RegistryState:
    """Base of ``Namespace``: the state one participant holds of its host namespace."""

    def __init__(self, cfg: LayerConfig) -> None:
        self.cfg = cfg
        self.ns = cfg.namespace
        self.lay = L.SlotLayout.for_sizes(
            cfg.ring_bytes, cfg.channel_buckets, cfg.max_groups_per_process
        )
        self.max_p = cfg.max_participants
        self.spill_at = spill.threshold(self.lay.ring_bytes)  # larger records: shm.spill
        self.reg_name = f"/{self.ns}.reg"
        # the locks live on the registry's own file (see the module docstring)
        self.lock_path = f"{L.SHM_FS}{self.reg_name}"
        self._unlinked_told = False
        self.site_clash = ""  # what another site's clash said (empty: none seen)
        self.slots: dict[int, SlotView] = {}
        self.slots_lock = threading.Lock()
        self.lockfile: LockFile | None = None
        self.reg: Segment | None = None
        self.reg_hdr: memoryview = memoryview(b"")
        self.reg_q: memoryview = memoryview(b"")
        self.reg_s: memoryview = memoryview(b"")
        self.reg_i: memoryview = memoryview(b"")
        self.reg_all_q: memoryview = memoryview(b"")
        self.me = -1
        self.gen = 0
        self.claimed_dropped = 0  # unread messages of a dead owner of the slot we took
        self.own: SlotView | None = None
        self.bell: Bell | None = None
        self.rescue: Bell | None = None
        self.is_leader = False
        self._live_cache: tuple[int, list[int]] = (-1, [])

    # ------------------------------------------------------------------ names
    def slot_name(self, i: int) -> str:
        return f"/{self.ns}.s{i}"

    def bell_path(self, i: int) -> str:
        return f"{self.cfg.shm_dir}/{self.ns}.bell{i}"

    def rescue_path(self, i: int) -> str:
        return f"{self.cfg.shm_dir}/{self.ns}.rescue{i}"

    # ------------------------------------------------------------------ registry words
    @contextlib.contextmanager
    def _init_locked(self) -> Iterator[LockFile]:
        assert self.lockfile is not None
        self.lockfile.acquire(L.INIT_LOCK)
        try:
            yield self.lockfile
        finally:
            self.lockfile.release(L.INIT_LOCK)

    def _reg_state(self, i: int) -> int:
        return self.reg_i[L.reg_slot_offset(i) // 4]

    def _reg_gen(self, i: int) -> int:
        return self.reg_i[L.reg_slot_offset(i) // 4 + 1]

    def reg_slot(self, i: int) -> tuple[int, int, int, float]:
        assert self.reg is not None
        state, gen, pid, started = L.REG_SLOT.unpack_from(self.reg.buf, L.reg_slot_offset(i))
        return state, gen, pid, started

    def _bump_slots_epoch(self) -> None:
        q = self.reg_q
        q[L.HQ_SLOTS_EPOCH] = (q[L.HQ_SLOTS_EPOCH] + 1) & _U64  # (a corrupted word wraps)

    # ------------------------------------------------------------------ stats mirror
    def publish_stats(self, values: tuple[int, ...]) -> None:
        if self.reg is not None and self.me >= 0:
            L.REG_STATS.pack_into(
                self.reg.buf, L.reg_slot_offset(self.me) + L.REG_STATS_OFFSET, *values
            )

    def slot_stats(self, i: int) -> tuple[int, ...]:
        assert self.reg is not None
        return tuple(
            L.REG_STATS.unpack_from(self.reg.buf, L.reg_slot_offset(i) + L.REG_STATS_OFFSET)
        )

    def doorbells_refused(self) -> int:
        """Wake-ups not written because a bell was not a FIFO of this user (logged)."""
        with self.slots_lock:
            views = list(self.slots.values())
        return sum(sv.bell.refused + sv.rescue.refused for sv in views)


def _text(buf: memoryview, off: int, n: int) -> str:
    return bytes(buf[off : off + n]).split(b"\0", 1)[0].decode("utf-8", "replace")


def _put_text(buf: memoryview, off: int, n: int, value: str) -> None:
    raw = value.encode("utf-8")[: n - 1]
    buf[off : off + n] = raw + bytes(n - len(raw))
