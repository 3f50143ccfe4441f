"""One slot's segment as any process maps it: its ring, groups, buckets and bells.

A :class:`SlotView` is what a process holds to reach another participant (or itself):
typed views on the slot's control page (``ci``/``cq``: state, incarnation, waiting flag,
flush position), its capacity buckets (``bk``), its published interest set
(``groups``), its inbox ``ring``, and the two doorbells (``bell`` wakes a receiver,
``rescue`` the owner's host thread). It owns no shared state: the namespace's
``slots`` map holds one per slot ever looked at, and closes them on detach.

Invariants: every shared word is read and written through a typed view (one untorn
load/store); ``tlock`` serialises this process's threads in front of the ring lock
(``Namespace.ring_locked``). Hot: ``pending`` (capacity checks) and the attributes
``ci``, ``bk``, ``ring``, ``bell``, ``rescue``, ``half`` on every write into a ring
(``__slots__``: one descriptor lookup each).
"""

from __future__ import annotations

import threading

from . import layout as L
from .doorbell import BellPush
from .groupset import GroupSet
from .ring import Ring
from .segment import Segment


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
