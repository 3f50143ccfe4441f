"""The statistics a layer reports: assembled from its participant and the host's registry.

``HybridChannelLayer.statistics()``, ``global_statistics()`` and
``channel_statistics()`` delegate here. ``process_statistics`` reads this process's
counters and its view of the host; ``host_statistics`` sums the counters every live
participant mirrors into its registry record (about once a second) and reads what is
pending live from the capacity buckets in shared memory; ``channel_statistics`` reads
one channel's buckets (a process channel's reader, or a normal channel's readers and
the leader that parks for it); ``broker_info`` describes the leader's link as this
process sees it, plus the link's own details in the leader.

Owns no state; reads shared memory without locks (each word is one untorn load, a sum
may mix instants). Called on demand by users, health checks and the Prometheus
collector: nothing here is on a per-message path.
"""

from __future__ import annotations

import os
from typing import Any

from .config import LayerConfig
from .names import parse
from .participant import Participant
from .shm import layout as L
from .shm.groupset import name_hash
from .shm.layout import STATS_FIELDS
from .stats import (
    ChannelStatistics,
    Statistics,
    broker_counts,
    bucket_pending,
    integrity_counts,
    split,
)

LINK_NAMES = {
    L.LINK_NONE: "none",
    L.LINK_DOWN: "down",
    L.LINK_UP: "up",
    L.LINK_CONNECTING: "connecting",
}


def process_statistics(p: Participant, cfg: LayerConfig) -> Statistics:
    """This process's counters and its view of the host."""
    raised, dropped = split(p.counters.as_dict())
    ring = p.own.ring
    ld = p.ns.leader()
    c = p.counters
    return Statistics(
        sent=c.sent,
        received=c.received,
        group_sends=c.group_sends,
        group_copies=c.group_copies,
        raised=raised,
        dropped=dropped,
        pending=p.pending(),
        ring_used_bytes=ring.used(),
        ring_size_bytes=ring.size,
        participants=len(p.ns.live_slots()),
        leader_pid=ld.pid,
        leader_epoch=ld.epoch,
        is_leader=p.ns.is_leader,
        pid=os.getpid(),
        slot=p.slot,
        extra={
            "groups": len(p.groups),
            "normal_readers": len(p.readers),
            "parked": sum(len(q) for q in p.parked.values()),
            # sends whose wake-up was not written: the bell was not a FIFO of ours
            "doorbells_refused": p.ns.doorbells_refused(),
            **integrity_counts(p.counters.as_dict()),
        },
        broker=broker_info(p, cfg, p.counters.as_dict()),
    )


def broker_info(p: Participant, cfg: LayerConfig, counts: dict[str, int]) -> dict[str, Any]:
    """The leader's link as this process sees it (plus details if it leads)."""
    if not cfg.broker:
        return {}
    state, syncs, changes = p.ns.link_state()
    info: dict[str, Any] = {
        "link": LINK_NAMES.get(state, "none"),
        "link_changes": changes,
        "binding_syncs": syncs,
        # why it is not up ("" while up); the leader's own entry says more
        "reason": L.REASONS.get(p.ns.link_get(L.LQ_REASON, p.ns.leader().slot), "")
        if state != L.LINK_UP
        else "",
        "last_sync": p.ns.link_get(L.LQ_SYNC_AT, p.ns.leader().slot) / 1000.0,
        **broker_counts(counts),
    }
    link = p.link
    if link is not None:
        info.update(link.info())
    return info


def host_statistics(p: Participant, cfg: LayerConfig) -> Statistics:
    """``global_statistics()``: see there for what ``pending`` does and does not count."""
    p.ns.publish_stats(p.counters.values())
    totals = dict.fromkeys(STATS_FIELDS, 0)
    live = p.ns.live_slots()
    ring_used = 0
    pending = 0
    for i in live:
        for k, v in zip(STATS_FIELDS, p.ns.slot_stats(i), strict=True):
            totals[k] += v
        sv = p.ns.slot(i)
        if sv is not None:
            ring_used += sv.ring.used()
            pending += bucket_pending(sv.bk)
    raised, dropped = split(totals)
    ld = p.ns.leader()
    return Statistics(
        sent=totals["sent"],
        received=totals["received"],
        group_sends=totals["group_sends"],
        group_copies=totals["group_copies"],
        raised=raised,
        dropped=dropped,
        pending=pending,
        ring_used_bytes=ring_used,
        ring_size_bytes=p.own.ring.size * len(live),
        participants=len(live),
        leader_pid=ld.pid,
        leader_epoch=ld.epoch,
        is_leader=p.ns.is_leader,
        pid=os.getpid(),
        slot=p.slot,
        extra=integrity_counts(totals),
        broker=broker_info(p, cfg, totals),
    )


def channel_statistics(p: Participant, cfg: LayerConfig, channel: str) -> ChannelStatistics:
    """Messages waiting on ``channel`` (its reader's capacity counters) and capacity."""
    cap = cfg.capacity_for(channel)
    if "!" in channel:
        addr = parse(channel)
        if addr is None or addr.host_id != cfg.host_id or addr.bucket >= p.K:
            return ChannelStatistics(channel, 0, cap, False)
        sv = p.ns.slot(addr.slot)
        pending = sv.pending(addr.bucket) if sv is not None and sv.gen == addr.gen else 0
        return ChannelStatistics(channel, pending, cap, True)
    # a normal channel's messages wait with its readers and, parked, with the leader
    bucket = p.normal_bucket(channel)
    holders = {sv.index: sv for sv in p.ns.slots_with(name_hash("n", channel))}
    leader = p.ns.slot(p.ns.leader().slot) if p.ns.leader().slot >= 0 else None
    if leader is not None:
        holders[leader.index] = leader
    pending = sum(sv.pending(bucket) for sv in holders.values())
    return ChannelStatistics(channel, pending, cap, True)
