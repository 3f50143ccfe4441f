"""Draining: the inbox ring into local queues, record by record; control records.

Theory of operation
-------------------
Every message to a participant is a record in its ring (``shm.ring``), written by the
sender under the ring lock. The owner *drains* the ring - from whichever event loop is
receiving (``receiving._on_bell``, or ``add_waiter`` when the ring was not empty), or
from its host thread (a rescue ring, the periodic sweep) - holding ``read_lock``, so it
is the ring's single consumer across threads. ``_dispatch`` sends each record where
its kind says:

- ``KIND_DIRECT``: the channel's local queue (``receiving._put``);
- ``KIND_GROUP``: one copy per local member (``groups._fan_out``);
- ``KIND_NORMAL``: the local queue if we read the channel; parked if we lead a
  single-host namespace and nobody does (``normal._park``); else routed on;
- ``KIND_CONTROL``: a verb from another process (``_control``, below);
- ``KIND_OUT_*`` (we lead): a hand-off for other hosts (``sending._outbound``).

A record written before the last ``flush()`` (its position below ``flush_upto``) or past
its expiry is dropped and counted; a large message lives in a segment of its own
(``shm.spill``) and is copied in here (``_unspill``). A bad record is skipped and
counted, a broken ring reset; the capacity counters are then recounted from what is
queued (``housekeeping._resync_buckets``). Nothing one record does stops the pump.

State: ``_skipped`` (a record was skipped: resync once the ring is empty), the flush
epoch seen and acked (``flush_seen``, ``flush_acked``). Hot: ``drain`` and
``_dispatch`` run once per message received.

Control verbs: ``reader`` (a process reads a normal channel: the leader forwards what it
parked, or learns the name for the broker), ``readers?`` (a new leader asks for those
names), ``sync`` (rebind groups on the broker), ``discard`` (drop a group membership
this process owns).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from . import names
from .envelope import decode_args, encode_args
from .shm import layout as L
from .shm import spill
from .shm.groupset import name_hash
from .shm.registry import OK, SlotView
from .shm.ring import BadRecord, Record, RingCorrupt
from .state import EXPIRED, Item, ParticipantState

log = logging.getLogger("hybrid_layer")

_monotonic = time.monotonic


class Draining(ParticipantState):
    def drain(self, loop: asyncio.AbstractEventLoop | None) -> int:
        """Move every record from the ring into local queues. Returns records read."""
        if self._flush_word[L.HQ_FLUSH_EPOCH] != self.flush_seen:
            self.check_flush()
        ring = self.own.ring
        if self.closed:
            return 0
        if ring.tail == ring.head:
            if self.flush_acked != self.flush_seen:
                self._ack_flush()
            return 0
        n = 0
        with self.read_lock:
            upto = self.ns.flush_upto()
            if upto > ring.tail:  # a corrupted word: it would discard every record
                self.check_words()
                upto = self.ns.flush_upto()
            now = _monotonic()
            while True:
                pos = ring.head
                try:
                    rec = ring.try_read()
                except BadRecord as exc:  # one record skipped; its neighbours are fine
                    self._skipped = True
                    self.counters.drop("corrupt", 1, "hybrid_layer: %s", exc)
                    continue
                except RingCorrupt as exc:  # the framing is broken: nothing to read on
                    with self.ns.ring_locked(self.own):
                        ring.reset()
                        gone = self._resync_buckets()
                    self._skipped = False
                    self.counters.drop(
                        "corrupt",
                        max(gone, 1),
                        "hybrid_layer: inbox reset, at least %d message(s) dropped: %s",
                        max(gone, 1),
                        exc,
                    )
                    break
                if rec is None:
                    break
                n += 1
                body = rec.body
                if len(body) > rec.name_len and body[rec.name_len] == 0xC1:  # spill.TAG
                    rec = self._unspill(rec, pos, upto, now)
                    if rec is None:
                        continue
                try:
                    self._dispatch(rec, pos, upto, now, loop)
                except Exception as exc:  # never let one bad record stop the pump
                    self.counters.drop(
                        "corrupt",
                        1,
                        "hybrid_layer: a kind-%s record for %r dropped: cannot dispatch it: %r",
                        rec.kind,
                        rec.name,
                        exc,
                    )
                    log.debug("hybrid_layer: dispatch failure", exc_info=True)
            if self._skipped:
                self._resync_after_skip()
        if self.flush_acked != self.flush_seen:
            self._ack_flush()
        return n

    def _resync_after_skip(self) -> None:
        """A skipped record may have held a capacity slot of a channel (its name was
        unreadable): once the ring is seen empty under its lock, count only what is
        queued locally, as after a reset. Caller holds ``read_lock``."""
        ring = self.own.ring
        with self.ns.ring_locked(self.own):
            if ring.tail == ring.head:
                self._resync_buckets()
                self._skipped = False

    def _unspill(self, rec: Record, pos: int, upto: int, now: float) -> Record | None:
        """A record whose message is in a segment of its own (``shm.spill``): the record
        with the message copied in, the segment removed. An expired or flushed one's
        segment is removed unread (``_dispatch`` then drops the record and counts it);
        one that cannot be read is dropped and counted here (None)."""
        kind = rec.kind
        ref = rec.message
        local = kind < L.KIND_CONTROL  # (hand-offs: the link checks their expiry)
        if local and (pos < upto or rec.expires_at < now):
            spill.discard(ref, self._spill_stem)
            return rec
        try:
            return rec._replace(body=spill.read(ref, self._spill_stem))
        except (spill.SpillError, OSError) as exc:
            bucket = self._record_bucket(kind, rec.name) if local else -1
            if bucket >= 0:
                with self.lock:
                    self._deq(bucket, 1)
            self._spill_failed(rec.name, exc)
            return None

    def _spill_failed(self, name: str, exc: Exception) -> None:
        """A large message whose segment cannot be had: a reference that is none (a bad
        or forged message: malformed) or a segment gone or unreadable (corrupt)."""
        self.counters.drop(
            "malformed" if isinstance(exc, spill.BadReference) else "corrupt",
            1,
            "hybrid_layer: a large message for %r dropped: %s",
            name,
            exc,
        )

    def _ack_flush(self) -> None:
        """Tell a flusher we applied its flush (local queues and ring both cleaned)."""
        with self.read_lock:
            self.flush_acked = self.flush_seen
            self.ns.ack_flush(self.flush_seen)

    def _record_bucket(self, kind: int, name: str) -> int:
        if kind == L.KIND_DIRECT:
            addr = names.parse(name)
            if addr is not None and addr.slot == self.slot and addr.bucket < self.K:
                return addr.bucket
            return -1
        if kind == L.KIND_NORMAL:
            return self.normal_bucket(name)
        return -1

    def _dispatch(
        self, rec: Record, pos: int, upto: int, now: float, loop: asyncio.AbstractEventLoop | None
    ) -> None:
        kind = rec.kind
        c = self.counters
        if kind == L.KIND_CONTROL:
            self._control(rec.name, decode_args(rec.message))
            return
        if kind >= L.KIND_OUT_DIRECT:
            self._outbound(rec)
            return
        if pos < upto or rec.expires_at < now:
            bucket = self._record_bucket(kind, rec.name)
            if bucket >= 0:
                with self.lock:
                    self._deq(bucket, 1)
            if pos < upto:
                c.drop("flushed", 1, "hybrid_layer: message for %r flushed unread", rec.name)
            else:
                c.drop("expired", 1, EXPIRED, rec.name, "in the inbox", self.cfg.expiry)
            return
        if kind == L.KIND_DIRECT:
            item = Item(
                rec.expires_at, pos, self._record_bucket(kind, rec.name), rec.body, rec.name_len
            )
            with self.lock:
                self._put(rec.name, item, loop)
        elif kind == L.KIND_GROUP:
            self._fan_out(rec, pos, loop)
        elif kind == L.KIND_NORMAL:
            item = Item(rec.expires_at, pos, self.normal_bucket(rec.name), rec.body, rec.name_len)
            with self.lock:
                parked = self.parked.get(rec.name)
                if rec.name in self.readers and not parked:
                    self._put(rec.name, item, loop)
                    return
                if self.ns.is_leader and not self.cfg.broker:
                    self._park(rec.name, item)
                    park = True
                else:
                    self._deq(item.bucket, 1)
                    park = False
            if park:  # hand it (and anything parked before it) over now if we can
                self.forward_parked(rec.name)
                return
            # not a reader (any more) and not the leader: route it on
            r = self.send_normal(rec.name, rec.message, rec.expires_at)
            if r != OK:
                self.count_forward_failure(r, rec.name)

    def control(self, sv: SlotView, verb: str, *args: Any) -> int:
        return self.ns.write(
            sv, 0, L.KIND_CONTROL, verb.encode(), _monotonic() + 60, encode_args(*args), -1, 0, True
        )

    def _control(self, verb: str, args: list[Any]) -> None:
        if verb == "reader" and self.ns.is_leader and args:
            if self.cfg.broker:
                self.leadership().normal_names[name_hash("n", str(args[0]))] = str(args[0])
                if self.link is not None:
                    self.link.request_sync()
            else:
                self.forward_parked(str(args[0]))
        elif verb == "sync" and self.link is not None:
            self.link.request_sync()
        elif verb == "readers?":
            with self.lock:
                readers = list(self.readers)
            ld = self.ns.leader()
            sv = self.ns.slot(ld.slot) if ld.slot >= 0 else None
            if sv is not None:
                for channel in readers:
                    self.control(sv, "reader", channel)
        elif verb == "discard" and len(args) == 2:
            self.group_discard(str(args[0]), str(args[1]), local_only=True)
