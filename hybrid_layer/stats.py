"""Counters and the frozen statistics structs returned to users."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ._log import limited
from .shm.layout import STATS_FIELDS

#: every reason a message can be dropped for (``Statistics.dropped``'s keys)
DROP_REASONS = tuple(f[len("dropped_") :] for f in STATS_FIELDS if f.startswith("dropped_"))
_DROP_FIELD = {r: "dropped_" + r for r in DROP_REASONS}
#: a flush is asked for: what it empties is logged at INFO, every other drop at WARNING
_DROP_LEVEL = {r: logging.INFO if r == "flushed" else logging.WARNING for r in DROP_REASONS}


class Counters:
    """Plain integer counters of one participant (mirrored to shared memory)."""

    __slots__ = STATS_FIELDS
    # one annotation per STATS_FIELDS entry, in its order, for the type checker (no
    # class attributes: the slots above are the storage; a unit test keeps them equal)
    sent: int
    received: int
    group_sends: int
    group_copies: int
    raised_full: int
    raised_too_large: int
    dropped_full: int
    dropped_expired: int
    dropped_no_channel: int
    dropped_corrupt: int
    dropped_dead_reader: int
    dropped_flushed: int
    dropped_link_down: int
    dropped_remote_full: int
    dropped_malformed: int
    broker_published: int
    broker_confirmed: int
    broker_returned: int
    broker_received: int
    broker_reconnects: int
    broker_batches: int
    dropped_too_large: int
    broker_duplicates: int
    broker_retried: int
    broker_republished: int
    broker_claim_refused: int
    broker_nacked: int
    dropped_unauthenticated: int
    repaired: int
    site_clash: int

    def __init__(self) -> None:
        for f in STATS_FIELDS:
            setattr(self, f, 0)

    def drop(self, reason: str, n: int, msg: str, *args: object) -> None:
        """Count ``n`` messages dropped for ``reason`` and log it, rate-limited per site
        (``msg`` % ``args`` says what and why; see ``_log``). Every drop goes here."""
        f = _DROP_FIELD[reason]
        setattr(self, f, getattr(self, f) + n)
        limited.dropped(reason, n, msg, args, _DROP_LEVEL[reason])

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
    (left unread in a dead process's inbox), ``flushed``; broker mode: ``link_down``,
    ``remote_full``, ``malformed``, ``too_large``, ``unauthenticated`` (refused: with
    ``symmetric_encryption_keys`` no valid token, a replay, sealed for another route;
    or a group copy with a spoofed origin). ``send()`` raising
    ``ChannelFull`` or ``MessageTooLarge`` is counted in ``raised``, not ``dropped``.
    In broker mode also ``link_down``, ``remote_full``, ``malformed`` (a message that
    decodes to no valid message) and ``too_large``. Every drop is also logged
    (rate-limited: the first at once, then a summary with the exact count per 10 s).

    ``pending``: messages waiting to be received - for ``statistics()`` those of this
    process's channels, for ``global_statistics()`` those of every live participant of
    the host (see there for exactly what is and is not included).
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


def bucket_pending(bk: Sequence[int]) -> int:
    """Messages counted against one slot's capacity buckets (``bk[2b]`` enq,
    ``bk[2b+1]`` deq; a difference read negative, mid-update, counts 0)."""
    total = 0
    for enq, deq in zip(bk[0::2], bk[1::2], strict=True):
        if enq != deq:
            d = (enq - deq) & 0xFFFFFFFF
            if d < 0x80000000:
                total += d
    return total


def integrity_counts(values: dict[str, int]) -> dict[str, int]:
    """``repaired`` (corrupted shared control words found and repaired) and
    ``site_clash`` (another site seen sharing this namespace): in ``extra``."""
    return {"repaired": values["repaired"], "site_clash": values["site_clash"]}
