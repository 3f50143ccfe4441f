"""Pure: which frames from the broker this host has already delivered.

Theory of operation
-------------------
Every AMQP message a leader publishes carries the message id ``<nonce>.<seq>``: the
nonce is random per leader link (so per publishing process and leadership), the
sequence number counts that link's AMQP messages. One link publishes to a queue in
order, so for each publisher the frames a host receives carry increasing *marks*
``seq << 11 | frame index + 1`` (a batch carries up to 1024 frames). A host keeps, per
publisher, the highest mark it has delivered: a frame at or below it is a duplicate.

Duplicates come from two places, both handled by the same test:

* a leader that dies after writing a delivery into its readers' inboxes but before it
  acknowledged it: the host queue outlives it, and the broker redelivers the message to
  the next leader;
* a sender whose connection died with publishes unconfirmed: it publishes them again,
  with the same ids, on its next connection (they may have arrived the first time).

The table lives in the registry's header page (shared memory), so it survives the
leader; only the leader writes it. It holds ``entries`` publishers, the least recently
used one replaced first. A publisher evicted and then redelivered would be delivered
twice: with 64 entries that takes 64 other publishers in between.

This module does no I/O: the words are any writable ``memoryview`` cast to ``Q``.
"""

from __future__ import annotations

import time

FRAME_BITS = 11  # a batch has at most PUBLISH_BATCH_MAX = 1024 frames
WORDS = 3  # nonce, high-water mark, last used (monotonic ms) | OWN
#: in the "last used" word: the publisher is a leader of this host (its group sends come
#: back as echoes, which are skipped; a group frame claiming this host as its origin
#: from any other publisher is a spoof, counted)
OWN = 1 << 63


def message_id(nonce: int, seq: int) -> str:
    return f"{nonce:016x}.{seq}"


def parse_message_id(mid: str | None) -> tuple[int, int] | None:
    """(nonce, seq) of one of our message ids; None for anything else."""
    if not mid or len(mid) > 40:
        return None
    nonce_s, dot, seq_s = mid.partition(".")
    if not dot or len(nonce_s) != 16 or not seq_s.isdigit() or not seq_s.isascii():
        return None
    try:
        nonce = int(nonce_s, 16)
    except ValueError:
        return None
    if nonce == 0:
        return None
    return nonce, int(seq_s)


def mark(seq: int, frame: int) -> int:
    return (seq << FRAME_BITS) | (frame + 1)


class DedupTable:
    """Per-publisher high-water marks over ``entries * 3`` words from ``base``."""

    def __init__(self, words: memoryview, base: int, entries: int) -> None:
        self.w = words
        self.base = base
        self.entries = entries
        self.index: dict[int, int] = {}
        self.clock = 0  # last "used" stamp: monotonic ms, strictly increasing here
        for e in range(entries):
            nonce = words[base + WORDS * e]
            if nonce:
                self.index[nonce] = e
                self.clock = max(self.clock, words[base + WORDS * e + 2] & ~OWN)

    def entry(self, nonce: int) -> int:
        """The entry of publisher ``nonce`` (made, evicting the least recently used)."""
        e = self.index.get(nonce)
        w, b = self.w, self.base
        now = self.clock = max(int(time.monotonic() * 1000), self.clock + 1)
        if e is None:
            e = self._victim()
            off = b + WORDS * e
            old = w[off]
            if old:
                self.index.pop(old, None)
            w[off + 1] = 0  # the mark first: a reader never sees a stale one under it
            w[off + 2] = 0  # (not OWN)
            w[off] = nonce
            self.index[nonce] = e
        w[b + WORDS * e + 2] = now | (w[b + WORDS * e + 2] & OWN)
        return e

    def claim_own(self, nonce: int) -> None:
        """Record ``nonce`` as this host's own publisher (a new leader's link)."""
        e = self.entry(nonce)
        off = self.base + WORDS * e + 2
        self.w[off] = self.w[off] | OWN

    def is_own(self, e: int) -> bool:
        return bool(self.w[self.base + WORDS * e + 2] & OWN)

    def _victim(self) -> int:
        w, b = self.w, self.base
        best, best_used = 0, None
        for e in range(self.entries):
            off = b + WORDS * e
            if not w[off]:
                return e
            used = w[off + 2] & ~OWN
            if best_used is None or used < best_used:
                best, best_used = e, used
        return best

    def seen(self, e: int, m: int) -> bool:
        return m <= self.w[self.base + WORDS * e + 1]

    def record(self, e: int, m: int) -> None:
        off = self.base + WORDS * e + 1
        if m > self.w[off]:
            self.w[off] = m
