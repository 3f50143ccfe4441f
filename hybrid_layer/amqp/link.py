"""The leader's link to RabbitMQ: one connection per host, on the leader's host thread.

What it does, all on the host thread's event loop:

* connects (URLs tried in turn, backoff with jitter, for ever), declares the groups
  exchange and the host's queue ``<prefix>.<host_id>`` (it outlives connections and
  leaders: ``topology``) and consumes it;
* keeps the queue's bindings equal to the groups that have a member on this host, and a
  consumer on the shared queue of every normal channel read on this host (both read
  from the tagged hashes every participant publishes in shared memory);
* publishes what participants hand it (``submit``, any thread) with pipelined
  publisher confirms: a ``nack`` (the destination's ``x-max-length`` reached) marks the
  destination full for a moment, so that participants' ``send`` raises ``ChannelFull``;
* delivers what arrives into participants' inboxes.

Link state and the count of completed binding syncs are published in the leader's
registry record (``LQ_*`` words), where participants read them.

This module only assembles ``Link`` from its parts, one module per job:

=================== ===========================================================
``state``           every attribute (``LinkState``), ``Pub``, the ``Out`` tuple
``connection``      connect, claim, declare, serve, reconnect; ``aclose``, ``info``
``publisher``       ``submit``, the outbound queue, batching, emit (hot)
``confirms``        confirms (hot), returns, nacks, retry probes, full flags
``bindings``        bindings and normal-queue consumers synced to interest; flush
``delivery``        the host queue's and normal queues' consumers (hot)
``holding``         held deliveries for busy readers; acks in bursts
``deadletters``     what the broker dead-lettered, counted and explained
``topology``        pure: queue and exchange names, queue arguments
``explain``         why the link is not up, in words; URLs without passwords
``aiormq_shortcuts`` where aiormq's channel is bypassed for speed (publish, consume)
``host``            ``LinkHost``: what the link needs from its host process
=================== ===========================================================

The parts are mixins of one object, not objects of their own: they share the
connection's channels and the queues' state, and the hot paths (publish, confirm,
delivery) must keep plain ``self.x`` lookups and one method lookup per call.
A message's way out: ``Publisher.submit`` -> ``kick`` -> ``_publish_soon`` (or the
``_publisher`` task) -> ``_next_batch`` -> ``_publish`` -> ``_emit`` ->
``aiormq_shortcuts._publish_frame`` -> ``Confirms._confirmed``. In:
``Delivery._on_host_message`` -> ``_open`` -> ``LinkHost.deliver_direct`` /
``deliver_group`` (a busy reader: ``Holding._hold``).
"""

from __future__ import annotations

import asyncio

from ..shm import layout as L
from .bindings import Bindings
from .confirms import Confirms
from .connection import Connection
from .deadletters import DeadLetters
from .delivery import Delivery
from .holding import Holding
from .host import LinkHost
from .publisher import Publisher
from .state import LinkState
from .topology import group_key, host_queue, normal_queue

__all__ = ["Link", "LinkHost", "group_key", "host_queue", "normal_queue"]


class Link(Connection, Publisher, Confirms, Bindings, Delivery, Holding, DeadLetters):
    """The host's one AMQP connection, owned by the leader. Create on the host loop."""

    def __init__(self, p: LinkHost, loop: asyncio.AbstractEventLoop) -> None:
        LinkState.__init__(self, p, loop)
        self._set_state(L.LINK_CONNECTING)
        self.task = loop.create_task(self._run())
