"""Attaching a process to its host namespace, and detaching it.

Every lock is a byte of the registry segment's own file (``/dev/shm/<ns>.reg``): the
namespace is live exactly while that shared memory has a lock holder, whatever happens
to the files in ``shm_dir``.

Attach: take ``INIT_LOCK``; create the registry, or validate it (a stale set left by a
crash - no slot lock held by anyone and no live process listed - is re-initialised, a
live one with another layout, ``VERSION`` or ``shm_dir`` is refused); check the site;
claim the first slot whose liveness lock is free; bump its incarnation and reset its
ring under the ring lock; release ``INIT_LOCK``.

Detach: mark the slot free; under ``INIT_LOCK`` release the slot lock; if no slot lock
is held by anyone the caller was the last one out and unlinks every name. ``abandon``
(after ``fork()``) drops the parent's objects without touching shared state.

Owns the lifetime of everything in ``registry_state`` (lock file, registry and slot
mappings, bells). Called once per process at the first use of a layer and at close:
nothing here is hot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time

from ..errors import NamespaceFull, NamespaceMismatch
from . import layout as L
from . import spill
from .doorbell import Bell
from .lease import Lease
from .liveness import Liveness
from .locks import LockFile
from .registry_state import _put_text, _text
from .segment import Segment, unlink
from .site import SiteCheck

log = logging.getLogger("hybrid_layer")


class Attaching(Liveness, Lease, SiteCheck):
    """Part of ``Namespace``: attach (create or validate, claim a slot), detach."""

    def _open_lockfile(self) -> LockFile:
        while True:
            lf = LockFile(self.lock_path, self.cfg.mode)
            lf.acquire(L.INIT_LOCK)
            if lf.is_current():
                return lf  # INIT_LOCK held
            lf.close()  # the last one out unlinked it while we waited: start again

    def attach(self) -> None:
        lf = self.lockfile = self._open_lockfile()
        try:
            self._open_registry(anyone_alive=lf.held_by_other(L.SLOT_LOCK_BASE, self.max_p))
            self.check_site()
            for i in range(self.max_p):
                if lf.acquire(L.SLOT_LOCK_BASE + i, blocking=False):
                    break
            else:
                raise NamespaceFull(
                    f"all {self.max_p} participant slots of {self.ns} are held by live "
                    "processes; raise CONFIG['max_participants']"
                )
            try:
                self._claim(i)
            except BaseException:
                lf.release(L.SLOT_LOCK_BASE + i)
                raise
        except BaseException:
            lf.release(L.INIT_LOCK)
            self._close_maps()
            lf.close()
            self.lockfile = None
            raise
        lf.release(L.INIT_LOCK)

    def _header_values(self) -> tuple[int, ...]:
        return (
            L.MAGIC,
            L.VERSION,
            self.lay.ring_bytes,
            self.max_p,
            self.lay.channel_buckets,
            self.lay.group_slots,
        )

    def _open_registry(self, anyone_alive: bool) -> None:
        size = L.registry_size(self.max_p)
        try:
            reg = Segment(self.reg_name, size, self.cfg.mode, create=not anyone_alive)
        except ValueError:  # exists with another size while others are alive
            raise NamespaceMismatch(
                f"{self.ns} is in use with a different max_participants; every process of a "
                "host must use the same sizing keys"
            ) from None
        hdr = reg.buf[: L.REG_HEADER.size]
        current = L.REG_HEADER.unpack_from(hdr)[:6]
        if not anyone_alive and not reg.created:
            try:
                self._refuse_listed_alive(reg, current)
            except BaseException:
                reg.close()
                raise
        if anyone_alive:
            if tuple(current) != self._header_values():
                reg.close()
                raise NamespaceMismatch(
                    f"{self.ns} is in use by live processes with another layout "
                    f"{current[2:]}, this process wants {self._header_values()[2:]} "
                    "(ring_bytes, max_participants, channel_buckets, group slots); every "
                    "process of a host must use the same sizing keys"
                )
            theirs = _text(reg.buf, L.H_SHM_DIR, L.H_SHM_DIR_LEN)
            if theirs and theirs != self.cfg.shm_dir:
                reg.close()
                raise NamespaceMismatch(
                    f"{self.ns} is in use by live processes with CONFIG['shm_dir'] "
                    f"{theirs!r}, this process has {self.cfg.shm_dir!r}: their doorbells "
                    "could not wake each other; give every process of a host the same "
                    "shm_dir (or another prefix/host_id for a separate namespace)"
                )
        else:
            # first one in, or a stale set left by a crash: (re)initialise everything
            if not reg.created and tuple(current) == self._header_values():
                log.info("hybrid_layer: reusing stale shared memory set %s", self.ns)
            reg.buf[:] = bytes(size)
            L.REG_HEADER.pack_into(
                reg.buf, 0, *self._header_values(), -1, 0, 0, 0, 0, 0, time.time()
            )
            _put_text(reg.buf, L.H_SHM_DIR, L.H_SHM_DIR_LEN, self.cfg.shm_dir)
            L.U64.pack_into(reg.buf, L.H_FLUSH_CHECK, L.FLUSH_CHECK_KEY)  # epoch 0
            for i in range(self.max_p):
                # a stale slot segment may have another size (layout changed)
                unlink(self.slot_name(i))
            spill.remove(spill.stem(self.ns))  # large messages nobody will read
        self.reg = reg
        self.reg_hdr = reg.view(0, L.PAGE)
        self.reg_q = reg.cast(self.reg_hdr, "Q")
        self.reg_s = reg.cast(self.reg_hdr, "i")
        self.reg_i = reg.cast(reg.buf, "I")  # whole registry: header and slot records
        self.reg_all_q = reg.cast(reg.buf, "Q")

    def _refuse_listed_alive(self, reg: Segment, header: tuple[int, ...]) -> None:
        """Nobody holds a slot lock, yet the registry exists: before it is zeroed, make
        sure no process it lists as live is still running (one that locks elsewhere: an
        older hybrid_layer, which kept its locks in ``<shm_dir>/<ns>.lock``). Zeroing
        would cut every such worker off without a word."""
        if header[0] != L.MAGIC:
            return
        max_p = min(header[3], (reg.size - L.PAGE) // L.REG_SLOT_SIZE)
        alive = []
        for i in range(max_p):
            off = L.reg_slot_offset(i)
            state, _gen, pid, _started = L.REG_SLOT.unpack_from(reg.buf, off)
            if state != L.SLOT_LIVE or pid <= 0 or pid == os.getpid():
                continue
            recorded = L.U64.unpack_from(reg.buf, off + L.REG_PSTART_OFFSET)[0]
            now = proc_start(pid)
            if now >= 0 and (recorded == 0 or recorded == now):
                alive.append(pid)
        if alive:
            log.error(
                "hybrid_layer: %s lists live process(es) %s that hold none of its locks; "
                "refusing to re-initialise it under them",
                self.ns,
                alive,
            )
            raise NamespaceMismatch(
                f"{self.ns} lists live process(es) {alive} (layout version {header[1]}) "
                f"that hold none of the locks on {self.lock_path}: they run another "
                "hybrid_layer version (before layout 5 the locks were in "
                f"<shm_dir>/{self.ns}.lock). Re-initialising would cut them off; stop "
                "them first, or give this process another CONFIG['prefix']"
            )

    def registry_unlinked(self) -> bool:
        """True (and an ERROR, once) if our registry's name was removed under us (e.g.
        systemd-logind ``RemoveIPC=yes`` at the site user's logout, or a /dev/shm
        cleaner): processes started from now on build a new namespace and cannot reach
        this one."""
        lf = self.lockfile
        if lf is None or lf.is_current():
            return False
        if not self._unlinked_told:
            self._unlinked_told = True
            log.error(
                "hybrid_layer: the shared memory %s of this live process (pid %d) was "
                "removed by something outside the layer (systemd-logind RemoveIPC=yes "
                "when the site's user logs out? a /dev/shm cleaner?). Processes started "
                "from now on cannot reach this one. Run the site as a system user or set "
                "RemoveIPC=no in logind.conf, exclude hl.* from cleaners, then restart "
                "every process of the site",
                self.lock_path,
                os.getpid(),
            )
        return True

    def _claim(self, i: int) -> None:
        assert self.reg is not None
        if self._reg_state(i) == L.SLOT_LIVE:  # a dead owner nobody reclaimed yet
            self.claimed_dropped += self._reclaim_locked(i)
        sv = self._slot_segment(i, create=True)
        assert sv is not None
        self.bell = Bell(self.bell_path(i), self.cfg.mode)
        self.rescue = Bell(self.rescue_path(i), self.cfg.mode)
        with self.ring_locked(sv):
            base = max(sv.gen, self._reg_gen(i))
            if base == 0:
                # a new segment (first start, or after the last one out removed them):
                # start anywhere, so names of an earlier namespace never match again
                base = secrets.randbits(28)
            gen = (base + 1) & 0xFFFFFFFF or 1
            sv.ring.reset()
            bk = sv.bk
            for k in range(len(bk)):
                if bk[k]:
                    bk[k] = 0
            sv.groups.clear()
            sv.cq[L.Q_FLUSH_UPTO] = 0
            sv.ci[L.I_WAITING] = 0
            sv.ci[L.I_GEN] = gen
            sv.ci[L.I_STATE] = L.SLOT_LIVE
        self.me, self.gen, self.own = i, gen, sv
        off = L.reg_slot_offset(i)
        self.reg.buf[off + 4 : off + L.REG_SLOT_SIZE] = bytes(L.REG_SLOT_SIZE - 4)
        L.REG_SLOT.pack_into(self.reg.buf, off, L.SLOT_FREE, gen, os.getpid(), time.time())
        L.U64.pack_into(self.reg.buf, off + L.REG_PSTART_OFFSET, max(0, proc_start(os.getpid())))
        self.reg_i[off // 4] = L.SLOT_LIVE  # one store: readers see FREE or LIVE
        self._bump_slots_epoch()

    # ------------------------------------------------------------------ detach
    def detach(self) -> bool:
        """Leave the namespace. True if this was the last process and names were removed."""
        lf = self.lockfile
        if lf is None:
            return False
        last = False
        try:
            if self.own is not None:
                with self.ring_locked(self.own):
                    self.own.ci[L.I_STATE] = L.SLOT_FREE
                    self.own.ci[L.I_WAITING] = 0
                    self.own.ring.reset()
                self._remove_spills(self.me, self.gen)
            self.resign()
            with self._init_locked():
                if self.reg is not None and self.me >= 0:
                    self.reg_i[L.reg_slot_offset(self.me) // 4] = L.SLOT_FREE
                    self._bump_slots_epoch()
                if self.me >= 0:
                    lf.release(L.SLOT_LOCK_BASE + self.me)
                if not lf.held_by_other(L.SLOT_LOCK_BASE, self.max_p):
                    last = True
                    self._unlink_all()
        finally:
            for b in (self.bell, self.rescue):
                if b is not None:
                    b.close()
            self._close_maps()
            lf.close()
            self.lockfile = None
            self.me = -1
        return last

    def _unlink_all(self) -> None:
        unlink(self.reg_name)
        spill.remove(spill.stem(self.ns))
        for i in range(self.max_p):
            unlink(self.slot_name(i))
            for path in (self.bell_path(i), self.rescue_path(i)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.lock_path)  # still holding INIT_LOCK: waiters will retry

    def _close_maps(self) -> None:
        for sv in self.slots.values():
            sv.close()
        self.slots.clear()
        self.own = None
        if self.reg is not None:
            self.reg.close()
            self.reg = None
        self.reg_hdr = self.reg_q = self.reg_s = self.reg_i = memoryview(b"")
        self.reg_all_q = memoryview(b"")

    def abandon(self) -> None:
        """After fork(): drop the parent's objects without touching shared state."""
        for sv in self.slots.values():
            sv.bell.close()
            sv.rescue.close()
        for b in (self.bell, self.rescue):
            if b is not None:
                b.close()
        if self.lockfile is not None:
            self.lockfile.close()  # the parent's OFD stays alive (and locked) in the parent
        self._close_maps()
        self.lockfile = None
        self.me = -1


def proc_start(pid: int) -> int:
    """Start time of process ``pid`` in clock ticks since boot; -1 if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data.rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return -1
