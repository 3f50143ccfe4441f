"""A process's attachment to its host namespace: slots, rings, liveness, cleanup.

Every lock is a byte of the registry segment's own file (``/dev/shm/<ns>.reg``): the
namespace is live exactly while that shared memory has a lock holder, whatever happens
to the files in ``shm_dir``.

Attach: take ``INIT_LOCK``; create the registry, or validate it (a stale set left by a
crash - no slot lock held by anyone and no live process listed - is re-initialised, a
live one with another layout or ``shm_dir`` is refused); claim the first slot whose
liveness lock is free; bump its incarnation and reset its ring under the ring lock;
release ``INIT_LOCK``.

Detach: mark the slot free; under ``INIT_LOCK`` release the slot lock; if no slot lock
is held by anyone the caller was the last one out and unlinks every name.

Everything here is called from the layer's code with no event loop involved.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from .._log import limited
from ..config import LayerConfig
from ..errors import NamespaceFull, NamespaceMismatch
from . import layout as L
from . import spill
from .doorbell import Bell, BellPush
from .groupset import GroupSet
from .locks import LockFile
from .ring import Ring
from .segment import Segment, unlink

log = logging.getLogger("hybrid_layer")

# results of a write into a ring
OK = 0
FULL_CHANNEL = 1
FULL_RING = 2
NO_CHANNEL = 3
LINK_DOWN = 4  # broker mode: a message for another host while the leader's link is down


class SlotView:
    """A mapping of one slot's segment, as seen by any process."""

    __slots__ = (
        "bell",
        "bk",
        "ci",
        "cq",
        "groups",
        "half",
        "index",
        "rescue",
        "ring",
        "seg",
        "tlock",
    )

    def __init__(self, seg: Segment, lay: L.SlotLayout, index: int, bell: str, rescue: str):
        self.seg = seg
        self.index = index
        ctrl = seg.view(0, L.PAGE)
        # typed views: every shared word is one untorn load/store (see layout.U64)
        self.cq = seg.cast(ctrl, "Q")
        self.ci = seg.cast(ctrl, "I")
        # capacity buckets: bk[2b] = enq (writers, under the ring lock), bk[2b+1] = deq
        self.bk = seg.cast(
            seg.view(lay.buckets_offset, lay.buckets_offset + lay.bucket_count * 8), "I"
        )
        self.groups = GroupSet(ctrl, seg.view(lay.groups_offset, lay.ring_offset))
        self.ring = Ring(ctrl, seg.view(lay.ring_offset, lay.size))
        self.half = self.ring.size >> 1
        self.bell = BellPush(bell)
        self.rescue = BellPush(rescue)
        self.tlock = threading.Lock()

    @property
    def gen(self) -> int:
        return self.ci[L.I_GEN]

    @property
    def live(self) -> bool:
        return self.ci[L.I_STATE] == L.SLOT_LIVE

    def pending(self, bucket: int) -> int:
        """Messages counted against ``bucket`` (a negative difference reads as 0)."""
        d = (self.bk[2 * bucket] - self.bk[2 * bucket + 1]) & 0xFFFFFFFF
        return d if d < 0x80000000 else 0

    def close(self) -> None:
        self.bell.close()
        self.rescue.close()
        self.ring.release()
        self.groups.release()
        self.seg.close()


class Leader(NamedTuple):
    slot: int
    gen: int
    pid: int
    epoch: int


# ring records (messages) that their destination's capacity buckets do not count
_OUT_KINDS = frozenset({L.KIND_OUT_DIRECT, L.KIND_OUT_GROUP, L.KIND_OUT_NORMAL})
_NOT_IN_BUCKETS = frozenset({L.KIND_GROUP, L.KIND_OUT_DIRECT, L.KIND_OUT_GROUP, L.KIND_OUT_NORMAL})


