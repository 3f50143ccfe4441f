"""A single-writer set of 64-bit name hashes over a shared buffer (pure: no OS calls).

Each participant publishes the groups it has local members in (and the normal channels
it reads) as hashes in its own slot segment. Only the owner writes; any process reads.

* open addressing, linear probing; ``0`` = empty, ``1`` = tombstone;
* an insert or a delete is one aligned 8-byte store, so a reader sees the old or the new
  state; a rebuild (too many tombstones) is bracketed by a seqlock, and a reader that
  sees the sequence odd or changed answers "maybe a member";
* a false positive is harmless by design: the owner filters by its own exact table, so
  a spurious copy is dropped there. A false negative would lose a message and cannot
  happen while the owner is alive.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

from .layout import I_GROUP_USED, Q_GROUP_CHANGES, Q_GROUP_SEQ

EMPTY = 0
_U64 = (1 << 64) - 1
TOMBSTONE = 1


#: the low two bits of a hash say what it stands for, so that the leader can read the
#: union of every slot's set and tell groups (to bind) from normal channels (to consume)
TAG_GROUP = 0
TAG_NORMAL = 1
TAG_PARKED = 2
TAG_OTHER = 3
_TAGS = {"g": TAG_GROUP, "n": TAG_NORMAL, "p": TAG_PARKED}


@lru_cache(maxsize=65536)
def name_hash(kind: str, name: str) -> int:
    """Stable across processes (unlike ``hash()``); never EMPTY or TOMBSTONE; its low two
    bits are the tag of ``kind`` ("g" group, "n" normal channel, "p" parked, else other)."""
    h = int.from_bytes(
        hashlib.blake2b(f"{kind}\x00{name}".encode(), digest_size=8).digest(), "little"
    )
    h = (h & ~3) | _TAGS.get(kind, TAG_OTHER)
    return h if h > TOMBSTONE else h + 4


class GroupSet:
    __slots__ = ("ci", "cq", "mask", "slots", "table")

    def __init__(self, ctrl: memoryview | bytearray, table: memoryview | bytearray) -> None:
        slots = len(table) // 8
        if slots < 4 or slots & (slots - 1):
            raise ValueError("group set table must hold a power of two (>= 4) of entries")
        # every entry and counter is accessed as a whole word of a typed view: one
        # untorn load or store (struct.pack_into would zero the entry first, and a
        # reader could take a live entry for EMPTY)
        ctrl_b = memoryview(ctrl).cast("B")
        self.cq = ctrl_b.cast("Q")
        self.ci = ctrl_b.cast("I")
        self.table = memoryview(table).cast("B").cast("Q")
        self.slots = slots
        self.mask = slots - 1

    def release(self) -> None:
        self.cq.release()
        self.ci.release()
        self.table.release()

    # ---------------------------------------------------------------- readers
    def maybe_contains(self, h: int) -> bool:
        cq = self.cq
        seq = cq[Q_GROUP_SEQ]
        if seq & 1:
            return True
        found = self._find(h) >= 0
        if cq[Q_GROUP_SEQ] != seq:
            return True
        return found

    @property
    def changes(self) -> int:
        """Bumped by the owner on every change: a reader re-reads the set when it moves."""
        return self.cq[Q_GROUP_CHANGES]

    def snapshot(self) -> set[int] | None:
        """Every live entry, or ``None`` if the owner rebuilt the set meanwhile (retry)."""
        cq = self.cq
        seq = cq[Q_GROUP_SEQ]
        if seq & 1:
            return None
        out = set(self.table)
        if cq[Q_GROUP_SEQ] != seq:
            return None
        out.discard(EMPTY)
        out.discard(TOMBSTONE)
        return out

    def _find(self, h: int) -> int:
        table, mask = self.table, self.mask
        i = (h >> 2) & mask  # the low two bits are the tag
        for _ in range(self.slots):
            v = table[i]
            if v == h:
                return i
            if v == EMPTY:
                return -1
            i = (i + 1) & mask
        return -1

    # ---------------------------------------------------------------- owner only
    @property
    def used(self) -> int:
        return self.ci[I_GROUP_USED]

    def add(self, h: int) -> None:
        if self._find(h) >= 0:
            return
        if (self.used + 1) * 2 > self.slots:
            self._rebuild(extra=h)
            return
        table, mask = self.table, self.mask
        i = (h >> 2) & mask  # the low two bits are the tag
        for _ in range(self.slots):
            v = table[i]
            if v == EMPTY:
                self.ci[I_GROUP_USED] = self.used + 1
                table[i] = h
                self._changed()
                return
            if v == TOMBSTONE:  # reuse; ``used`` already counts it
                table[i] = h
                self._changed()
                return
            i = (i + 1) & mask
        self._rebuild(extra=h)  # no free entry: ``used`` was wrong (a corrupted word)

    def _changed(self) -> None:
        self.cq[Q_GROUP_CHANGES] = (self.cq[Q_GROUP_CHANGES] + 1) & _U64  # (wraps)

    def discard(self, h: int) -> None:
        i = self._find(h)
        if i >= 0:
            self.table[i] = TOMBSTONE
            self._changed()

    def live(self) -> list[int]:
        return [v for v in self.table if v > TOMBSTONE]

    def clear(self) -> None:
        self._bump()
        self._zero()
        self.ci[I_GROUP_USED] = 0
        self._bump()
        self._changed()

    def _zero(self) -> None:
        with self.table.cast("B") as raw:
            raw[:] = bytes(self.slots * 8)

    def _bump(self) -> None:
        self.cq[Q_GROUP_SEQ] = (self.cq[Q_GROUP_SEQ] + 1) & _U64  # (wraps)

    def _rebuild(self, extra: int) -> None:
        keep = self.live()
        keep.append(extra)
        if len(keep) * 2 > self.slots:
            raise OverflowError(
                f"this process is in more than {self.slots // 2} groups/normal channels; "
                "raise CONFIG['max_groups_per_process']"
            )
        self._bump()  # odd: readers answer "maybe"
        self._zero()
        mask = self.mask
        table = self.table
        for h in keep:
            i = (h >> 2) & mask  # the low two bits are the tag
            while table[i] != EMPTY:
                i = (i + 1) & mask
            table[i] = h
        self.ci[I_GROUP_USED] = len(keep)
        self._bump()
        self._changed()
