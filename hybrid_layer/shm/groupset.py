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

from .layout import CTRL_GROUP_SEQ, CTRL_GROUP_USED, U32, U64

EMPTY = 0
TOMBSTONE = 1
_u64_unpack = U64.unpack_from
_u64_pack = U64.pack_into


@lru_cache(maxsize=65536)
def name_hash(kind: str, name: str) -> int:
    """Stable across processes (unlike ``hash()``); never EMPTY or TOMBSTONE."""
    h = int.from_bytes(
        hashlib.blake2b(f"{kind}\x00{name}".encode(), digest_size=8).digest(), "little"
    )
    return h if h > TOMBSTONE else h + 2


class GroupSet:
    __slots__ = ("ctrl", "table", "mask", "slots")

    def __init__(self, ctrl: memoryview, table: memoryview) -> None:
        slots = len(table) // 8
        if slots < 4 or slots & (slots - 1):
            raise ValueError("group set table must hold a power of two (>= 4) of entries")
        self.ctrl = ctrl
        self.table = table
        self.slots = slots
        self.mask = slots - 1

    # ---------------------------------------------------------------- readers
    def maybe_contains(self, h: int) -> bool:
        seq = _u64_unpack(self.ctrl, CTRL_GROUP_SEQ)[0]
        if seq & 1:
            return True
        found = self._find(h) >= 0
        if _u64_unpack(self.ctrl, CTRL_GROUP_SEQ)[0] != seq:
            return True
        return found

    def _find(self, h: int) -> int:
        table, mask = self.table, self.mask
        i = h & mask
        for _ in range(self.slots):
            v = _u64_unpack(table, i * 8)[0]
            if v == h:
                return i
            if v == EMPTY:
                return -1
            i = (i + 1) & mask
        return -1

    # ---------------------------------------------------------------- owner only
    @property
    def used(self) -> int:
        return int(U32.unpack_from(self.ctrl, CTRL_GROUP_USED)[0])

    def add(self, h: int) -> None:
        if self._find(h) >= 0:
            return
        if (self.used + 1) * 2 > self.slots:
            self._rebuild(extra=h)
            return
        table, mask = self.table, self.mask
        i = h & mask
        while True:
            v = _u64_unpack(table, i * 8)[0]
            if v == EMPTY:
                U32.pack_into(self.ctrl, CTRL_GROUP_USED, self.used + 1)
                _u64_pack(table, i * 8, h)
                return
            if v == TOMBSTONE:  # reuse; ``used`` already counts it
                _u64_pack(table, i * 8, h)
                return
            i = (i + 1) & mask

    def discard(self, h: int) -> None:
        i = self._find(h)
        if i >= 0:
            _u64_pack(self.table, i * 8, TOMBSTONE)

    def live(self) -> list[int]:
        out = []
        for i in range(self.slots):
            v = _u64_unpack(self.table, i * 8)[0]
            if v > TOMBSTONE:
                out.append(v)
        return out

    def clear(self) -> None:
        self._bump()
        self.table[:] = bytes(len(self.table))
        U32.pack_into(self.ctrl, CTRL_GROUP_USED, 0)
        self._bump()

    def _bump(self) -> None:
        _u64_pack(self.ctrl, CTRL_GROUP_SEQ, _u64_unpack(self.ctrl, CTRL_GROUP_SEQ)[0] + 1)

    def _rebuild(self, extra: int) -> None:
        keep = self.live()
        keep.append(extra)
        if len(keep) * 2 > self.slots:
            raise OverflowError(
                f"this process is in more than {self.slots // 2} groups/normal channels; "
                "raise CONFIG['max_groups_per_process']"
            )
        self._bump()  # odd: readers answer "maybe"
        self.table[:] = bytes(len(self.table))
        mask = self.mask
        for h in keep:
            i = h & mask
            while _u64_unpack(self.table, i * 8)[0] != EMPTY:
                i = (i + 1) & mask
            _u64_pack(self.table, i * 8, h)
        U32.pack_into(self.ctrl, CTRL_GROUP_USED, len(keep))
        self._bump()
