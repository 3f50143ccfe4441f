"""A process's attachment to its host namespace: slots, rings, liveness, cleanup.

:class:`Namespace` is one participant's view of the host namespace, assembled from one
mixin per job (each module opens with its own theory of operation):

=====================  ==============================================================
``registry_state``     the state a process holds (lock file, registry views, slot
                       views, its own slot) and the registry's slot records
``attach``             attach (create, validate or re-initialise; claim a slot), detach
``rings``              writes into an inbox ring (the per-message path), sleeping
``liveness``           live slots, interest lookups, reclaiming a dead slot, word repair
``lease``              the leader lease and the leader's link words
``site``               one site per namespace, checked at attach
``flush``              ``flush()`` across the host, the flush epoch
``slotview``           :class:`SlotView`: one slot's segment as any process maps it
=====================  ==============================================================

Every lock is a byte of the registry segment's own file (``/dev/shm/<ns>.reg``): the
namespace is live exactly while that shared memory has a lock holder, whatever happens
to the files in ``shm_dir``.

The mixins share one instance and one ``__dict__``: a method is one type-attribute
lookup and ``self.x`` stays ``self.x``, as when this was one class (the per-message
paths ``write``, ``slot``, ``slots_with`` and ``prepare_sleep`` gained nothing).
Everything here is called from the layer's code with no event loop involved. The names
the rest of the package and the tests import from here are re-exported.
"""

from __future__ import annotations

from .attach import Attaching, proc_start
from .flush import Flushing
from .lease import Leader
from .registry_state import _U64, _put_text, _text
from .rings import FULL_CHANNEL, FULL_RING, LINK_DOWN, NO_CHANNEL, OK
from .site import _clash, _site_hash, site_identity
from .slotview import SlotView

__all__ = [
    "FULL_CHANNEL",
    "FULL_RING",
    "LINK_DOWN",
    "NO_CHANNEL",
    "OK",
    "_U64",
    "Leader",
    "Namespace",
    "SlotView",
    "_clash",
    "_put_text",
    "_site_hash",
    "_text",
    "proc_start",
    "site_identity",
]


class Namespace(Attaching, Flushing):
    """One participant's view of the host namespace. Not shared across ``fork()``."""
