"""Dead letters: what the broker dropped, counted and explained instead of lost silently.

The broker dead-letters (exchange ``<prefix>.dead``) what expires in, or a policy drops
from, this host's queue (into ``<prefix>.<host_id>.dead``, read by this host's leader)
and any normal channel's queue (into the prefix's shared ``<prefix>.normal.dead``, read
by every leader as competing consumers, so each drop is counted once). ``_on_dead``
counts each message (``dropped`` ``expired`` or ``remote_full``, and ``dead_lettered``
by reason in ``info()``) and logs why, telling a policy's ``message-ttl`` lower than
CONFIG ``expiry`` (a frame dead-lettered as expired before its own deadline) from a
real expiry, and a policy's length limit from anything else.

State owned here: ``dead_lettered``. Called by ``connection._declare`` (declare the
shared queue, ``_declare_normal_dead``) and by aiormq's reader (no-ack consumers on the
normal-channel channel ``nch``). Not hot: only what the broker drops comes here.
"""

from __future__ import annotations

import contextlib
import time

import aiormq
from aiormq.abc import DeliveredMessage

from .._log import limited
from . import wire
from .state import LinkState
from .topology import NORMAL_DEAD_ARGS


class DeadLetters(LinkState):
    """The dead-letter queues' consumers."""

    async def _declare_normal_dead(self, ndq: str, dx: str) -> None:
        """The prefix's shared dead-letter queue of normal channels (on a channel of its
        own: a mismatch must not take the link down; then it is used as it is)."""
        tmp = await self.conn.channel(publisher_confirms=False)
        try:
            await tmp.queue_declare(ndq, arguments=NORMAL_DEAD_ARGS)
            await tmp.queue_bind(ndq, dx, routing_key=ndq)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            limited.warning(
                "normal-dead-mismatch",
                "hybrid_layer: queue %s exists with other arguments; using it as it is: %s",
                ndq,
                exc,
            )
        finally:
            with contextlib.suppress(Exception):
                await tmp.close()

    def _on_normal_dead(self, msg: DeliveredMessage) -> None:
        """What the broker dropped from a normal channel's queue (its ``x-message-ttl``
        = ``expiry`` passed with no reader, or a policy): counted and logged here, by
        whichever leader took it from the shared dead queue."""
        self._on_dead(msg, "a normal channel's queue")

    def _on_dead(self, msg: DeliveredMessage, where: str = "") -> None:
        """What the broker dropped from the host's queue (dead-lettered): counted, and
        the reason logged. ``expired`` before the frame's own deadline means a policy's
        ``message-ttl`` is lower than ``expiry``; ``maxlen`` a policy's ``max-length``
        or ``max-length-bytes`` with overflow ``drop-head``."""
        queue = where or f"queue {self.queue}"
        headers = msg.header.properties.headers or {}
        reason = headers.get("x-first-death-reason") or "unknown"
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        c = self.p.counters
        now = time.time()
        body = msg.body
        if self.crypter is not None:  # (its route is the dead-letter one now)
            with contextlib.suppress(wire.WireError):
                body = wire.unseal(self.crypter, body, now).body
        try:
            parts = wire.split(body)
        except wire.WireError:
            parts = None
        frames = parts if parts is not None else (body,)
        early = 0
        for data in frames:
            try:
                frame: wire.Frame | None = wire.decode(data)
            except wire.WireError:
                frame = None
            if reason == "expired" and frame is not None and frame.expires_wall > now + 1.0:
                early += 1
        n = len(frames)
        key = "expired_early" if early else str(reason)
        self.dead_lettered[key] = self.dead_lettered.get(key, 0) + n
        if early:
            why = (
                f"expired on the broker BEFORE their expiry: a policy's message-ttl on "
                f"{queue} is lower than CONFIG['expiry'] ({self.cfg.expiry:g}s): "
                "rabbitmqctl list_policies"
            )
        elif reason == "expired":
            why = (
                "expired waiting on the broker (no reader took it in time)"
                if where
                else "expired waiting on the broker (no leader read this host's queue in time)"
            )
        else:
            why = (
                f"dropped by the broker ({reason}): a policy's max-length, "
                f"max-length-bytes (overflow drop-head) or delivery-limit on {queue}: "
                "rabbitmqctl list_policies"
            )
        c.drop(
            "expired" if reason == "expired" else "remote_full",
            n,
            "hybrid_layer: %d message(s) to %s %s",
            n,
            where or "this host",
            why,
        )
