"""Groups: membership, ``group_send``, the fan-out of a group record to local members.

Theory of operation
-------------------
Membership is owned by the process that called ``group_add`` (``routing.GroupTable``
in ``groups``, under ``lock``); the process publishes the tagged hash of each group it
has members in (``own.groups``, a ``shm.groupset``), which is how senders find it and
how the leader knows what to bind on the broker (``Leadership.interest``).

``group_send`` writes one record per local process with members (``deliver_group``),
and in broker mode hands one copy to the leader for the groups exchange. Each process
fans its record out (``_fan_out``, from ``drain``): one copy per member channel into the
local queue, under one hold of ``lock``, each copy reserving a capacity slot (a full
channel drops its copy and counts it: ``group_send`` never raises ``ChannelFull``). A
member another process added is sent a copy of its own (rare).

Broker mode: ``group_add`` then waits for the leader's binding sync to cover the new
group (``wait_bound``), and every process watches the leader's link state to tell its
members about a gap in cross-host traffic (``watch_link``, from the host thread).

Hot: ``_fan_out`` (one group record, every local copy) and ``deliver_group`` (the
link calls it for each group message from the broker).
"""

from __future__ import annotations

import asyncio
import time

from ._log import limited
from .routing import Action, Route, route
from .shm import layout as L
from .shm.groupset import name_hash
from .shm.registry import FULL_RING, LINK_DOWN, OK
from .shm.ring import Record
from .state import Item, ParticipantState

_monotonic = time.monotonic
#: how long ``group_add`` waits for the leader to bind a new group on the broker
BIND_WAIT = 2.0


