"""Counters and the frozen statistics structs returned to users."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .shm.layout import STATS_FIELDS


class Counters:
    """Plain integer counters of one participant (mirrored to shared memory)."""

    __slots__ = STATS_FIELDS

    def __init__(self) -> None:
        for f in STATS_FIELDS:
            setattr(self, f, 0)

    def values(self) -> tuple[int, ...]:
        return tuple(getattr(self, f) for f in STATS_FIELDS)

    def as_dict(self) -> dict[str, int]:
        return dict(zip(STATS_FIELDS, self.values(), strict=True))


@dataclass(frozen=True)
class Statistics:
    """One process's view (``layer.statistics()``) or the host's (``global_statistics()``).

    ``dropped`` maps a reason to a count: ``full`` (a group or forwarded copy found its
    channel or inbox full), ``expired``, ``no_channel`` (the reader is gone or the name
    routes nowhere), ``corrupt`` (an invalid record in shared memory), ``dead_reader``
    (left unread in a dead process's inbox), ``flushed``. ``send()`` raising
    ``ChannelFull`` or ``MessageTooLarge`` is counted in ``raised``, not ``dropped``.
    """

    sent: int
    received: int
    group_sends: int
    group_copies: int
    raised: dict[str, int]
    dropped: dict[str, int]
    pending: int
    ring_used_bytes: int
    ring_size_bytes: int
    participants: int
    leader_pid: int
    leader_epoch: int
    is_leader: bool
    pid: int
    slot: int
    extra: dict[str, int] = field(default_factory=dict)
    #: broker mode: ``link`` ("up", "down", "connecting", "none"), ``link_changes``,
    #: ``binding_syncs``; in the leader also url, queue, bindings, normal_consumers,
    #: outbound, in_flight. Empty on a single host.
    broker: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChannelStatistics:
    channel: str
    pending: int
    capacity: int
    local: bool


def split(values: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    raised = {"full": values["raised_full"], "too_large": values["raised_too_large"]}
    dropped = {k[len("dropped_") :]: v for k, v in values.items() if k.startswith("dropped_")}
    return raised, dropped


def broker_counts(values: dict[str, int]) -> dict[str, int]:
    """published, confirmed, returned, received, reconnects (the leader's link)."""
    return {k[len("broker_") :]: v for k, v in values.items() if k.startswith("broker_")}


def integrity_counts(values: dict[str, int]) -> dict[str, int]:
    """``repaired`` (corrupted shared control words found and repaired) and
    ``site_clash`` (another site seen sharing this namespace): in ``extra``."""
    return {"repaired": values["repaired"], "site_clash": values["site_clash"]}
