"""What the link declares on RabbitMQ: the names of its exchanges and queues, and their
arguments. Pure: strings and dicts from a prefix, a host id and the CONFIG values; no
I/O, no aiormq (``tests/unit/test_topology.py``).

The topology, per ``prefix`` (CONFIG ``prefix``):

* ``<prefix>.<host_id>``: a host's queue (``host_queue``), consumed by that host's
  leader; bound to the groups exchange (CONFIG ``groups_exchange``, direct) with one
  routing key per group that has a member on the host (``group_key``). It outlives its
  connection and its leader (``host_queue_args``: not exclusive, ``x-expires``), so a new
  leader resumes it; one consumer at a time.
* ``<prefix>.<host_id>.claim``: an exclusive queue held by the one connection that
  serves ``host_id`` (``claim_queue``), so that two hosts never share a host queue.
* ``<prefix>.n.<hash>``: the shared queue of a normal channel (``normal_queue``,
  ``normal_queue_args``), read by every host with a reader (competing consumers).
* ``<prefix>.dead`` (direct exchange) with ``<prefix>.<host_id>.dead`` and
  ``<prefix>.normal.dead``: where the broker dead-letters what it drops from a host's
  queue or a normal channel's, so that a leader counts each such drop and says why.

Invariants: every host computes the same names and the same arguments from the same
CONFIG (a queue declared with other arguments fails with PRECONDITION_FAILED, which the
link logs and survives); a name's hash is ``shm.groupset.name_hash`` of the group or
channel name, the same hash the shared-memory interest words use.

Called by the link when it declares, binds and publishes (``_route``, ``_route_of``),
and by tests that look at the broker. Nothing here is per message except ``group_key``
and ``normal_queue`` in the link's ``_route``.
"""

from __future__ import annotations

from typing import Any, Protocol


class QueueSettings(Protocol):
    """The CONFIG values the queues' arguments come from (a ``config.LayerConfig``)."""

    @property
    def prefix(self) -> str: ...
    @property
    def host_id(self) -> str: ...
    @property
    def expiry(self) -> float: ...
    @property
    def remote_capacity(self) -> int: ...
    @property
    def host_queue_expires(self) -> float: ...
    @property
    def queue_type(self) -> str: ...
    def capacity_for(self, channel: str) -> int: ...


def host_queue(prefix: str, host_id: str) -> str:
    return f"{prefix}.{host_id}"


def claim_queue(prefix: str, host_id: str) -> str:
    """An exclusive queue whose holder is the one connection serving ``host_id``."""
    return f"{prefix}.{host_id}.claim"


def dead_exchange(prefix: str) -> str:
    return f"{prefix}.dead"


def dead_queue(prefix: str, host_id: str) -> str:
    """Where the broker puts what it drops from the host's queue (expired, or a
    policy's limits): the leader counts it and says why, instead of silence."""
    return f"{prefix}.{host_id}.dead"


DEAD_MAX = 10_000  # messages the dead-letter queue keeps while no leader reads it


def normal_dead_queue(prefix: str) -> str:
    """Where the broker dead-letters what expires (or a policy drops) in any normal
    channel's queue: one queue for the prefix, read by every leader (competing
    consumers), so each such drop is counted once, by whichever host takes it."""
    return f"{prefix}.normal.dead"


#: its arguments are the same for every host (they share it): fixed, not from CONFIG
NORMAL_DEAD_ARGS = {"x-expires": 24 * 3600 * 1000, "x-max-length": DEAD_MAX}


def host_queue_args(cfg: QueueSettings) -> tuple[bool, dict[str, Any]]:
    """(durable, arguments) of a host's queue: it outlives its connection and leader
    (not exclusive) until unused for ``host_queue_expires``; one consumer at a time;
    what the broker drops from it is dead-lettered to this host's dead queue."""
    args: dict[str, Any] = {
        "x-max-length": cfg.remote_capacity,
        "x-overflow": "reject-publish",
        "x-message-ttl": int(cfg.expiry * 1000),
        "x-expires": int(cfg.host_queue_expires * 1000),
        "x-single-active-consumer": True,
        "x-dead-letter-exchange": dead_exchange(cfg.prefix),
        "x-dead-letter-routing-key": host_queue(cfg.prefix, cfg.host_id),
    }
    if cfg.queue_type == "quorum":
        args["x-queue-type"] = "quorum"
        return True, args
    return False, args


def group_key(prefix: str, group_hash: int) -> str:
    return f"{prefix}.g.{group_hash:016x}"


def normal_queue(prefix: str, channel_hash: int) -> str:
    return f"{prefix}.n.{channel_hash:016x}"


def normal_queue_args(cfg: QueueSettings, channel: str) -> dict[str, Any]:
    """Arguments of normal channel ``channel``'s shared queue."""
    return {
        "x-max-length": cfg.capacity_for(channel),
        "x-overflow": "reject-publish",
        "x-message-ttl": int(cfg.expiry * 1000),
        "x-expires": int(max(300.0, 4 * cfg.expiry) * 1000),
        # what expires there (no reader in time) is counted by a leader
        "x-dead-letter-exchange": dead_exchange(cfg.prefix),
        "x-dead-letter-routing-key": normal_dead_queue(cfg.prefix),
    }
