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

Reading never raises anything but :class:`RingCorrupt`: whatever bytes are in the ring,
``try_read`` returns a record, ``None`` (empty), or raises ``RingCorrupt`` (the fuzz
invariant tested in ``tests/unit/test_ring.py``).
"""

from __future__ import annotations

from typing import NamedTuple

from .layout import ALIGN, KINDS, Q_HEAD, Q_TAIL, RECORD, RECORD_MAGIC, align

_HDR = RECORD.size
_pack_hdr = RECORD.pack_into  # only for unpublished bytes: it memsets before writing
_unpack_hdr = RECORD.unpack_from


class RingCorrupt(Exception):
    """The bytes at ``head`` are not a valid record; the ring must be reset."""


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
        fit now. Caller holds the ring lock."""
        body_len = len(name) + len(message)
        need = _HDR + ((body_len + ALIGN - 1) & -ALIGN)
        q = self.q
        tail = q[Q_TAIL]
        before = tail - q[Q_HEAD]
        if before + need > self.size:
            return -1
        # records and the data size are multiples of 16 = header size: no straddling
        _pack_hdr(self.data, tail % self.size, body_len, RECORD_MAGIC, kind, len(name), expires_at)
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
        """Copy out and consume the oldest record, ``None`` if empty. Owner only."""
        q = self.q
        head = q[Q_HEAD]
        avail = q[Q_TAIL] - head
        if avail == 0:
            return None
        if avail < _HDR or avail > self.size or head % ALIGN:
            raise RingCorrupt(f"ring positions impossible: head={head} tail={head + avail}")
        off = head % self.size
        body_len, magic, kind, name_len, expires_at = _unpack_hdr(self.data, off)
        need = _HDR + align(body_len)
        if magic != RECORD_MAGIC or kind not in KINDS or name_len > body_len or need > avail:
            raise RingCorrupt(
                f"bad record at {head}: magic={magic:#x} kind={kind} "
                f"name_len={name_len} body_len={body_len} available={avail}"
            )
        body = self._get(head + _HDR, body_len)
        try:
            name = body[:name_len].decode("ascii")
        except UnicodeDecodeError as exc:
            raise RingCorrupt(f"record at {head} has a non-ASCII name") from exc
        q[Q_HEAD] = head + need
        return Record(kind, name, expires_at, body, name_len)
