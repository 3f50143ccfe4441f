"""Housekeeping: flushes, expiry sweeps, self-repair of shared words, stray segments.

Theory of operation
-------------------
Work every process does for itself, off the per-message path:

- ``check_flush``: ``flush()`` bumps the host's flush epoch and records the ring
  positions it covers; each process, on its next ``take``/``drain`` (one word compared
  per call) or tick, drops what it queued (and parked) from before the flush;
- ``sweep`` (host thread, every ``SWEEP_EVERY``): drops expired messages from local
  queues and parked ones;
- ``check_words`` (host thread): validates this process's control words in shared
  memory and repairs what a corrupted byte changed - the group set's seqlock and
  contents (rebuilt from ``groups``, ``readers`` and ``parked``) and the capacity
  counters (``_buckets_corrupt``, then ``_resync_buckets`` while the ring is empty);
- ``sweep_spills``: removes large-message segments of this slot that no record can
  refer to any more (a sender killed while writing one).

``_resync_buckets`` is also the recount ``drain`` uses after dropping unread records.
State: none of its own; it works on the queues and counters under ``lock`` (and the
ring lock where the ring must stay still).
"""

from __future__ import annotations

import time
from collections import deque

from ._log import limited
from .shm import layout as L
from .shm import spill
from .shm.groupset import TAG_OTHER, TOMBSTONE, name_hash
from .state import EXPIRED, ParticipantState

_monotonic = time.monotonic
#: the sweep of large-message segments no record refers to removes those older than
#: ``expiry`` + SPILL_GRACE (see ``host_thread.SPILL_SWEEP_EVERY``)
SPILL_GRACE = 5.0


