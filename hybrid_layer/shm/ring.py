"""A multi-producer, single-consumer byte ring over any buffer (pure: no OS calls).

Theory of operation
-------------------
``head`` and ``tail`` are 64-bit byte positions that only grow; the offset in the data
area is ``pos % size``. The consumer alone advances ``head``; writers advance ``tail``
and are serialised by a lock held *outside* this module (see ``shm.locks``).

A writer copies the whole record (header, name, message; each copy may wrap around the
end of the data area) into the free space past ``tail`` and only then publishes it by
storing the new ``tail`` - one aligned 8-byte store. A writer killed halfway therefore
leaves an unpublished, invisible half record that the next writer overwrites: the ring
never holds a torn record. ``head`` is written only by the reader after it has copied a
record out, so writers never overwrite unread bytes.

Reading tells a broken *frame* from a bad *record*. The frame is the header's magic and
body length (with ``head`` and ``tail``): they say where the next record starts. While
they are sane, a record whose content is invalid (unknown kind, name length past the
body, a name that is not UTF-8) is consumed and reported with :class:`BadRecord`: its
neighbours are still read. Only a broken frame - nothing says where the next record
starts - raises :class:`RingCorrupt`, and the caller must reset the ring.

Whatever bytes are in the ring, ``try_read`` returns a record, ``None`` (empty), raises
``BadRecord`` (one record skipped: ``head`` moved past it) or raises ``RingCorrupt``
(``head`` unchanged); never anything else (the fuzz invariant of
``tests/unit/test_ring.py``).
"""

from __future__ import annotations

from typing import NamedTuple

from .layout import (
    ALIGN,
    KIND_BITS,
    KIND_MASK,
    KINDS,
    NAME_MAX,
    Q_HEAD,
    Q_TAIL,
    RECORD,
    RECORD_MAGIC,
    align,
)

_HDR = RECORD.size
_pack_hdr = RECORD.pack_into  # only for unpublished bytes: it memsets before writing
_unpack_hdr = RECORD.unpack_from


class RingCorrupt(Exception):
    """The framing at ``head`` is broken (positions or record header): nothing says where
    the next record starts, so the ring must be reset. ``head`` did not move."""


class BadRecord(Exception):
    """A well-framed record with invalid content was consumed (skipped): count it as one
    dropped record and read on. ``head`` moved past it."""


class Record(NamedTuple):
    kind: int
    name: str
    expires_at: float
    body: bytes  # name bytes followed by the message bytes
    name_len: int

    @property
    def message(self) -> memoryview:
        return memoryview(self.body)[self.name_len :]


def record_size(name_len: int, message_len: int) -> int:
    return _HDR + align(name_len + message_len)


class Ring:
    """The ring over ``ctrl`` (control words) and ``data`` (a multiple of 16 bytes)."""

    __slots__ = ("data", "q", "size")

    def __init__(self, ctrl: memoryview | bytearray, data: memoryview | bytearray) -> None:
        if len(data) % ALIGN or len(data) < 64:
            raise ValueError("ring data area must be a multiple of 16 bytes, at least 64")
        # head and tail are only ever accessed as whole words of this typed view: one
        # untorn load or store each (see layout.U64)
        self.q = memoryview(ctrl).cast("B").cast("Q")
        self.data = memoryview(data).cast("B")
        self.size = len(data)

    def release(self) -> None:
        self.q.release()
        self.data.release()

    # ------------------------------------------------------------ positions
    @property
    def head(self) -> int:
        return self.q[Q_HEAD]

    @property
    def tail(self) -> int:
        return self.q[Q_TAIL]

    def used(self) -> int:
        return self.tail - self.head

    def free(self) -> int:
        return self.size - self.used()

    def reset(self) -> int:
        """Drop everything unread (caller holds the ring lock). Returns bytes dropped."""
        q = self.q
        tail = q[Q_TAIL]
        dropped = tail - q[Q_HEAD]
        q[Q_HEAD] = tail
        return dropped

    # ------------------------------------------------------------ writing
    def _put(self, pos: int, chunk: memoryview | bytes) -> int:
        n = len(chunk)
        off = pos % self.size
        first = self.size - off
        if n <= first:
            self.data[off : off + n] = chunk
        else:
            mv = memoryview(chunk)
            self.data[off:] = mv[:first]
            self.data[: n - first] = mv[first:]
        return pos + n

    def try_write(
        self, kind: int, name: bytes, expires_at: float, message: bytes | memoryview
    ) -> int:
        """Append one record. Returns the bytes in use before it, or -1 if it does not
        fit now. Caller holds the ring lock. ``name`` is UTF-8, at most ``NAME_MAX``
        bytes (``ValueError`` otherwise)."""
        name_len = len(name)
        if name_len > NAME_MAX:
            raise ValueError(f"a {name_len}-byte name is over the ring's {NAME_MAX}")
        body_len = name_len + len(message)
        need = _HDR + ((body_len + ALIGN - 1) & -ALIGN)
        q = self.q
        tail = q[Q_TAIL]
        before = tail - q[Q_HEAD]
        if before + need > self.size:
            return -1
        # records and the data size are multiples of 16 = header size: no straddling
        _pack_hdr(
            self.data,
            tail % self.size,
            body_len,
            RECORD_MAGIC,
            name_len << KIND_BITS | kind,
            expires_at,
        )
        pos = tail + _HDR
        if name:
            pos = self._put(pos, name)
        if message:
            self._put(pos, message)
        # publish: one aligned 8-byte store, after every byte of the record
        q[Q_TAIL] = tail + need
        return before

    # ------------------------------------------------------------ reading
    def _get(self, pos: int, n: int) -> bytes:
        off = pos % self.size
        first = self.size - off
        if n <= first:
            return bytes(self.data[off : off + n])
        return bytes(self.data[off:]) + bytes(self.data[: n - first])

    def try_read(self) -> Record | None:
        """Copy out and consume the oldest record, ``None`` if empty. Owner only.

        Raises :class:`BadRecord` after skipping one well-framed invalid record, and
        :class:`RingCorrupt` (nothing consumed) when the framing is broken."""
        q = self.q
        head = q[Q_HEAD]
        avail = q[Q_TAIL] - head
        if avail == 0:
            return None
        if avail < _HDR or avail > self.size or head % ALIGN:
            raise RingCorrupt(f"ring positions impossible: head={head} tail={head + avail}")
        off = head % self.size
        body_len, magic, kn, expires_at = _unpack_hdr(self.data, off)
        need = _HDR + align(body_len)
        if magic != RECORD_MAGIC or need > avail:
            raise RingCorrupt(
                f"broken record frame at {head}: magic={magic:#x} "
                f"body_len={body_len} available={avail}"
            )
        kind = kn & KIND_MASK
        name_len = kn >> KIND_BITS
        if kind not in KINDS or name_len > body_len:
            q[Q_HEAD] = head + need
            raise BadRecord(
                f"invalid record at {head} skipped: kind={kind} name_len={name_len} "
                f"body_len={body_len}"
            )
        body = self._get(head + _HDR, body_len)
        try:
            name = body[:name_len].decode()
        except UnicodeDecodeError:
            q[Q_HEAD] = head + need
            raise BadRecord(f"record at {head} skipped: its name is not UTF-8") from None
        q[Q_HEAD] = head + need
        return Record(kind, name, expires_at, body, name_len)
