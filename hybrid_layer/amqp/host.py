"""What the link needs from the process that hosts it: ``LinkHost``.

The link (``amqp.link.Link``) lives in the host's leader process, on its host thread. It
does not know the participant; it needs only this narrow interface of it, so that the
link can be read, typed and tested without the participant, and ``amqp/`` imports
nothing from ``participant``:

* **deliver** what arrives from the broker into this host's inboxes: ``deliver_direct``
  (a process channel: OK, or FULL_* and the link holds it for the busy reader),
  ``deliver_group`` (one copy per local member process), ``deliver_normal`` (one reader
  of a normal channel), with ``normal_room`` asked first (a normal channel's message is
  rejected back to its shared queue when no reader here has room);
* **interest**: which groups and normal channels have a member or reader on this host
  (``interest``; ``normal_name`` turns a normal channel's hash back into its name), which
  the link's bindings and normal-queue consumers follow;
* **counters** (``stats.Counters``: drops are counted and logged through it;
  ``count_forward_failure`` counts a copy that found no room or no reader);
* the shared-memory **namespace** ``ns`` (the link publishes its state in the leader's
  registry words ``LQ_*``, and keeps its dedup table there), the host's own slot ``own``
  whose published hash set carries the "destination full" flags, and ``lock``, the
  participant's lock that guards that set;
* ``cfg``, the layer's configuration.

Who implements it: ``participant.Participant``. Every ``deliver_*`` is called on the
host thread, per message (hot): the link calls them exactly as it called the
participant's methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import threading

    from ..config import LayerConfig
    from ..shm.registry import Namespace, SlotView
    from ..stats import Counters


class LinkHost(Protocol):
    """The host process as the link sees it (``participant.Participant``)."""

    cfg: LayerConfig
    counters: Counters
    ns: Namespace
    own: SlotView
    lock: threading.Lock

    def deliver_direct(self, channel: str, msg: bytes | memoryview, expires_at: float) -> int:
        """A message from another host for a process channel of this host: OK,
        FULL_CHANNEL or FULL_RING (the link holds it); no such channel: dropped, counted."""
        ...

    def deliver_group(self, group: str, msg: bytes | memoryview, expires_at: float) -> None:
        """One copy per local process with members in ``group``."""
        ...

    def deliver_normal(self, channel: str, msg: bytes | memoryview, expires_at: float) -> int:
        """To one reader of normal channel ``channel`` on this host: OK, or why not."""
        ...

    def normal_room(self, channel: str) -> int:
        """OK if a reader of ``channel`` here has room, FULL_CHANNEL, or NO_CHANNEL."""
        ...

    def normal_name(self, h: int) -> str | None:
        """The name of the normal channel of hash ``h`` read on this host, if known."""
        ...

    def interest(self) -> tuple[set[int], set[int]] | None:
        """(group hashes, normal-channel hashes) with a member/reader on this host;
        ``None`` if a set was mid-rebuild (ask again shortly)."""
        ...

    def count_forward_failure(self, r: int, name: str) -> None:
        """Count (and log) a copy for ``name`` dropped: full (``r``) or no reader."""
        ...