class Housekeeping(ParticipantState):
    def check_flush(self) -> None:
        epoch, repaired = self.ns.flush_epoch_checked(self.flush_seen)
        if repaired:
            self.counters.repaired += 1
        if epoch == self.flush_seen:
            return
        with self.lock:
            if epoch == self.flush_seen:
                return
            self.flush_seen = epoch
            upto = self.ns.flush_upto()
            c = self.counters
            for store in (self.queues, self.parked):
                for channel in list(store):
                    q = store[channel]
                    kept = deque(i for i in q if i.pos >= upto)
                    n = 0
                    for item in q:
                        if item.pos < upto:
                            n += 1
                            if item.bucket >= 0:
                                self._deq(item.bucket, 1)
                    if n:
                        c.drop(
                            "flushed",
                            n,
                            "hybrid_layer: %d queued message(s) for %r flushed",
                            n,
                            channel,
                        )
                    if kept:
                        store[channel] = kept
                    else:
                        del store[channel]
            self.groups.clear()
            self.own.groups.clear()
            if self.link is not None:
                self.link.request_flush()
            for channel in self.readers:  # readers are live receivers: keep them
                self.own.groups.add(name_hash("n", channel))

    def sweep(self) -> None:
        """Drop expired messages from local queues (and parked ones)."""
        now = _monotonic()
        c = self.counters
        with self.lock:
            for store in (self.queues, self.parked):
                for channel in list(store):
                    q = store[channel]
                    n = 0
                    while q and q[0].expires_at < now:
                        item = q.popleft()
                        n += 1
                        if item.bucket >= 0:
                            self._deq(item.bucket, 1)
                    if n:
                        where = "parked" if store is self.parked else "in its queue"
                        c.drop("expired", n, EXPIRED, channel, where, self.cfg.expiry)
                    if not q:
                        del store[channel]

    def check_words(self) -> int:
        """Validate this process's control words in shared memory and repair what a
        corrupted byte changed; each repair is counted (``repaired``) and logged.
        Called by the host thread every SWEEP_EVERY. Returns the repairs made."""
        fixed = self.ns.repair_own_words(self.ns.is_leader)
        own = self.own
        with self.lock:
            gs = own.groups
            if gs.cq[L.Q_GROUP_SEQ] & 1:  # we write it only under self.lock: stuck odd
                fixed.append(f"group set seqlock {gs.cq[L.Q_GROUP_SEQ]:#x}")
                gs.cq[L.Q_GROUP_SEQ] = (gs.cq[L.Q_GROUP_SEQ] + 1) & 0xFFFFFFFFFFFFFFFF
            want = {name_hash("g", g) for g in self.groups.groups}
            want |= {name_hash("n", ch) for ch in self.readers}
            want |= {name_hash("p", ch) for ch in self.parked}
            have = [v for v in gs.table if v]
            live = {v for v in have if v > TOMBSTONE}
            extra = {h for h in live - want if h & 3 != TAG_OTHER}  # (flags: the link's)
            if not want <= live or extra or gs.used != len(have) or gs.used > gs.slots:
                fixed.append(f"group set ({len(want - live)} missing, {len(extra)} foreign)")
                keep = want | {h for h in live if h & 3 == TAG_OTHER and h not in extra}
                gs.clear()
                for h in keep:
                    gs.add(h)
        if self._buckets_corrupt():
            with self.read_lock, self.ns.ring_locked(own):
                if own.ring.used() == 0:  # else: writers are busy, look again later
                    before = own.bk.tobytes()
                    self._resync_buckets()  # exact: the ring is empty
                    if own.bk.tobytes() != before:
                        fixed.append("capacity counters")
        if fixed:
            self.counters.repaired += len(fixed)
            limited.warning(
                "repaired",
                "hybrid_layer: repaired corrupted shared words of slot %d: %s",
                self.slot,
                "; ".join(fixed),
            )
        return len(fixed)

    def _buckets_corrupt(self) -> bool:
        """A capacity counter that cannot be: over every capacity (a writer counts a
        message only while its channel is under capacity; a negative difference is a
        huge one here), or - while the inbox is empty - not what is queued here."""
        own = self.own
        bk = own.bk
        cfg = self.cfg
        bound = max([cfg.capacity, *(c for _, c in cfg.channel_capacity)])
        local: dict[int, int] | None = None
        if own.ring.used() == 0:
            local = {}
            with self.lock:
                for store in (self.queues, self.parked):
                    for q in store.values():
                        for item in q:
                            if item.bucket >= 0:
                                local[item.bucket] = local.get(item.bucket, 0) + 1
        for k in range(0, len(bk), 2):
            d = (bk[k] - bk[k + 1]) & 0xFFFFFFFF
            if d > bound or (local is not None and d != local.get(k >> 1, 0)):
                return True  # (a race with a writer is rechecked under the ring lock)
        return False

    def _resync_buckets(self) -> int:
        """After discarding the unread ring (caller holds the ring lock, so ``enq`` is
        still): count only what is queued locally, or the dropped records would hold
        their channels' capacity for ever. Returns how many messages that wrote off
        (direct and normal-channel records that were in the ring)."""
        gone = 0
        with self.lock:
            local: dict[int, int] = {}
            for store in (self.queues, self.parked):
                for q in store.values():
                    for item in q:
                        if item.bucket >= 0:
                            local[item.bucket] = local.get(item.bucket, 0) + 1
            bk = self.own.bk
            for b in range(len(bk) // 2):
                want = (bk[2 * b] - local.get(b, 0)) & 0xFFFFFFFF
                if bk[2 * b + 1] != want:
                    gone += (want - bk[2 * b + 1]) & 0xFFFFFFFF
                    bk[2 * b + 1] = want
        return gone if gone < 0x80000000 else 0

    def sweep_spills(self) -> None:
        """Backstop: remove this slot's large-message segments that no record can
        refer to any more (see ``shm.spill``)."""
        n = spill.sweep(
            spill.stem(self.ns.ns, self.slot),
            self._spill_stem,
            self.cfg.expiry + SPILL_GRACE,
        )
        if n:
            limited.warning(
                "spill-sweep",
                "hybrid_layer: removed %d large-message segment(s) no record referred to "
                "(a sender died while writing one)",
                n,
            )