class Groups(ParticipantState):
    def group_add(self, group: str, channel: str) -> bool:
        """True if this process joined ``group`` (its first member here)."""
        self.check_flush()
        with self.lock:
            if self.groups.add(group, channel, time.time()) is Action.JOIN:
                self.own.groups.add(name_hash("g", group))
                return True
        return False

    def group_discard(self, group: str, channel: str, *, local_only: bool = False) -> None:
        self.check_flush()
        h = name_hash("g", group)
        with self.lock:
            if self.groups.discard(group, channel) is Action.LEAVE:
                self.own.groups.discard(h)
        if local_only:
            return
        # the membership may belong to another process (it called group_add): tell
        # every process that has members in the group; its owner drops it
        for sv in self.ns.slots_with(h, exclude=self.slot):
            self.control(sv, "discard", group, channel)

    async def wait_bound(self) -> None:
        """Broker mode, after joining a group: return once the leader has bound it on the
        broker (a binding sync that started after our change completed), or at once
        while the link is down (bindings are restored when it is up again). A link that
        is still coming up (a new leader, or none elected yet) is waited for: its first
        sync binds what we joined. ``BIND_WAIT`` caps it all."""
        deadline = _monotonic() + BIND_WAIT
        target = 0  # the leader's binding syncs that cover our change; 0: not up yet
        epoch = 0
        while True:
            state, syncs, _ = self.ns.link_state()
            if state == L.LINK_UP:
                leader = self.ns.leader()
                if not target:  # up: the next sync to start includes our change
                    epoch = leader.epoch
                    target = self.ns.link_get(L.LQ_SYNCS_STARTED, leader.slot) + 1
                    self.request_sync()
                elif leader.epoch != epoch:  # a new leader binds everything at once
                    epoch, target = leader.epoch, 1
                elif syncs >= target:
                    return
            elif state == L.LINK_DOWN or target:  # down, or went down after up
                return
            if _monotonic() >= deadline:
                limited.warning(
                    "bind-slow",
                    "hybrid_layer: group binding not confirmed within %.1fs%s",
                    BIND_WAIT,
                    "" if target else ": the broker link is not up yet",
                )
                return
            await asyncio.sleep(0.0005 if target else 0.002)

    def request_sync(self) -> None:
        if self.ns.is_leader:
            if self.link is not None:
                self.link.request_sync()
            return
        ld = self.ns.leader()
        sv = self.ns.slot(ld.slot) if ld.slot >= 0 else None
        if sv is not None:
            self.control(sv, "sync")

    def group_send(self, group: str, msg: bytes, expires_at: float) -> None:
        self.counters.group_sends += 1
        self.deliver_group(group, msg, expires_at)
        if self.cfg.broker:  # once to the exchange; every other host with members fans out
            r = self.hand_off(L.KIND_OUT_GROUP, group, msg, expires_at, None)
            if r == LINK_DOWN:
                self.count_link_drop(group)
            elif r != OK:  # the leader's inbox is full
                self.count_forward_failure(r, group)

    def deliver_group(self, group: str, msg: bytes | memoryview, expires_at: float) -> None:
        """One copy per local process with members in ``group``."""
        h = name_hash("g", group)
        name_b = group.encode()
        c = self.counters
        for sv in self.ns.slots_with(h):
            r = self.ns.write(sv, 0, L.KIND_GROUP, name_b, expires_at, msg, -1, 0, True)
            if r == FULL_RING:
                c.drop(
                    "full",
                    1,
                    "hybrid_layer: group %r message dropped: inbox of slot %d is full",
                    group,
                    sv.index,
                )

    def _fan_out(self, rec: Record, pos: int, loop: asyncio.AbstractEventLoop | None) -> None:
        group = rec.name
        c = self.counters
        body = rec.body
        name_len = rec.name_len
        expires_at = rec.expires_at
        others = []
        own_pending = self.own.pending
        local = self._local_dest
        me, gen = self.slot, self.gen
        with self.lock:  # one round: the members, then a copy for each
            members, _expired, action = self.groups.members(
                group, time.time(), self.cfg.group_expiry
            )
            if action is Action.LEAVE:
                self.own.groups.discard(name_hash("g", group))
            for channel in members:
                hit = local.get(channel)
                if hit is None:
                    dest = route(channel, self.cfg.host_id, me, gen)
                    if dest.route is not Route.OWN or dest.address is None:
                        others.append(channel)
                        continue
                    if dest.address.bucket >= self.K:
                        c.drop(
                            "no_channel",
                            1,
                            "hybrid_layer: group %r copy for %r dropped: not a channel of "
                            "this layer (bucket out of range)",
                            group,
                            channel,
                        )
                        continue
                    hit = self._remember_local(channel, dest.address)
                elif hit[0] != me or hit[1] != gen:  # another process's channel
                    others.append(channel)
                    continue
                _, _, _, bucket, cap = hit
                if own_pending(bucket) >= cap:
                    c.drop(
                        "full",
                        1,
                        "hybrid_layer: group %r copy for %r dropped: channel full",
                        group,
                        channel,
                    )
                    continue
                # the copy carries the member's channel name in the queue, the group's body
                self._deq(bucket, -1)
                self._put(channel, Item(expires_at, pos, bucket, body, name_len), loop)
                c.group_copies += 1
        if others:  # members that another process added (rare): a copy each
            msg = bytes(rec.message)
            for channel in others:
                r = self.send(channel, msg, expires_at)
                if r == OK:
                    c.group_copies += 1
                else:
                    self.count_forward_failure(r, channel)

    def watch_link(self) -> None:
        """Every process: tell consumers that opted in about a gap in cross-host traffic."""
        cfg = self.cfg
        if not (cfg.on_disconnect or cfg.on_reconnect):
            return
        ld = self.ns.leader()
        state, _, changes = self.ns.link_state()
        if self.ns.leader() != ld:
            return  # the leader is changing: look again next tick
        if state == L.LINK_UP:
            mark = (ld.epoch, changes)
            same_leader = self._up_mark[0] == ld.epoch
            if self._link_up_seen and not self._gap_told and same_leader and self._up_mark != mark:
                # down and up again between two looks (a tick): a gap all the same
                self._gap_told = True
                if cfg.on_disconnect:
                    self._tell_group_members(cfg.on_disconnect)
            if self._gap_told and cfg.on_reconnect:
                self._tell_group_members(cfg.on_reconnect)
            self._gap_told = False
            self._link_up_seen = True
            self._up_mark = mark
        elif self._link_up_seen and not self._gap_told and state != L.LINK_CONNECTING:
            self._gap_told = True
            if cfg.on_disconnect:
                self._tell_group_members(cfg.on_disconnect)

    def _tell_group_members(self, type_: str) -> None:
        from .envelope import encode_message

        with self.lock:
            channels = {ch for members in self.groups.groups.values() for ch in members}
        msg = encode_message({"type": type_, "host_id": self.cfg.host_id})
        expires_at = _monotonic() + self.cfg.expiry
        for channel in channels:
            r = self.send(channel, msg, expires_at)
            if r != OK:
                self.count_forward_failure(r, channel)
