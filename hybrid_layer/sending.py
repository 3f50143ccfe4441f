"""Sending: a message from this process to a channel, and the hand-offs to the leader.

Theory of operation
-------------------
``send`` routes one message by its channel's name (``routing.route``):

- a process channel of this host: one record written into the reader's inbox ring
  (``Namespace.write``: under the ring lock, the capacity check against the bucket
  named in the channel, the doorbell rung only when the reader may be asleep). The
  route - (slot, gen, name bytes, bucket, capacity) - follows from the name alone and
  is cached in ``_local_dest``: a repeat send is one dict lookup, then the write. This
  is the hottest path of the layer: keep it free of calls and lookups.
- a normal channel: ``normal.send_normal``;
- another host's process channel (broker mode): ``hand_off`` to the leader, keyed by the
  destination host for capacity.

``hand_off`` gives a message for other hosts to the leader: the leader itself submits
it to its link (``amqp.link.Link.submit``), or keeps it in ``Leadership.early_out`` while
its link does not exist yet; any other process writes a hand-off record into the
leader's ring, which the leader's drain passes to ``_outbound``. FIFO per sender holds
on every path. A failover in progress (no live leader) makes the sender try to take
the lease itself.

``deliver_direct`` is the leader delivering a message from another host to a process
channel of this host: a ``send`` after a check that the name really is one of ours.

Drops on these paths are counted here (``count_link_drop``,
``count_forward_failure``) - the latter also by the link, through ``amqp.host``'s
``LinkHost`` interface. State: the route caches (``_local_dest``, ``_capacity_cache``);
no lock (each entry follows from the name; see ``state``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import names
from .routing import Route, route
from .shm import layout as L
from .shm.groupset import name_hash
from .shm.registry import FULL_CHANNEL, FULL_RING, LINK_DOWN, NO_CHANNEL, OK
from .state import ParticipantState

if TYPE_CHECKING:
    from .names import ProcessAddress
    from .shm.ring import Record

LOCAL_DEST_MAX = 65_536
MAX_NAME_LENGTH = 100  # channels' BaseChannelLayer: valid names are shorter


class Sending(ParticipantState):
    def capacity_for(self, channel: str) -> int:
        cap = self._capacity_cache.get(channel)
        if cap is None:
            if len(self._capacity_cache) > 65536:
                self._capacity_cache.clear()
            cap = self._capacity_cache[channel] = self.cfg.capacity_for(channel)
        return cap

    def send(self, channel: str, msg: bytes | memoryview, expires_at: float) -> int:
        """Route one message; OK, FULL_CHANNEL, FULL_RING or NO_CHANNEL."""
        hit = self._local_dest.get(channel)
        if hit is None:  # not a process channel on this host seen before
            dest = route(channel, self.cfg.host_id, self.slot, self.gen)
            if dest.route is Route.NORMAL:
                return self.send_normal(channel, msg, expires_at)
            addr = dest.address
            if dest.route is Route.UNROUTABLE:
                if addr is not None and self.cfg.broker:  # another host's process channel
                    return self.hand_off(
                        L.KIND_OUT_DIRECT, channel, msg, expires_at, f"h:{addr.host_id}"
                    )
                return NO_CHANNEL
            if addr is None or addr.bucket >= self.K:
                return NO_CHANNEL
            hit = self._remember_local(channel, addr)
        slot, gen, name_b, bucket, cap = hit
        sv = self.ns.slot(slot)
        if sv is None:
            return NO_CHANNEL
        return self.ns.write(sv, gen, L.KIND_DIRECT, name_b, expires_at, msg, bucket, cap)

    def _remember_local(
        self, channel: str, addr: ProcessAddress
    ) -> tuple[int, int, bytes, int, int]:
        """Cache the route to ``channel``, a process channel on this host (``addr`` its
        parsed name, bucket < K): (slot, gen, name bytes, bucket, capacity)."""
        cache = self._local_dest
        if len(cache) >= LOCAL_DEST_MAX:
            cache.clear()
        hit = cache[channel] = (
            addr.slot,
            addr.gen,
            channel.encode(),
            addr.bucket,
            self.capacity_for(channel),
        )
        return hit

    def hand_off(
        self, kind: int, name: str, msg: bytes | memoryview, expires_at: float, key: str | None
    ) -> int:
        """Broker mode: give a message for other hosts to the leader, which publishes it.

        ``key`` names the destination for capacity (a host id, a normal channel): while
        the broker rejects messages for it, this returns FULL_CHANNEL without a round
        trip. Whatever the leader's link is doing (not started, connecting, down, up),
        the message is kept in order and published once it is up; past the leader's
        bound (CONFIG ``outbound_limit``) this returns FULL_RING (send() backs off,
        then raises ChannelFull).
        """
        for _ in range(2):
            ld = self.ns.leader()
            if ld.slot == self.slot and self.ns.is_leader:
                link = self.link
                if link is None:  # we just became leader; the host thread starts it
                    if self.leadership().keep_early(kind, name, msg, expires_at, key):
                        return OK
                    link = self.link
                    if link is None:
                        return FULL_RING
                if key is not None and key in link.full:
                    return FULL_CHANNEL
                if link.busy:
                    return FULL_RING  # send() backs off for up to 0.5 s
                return link.submit(kind, name, bytes(msg), expires_at, key)
            sv = self.ns.slot(ld.slot) if ld.slot >= 0 else None
            if sv is not None:
                if key is not None and sv.groups.maybe_contains(name_hash("f", key)):
                    return FULL_CHANNEL
                if self.ns.link_get(L.LQ_BUSY, ld.slot):
                    return FULL_RING  # send() backs off for up to 0.5 s
                r = self.ns.write(sv, ld.gen, kind, name.encode(), expires_at, msg, -1, 0, True)
                if r != NO_CHANNEL:
                    return r
            # no live leader right now (failover in progress): take the lease ourselves
            if self.ns.try_lead():
                self.host.on_leadership()
        return LINK_DOWN

    def count_link_drop(self, name: str) -> None:
        self.counters.drop(
            "link_down",
            1,
            "hybrid_layer: message for %r (another host) dropped: the RabbitMQ link is down",
            name,
        )

    def count_forward_failure(self, r: int, name: str) -> None:
        if r in (FULL_CHANNEL, FULL_RING):
            self.counters.drop("full", 1, "hybrid_layer: copy for %r dropped: full", name)
        else:
            self.counters.drop(
                "no_channel", 1, "hybrid_layer: copy for %r dropped: no reader", name
            )

    def deliver_direct(self, channel: str, msg: bytes | memoryview, expires_at: float) -> int:
        """Leader: a message from another host for a process channel of this host.

        Returns OK, FULL_CHANNEL or FULL_RING (the caller holds the message and tries
        again); a message for no channel of this host is dropped and counted here."""
        r = NO_CHANNEL
        # a route-cache hit is a process channel of this host; anything else is parsed
        # here first, as send() would hand another host's channel back to the broker.
        # (a name of 100 characters or more is no channels name: none of ours either,
        # and it may not fit a ring record's name field)
        here = channel in self._local_dest
        if not here and len(channel) >= MAX_NAME_LENGTH:
            self.count_forward_failure(r, channel[:60] + "...")
            return r
        if not here:
            dest = route(channel, self.cfg.host_id, self.slot, self.gen)
            here = dest.route in (Route.OWN, Route.SLOT)
        if here:
            r = self.send(channel, msg, expires_at)
        if r == NO_CHANNEL:
            self.count_forward_failure(r, channel)
        return r

    def _outbound(self, rec: Record) -> None:
        """A message handed to us (as leader) for other hosts: publish it."""
        name = rec.name
        key = out_key(rec.kind, name)
        link = self.link
        if link is None and self.ns.is_leader and self.cfg.broker:
            if self.leadership().keep_early(rec.kind, name, rec.message, rec.expires_at, key):
                return
            link = self.link
        if link is not None and self.ns.is_leader:
            # (a view of the record's own bytes, copied out of the ring: no copy here)
            got = link.submit(rec.kind, name, rec.message, rec.expires_at, key)
            if got == LINK_DOWN:
                self.count_link_drop(name)
            elif got == FULL_RING:
                self.counters.drop(
                    "full",
                    1,
                    "hybrid_layer: message for %r (another host) dropped: the leader's "
                    "outbound queue is full (the broker does not keep up)",
                    name,
                )
            return
        # leadership moved on since the sender looked: pass it to the current leader
        r = self.hand_off(rec.kind, name, rec.message, rec.expires_at, key)
        if r == LINK_DOWN:
            self.count_link_drop(name)
        elif r != OK:
            self.count_forward_failure(r, name)


def out_key(kind: int, name: str) -> str | None:
    """The capacity key of a hand-off: its destination host, or its normal channel."""
    if kind == L.KIND_OUT_DIRECT:
        addr = names.parse(name)
        return f"h:{addr.host_id}" if addr is not None else None
    if kind == L.KIND_OUT_NORMAL:
        return f"n:{name}"
    return None