class Namespace:
    """One participant's view of the host namespace. Not shared across ``fork()``."""

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

    # ------------------------------------------------------------------ attach
    @contextlib.contextmanager
    def _init_locked(self) -> Iterator[LockFile]:
        assert self.lockfile is not None
        self.lockfile.acquire(L.INIT_LOCK)
        try:
            yield self.lockfile
        finally:
            self.lockfile.release(L.INIT_LOCK)

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

    # ------------------------------------------------------------------ site
    def check_site(self) -> None:
        """Caller holds INIT_LOCK. Two sites with one prefix (same user, same host) would
        silently share groups, normal channels and flush(): compare this process's site
        with the one recorded in the registry. Two explicit CONFIG['site'] values that
        differ are refused; a clash involving a guess is an ERROR and a counted
        ``site_clash`` (a guess may differ between one site's own processes)."""
        assert self.reg is not None
        buf = self.reg.buf
        label, explicit = site_identity(self.cfg)
        if not label:
            return
        fp = _site_hash(label)
        theirs_fp, theirs_flags = struct.unpack_from("<QQ", buf, L.H_SITE)
        theirs = _text(buf, L.H_SITE_LABEL, L.H_SITE_LABEL_LEN)
        theirs_explicit = bool(theirs_flags & L.SITE_EXPLICIT)
        if theirs_fp == 0 or (explicit and not theirs_explicit and not _clash(label, theirs)):
            struct.pack_into("<QQ", buf, L.H_SITE, fp, L.SITE_EXPLICIT if explicit else 0)
            _put_text(buf, L.H_SITE_LABEL, L.H_SITE_LABEL_LEN, label)
            return
        if theirs_fp == fp or not _clash(label, theirs):
            return
        what = (
            f"{self.ns} (CONFIG['prefix'] {self.cfg.prefix!r}) is in use by site {theirs!r}, "
            f"this process is site {label!r}: two sites sharing one prefix would exchange "
            "group messages and normal-channel jobs, and one's flush() would erase the "
            "other's groups. Give each site its own CONFIG['prefix']"
        )
        if explicit and theirs_explicit:
            raise NamespaceMismatch(what)
        self.site_clash = what
        log.error(
            "hybrid_layer: %s (or set CONFIG['site'] the same in every process of one site "
            "if this is one site seen two ways)",
            what,
        )

    def site(self) -> tuple[str, bool]:
        """The site recorded in the registry: (label, explicit)."""
        assert self.reg is not None
        flags = struct.unpack_from("<Q", self.reg.buf, L.H_SITE + 8)[0]
        return _text(self.reg.buf, L.H_SITE_LABEL, L.H_SITE_LABEL_LEN), bool(
            flags & L.SITE_EXPLICIT
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

    # ------------------------------------------------------------------ liveness
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

    def reclaim(self, i: int, salvage: Callable[[Any], bool] | None = None) -> int:
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

    def _reclaim_locked(self, i: int, salvage: Callable[[Any], bool] | None = None) -> int:
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

    # ------------------------------------------------------------------ leader
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

    # ------------------------------------------------------------------ flush
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

    # ------------------------------------------------------------------ word repair
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


_U64 = (1 << 64) - 1


def proc_start(pid: int) -> int:
    """Start time of process ``pid`` in clock ticks since boot; -1 if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data.rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return -1


def site_identity(cfg: LayerConfig) -> tuple[str, bool]:
    """(label, explicit): CONFIG['site'], else a guess from Django's settings module and
    BASE_DIR - the same for uvicorn, gunicorn, runworker, management commands and Celery
    of one project - else ("", False): unknown, nothing is checked."""
    if cfg.site:
        return cfg.site, True
    module = os.environ.get("DJANGO_SETTINGS_MODULE", "")
    if not module:
        return "", False
    base = ""
    try:
        from django.conf import settings

        if settings.configured and getattr(settings, "BASE_DIR", None):
            base = os.path.realpath(str(settings.BASE_DIR))
    except Exception:  # no Django, or settings that cannot load: the module is enough
        base = ""
    return f"django:{module}@{base}" if base else f"django:{module}", False


def _site_hash(label: str) -> int:
    h = int.from_bytes(hashlib.blake2b(label.encode(), digest_size=8).digest(), "little")
    return h or 1


def _clash(a: str, b: str) -> bool:
    """Two site labels that cannot be one site. A guess without BASE_DIR (settings not
    loaded yet) matches a guess with it when the settings modules agree."""
    if a == b:
        return False
    if a.startswith("django:") and b.startswith("django:"):
        ma, _, ba = a.partition("@")
        mb, _, bb = b.partition("@")
        return ma != mb or bool(ba and bb and ba != bb)
    return True


def _text(buf: memoryview, off: int, n: int) -> str:
    return bytes(buf[off : off + n]).split(b"\0", 1)[0].decode("utf-8", "replace")


def _put_text(buf: memoryview, off: int, n: int, value: str) -> None:
    raw = value.encode("utf-8")[: n - 1]
    buf[off : off + n] = raw + bytes(n - len(raw))


# x86-64 orders everything but store->load; a lock-prefixed instruction (what an
# uncontended pthread/sem lock does) is a full barrier there
_CHEAP_FENCE = platform.machine().lower() in ("x86_64", "amd64")
_fence_lock = threading.Lock()
