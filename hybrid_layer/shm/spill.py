"""Messages too large for a ring, carried in a shared-memory segment of their own.

A record whose name and message together exceed :func:`threshold` is not copied into
the destination's ring. The writer puts the name and the message into a new POSIX
segment ``/<ns>.x<dest slot hex>.<dest gen hex>.<random>`` (created exclusively, with
the namespace's mode, its pages reserved with ``posix_fallocate`` so that a full
``/dev/shm`` is an error at write time and never a SIGBUS later), and the ring record's
message is a *reference*: ``0xC1``, the content's length (u64), the segment's name.
``0xC1`` is the one byte msgpack never uses, so no encoded message starts with it and
the owner tells a reference apart with one byte compare per record.

The owner resolves a reference right after reading the record: it opens the segment,
unlinks it at once (from then on the open descriptor alone keeps it, so a reader killed
while copying leaks nothing), copies it out, closes it. An expired or flushed record's
segment is unlinked unread. The name says whose it is, so cleanup is exact:

* the reclaim of a dead slot removes that slot+incarnation's names (its unread records);
* a writer that fails to publish the record removes its segment itself; one killed
  between creating the segment and publishing the record leaves a name that the owner's
  periodic sweep removes once it is older than any record could live (expiry + grace);
* the last process out, and the re-initialisation of a stale namespace, remove every
  spill name of the namespace.

Only ``os`` and ``posix_ipc`` calls; nothing here knows about rings or participants.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
import time

import posix_ipc

from .owner import SHM_FS

TAG = 0xC1
_LEN = struct.Struct("<Q")
_HDR = 1 + _LEN.size
_RANDOM_HEX = 16
#: a reference is at most this long (the tag, the length and a name of at most 255 bytes)
REF_MAX = _HDR + 256


class SpillError(Exception):
    """A reference that does not resolve: its segment is gone, foreign or malformed."""


class BadReference(SpillError):
    """The record's message starts like a reference but is none (or names a segment
    that is not its reader's): a malformed or forged message, not a lost segment."""


def threshold(ring_bytes: int) -> int:
    """Records (name + message) longer than this leave the ring: a quarter of it.

    An in-ring record takes at most a quarter of the ring (four of the largest fit at
    once - the old rule, a ring of twice the largest message, allowed two), so a few
    big messages never crowd small ones out of an inbox for long. With the default
    ring (4 MiB + 64 KiB) the limit is ~1.06 MB: a 1 MB message still takes the
    in-ring path, which is faster than a segment of its own (measured: 1 MB pingpong
    p50 ~1.8 ms in the ring, ~2.3 ms through a segment, whose pages the kernel must
    allocate, zero and free each time); larger ones leave the ring."""
    return ring_bytes // 4


def stem(ns: str, slot: int | None = None, gen: int | None = None) -> str:
    """The common start of spill names (without the leading ``/``): of the namespace,
    of one slot (any incarnation), or of one slot's incarnation."""
    s = f"{ns}.x"
    if slot is None:
        return s
    s = f"{s}{slot:x}."
    return s if gen is None else f"{s}{gen:x}."


def write(
    ns: str, slot: int, gen: int, mode: int, name: bytes, message: bytes | memoryview
) -> bytes:
    """Put ``name + message`` in a new segment for slot ``slot``'s incarnation ``gen``;
    returns the reference to write into the ring. ``OSError`` (e.g. ``/dev/shm`` full)
    leaves nothing behind."""
    seg = f"/{stem(ns, slot, gen)}{secrets.token_hex(_RANDOM_HEX // 2)}"
    size = len(name) + len(message)
    shm = posix_ipc.SharedMemory(seg, posix_ipc.O_CREX, mode=mode, size=0)
    try:
        fd = shm.fd
        try:
            os.posix_fallocate(fd, 0, size)  # reserve every page now: ENOSPC here
            pos = 0
            for chunk in (name, message):
                mv = memoryview(chunk).cast("B")
                while mv:
                    n = os.pwrite(fd, mv, pos)
                    pos += n
                    mv = mv[n:]
        except BaseException:
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_shared_memory(seg)
            raise
    finally:
        shm.close_fd()
    return bytes((TAG,)) + _LEN.pack(size) + seg.encode("ascii")


def _parse(ref: bytes | memoryview, expect: str) -> tuple[str, int]:
    if len(ref) <= _HDR or len(ref) > REF_MAX or ref[0] != TAG:
        raise BadReference(f"not a spill reference ({len(ref)} bytes)")
    (size,) = _LEN.unpack_from(ref, 1)
    try:
        seg = bytes(ref[_HDR:]).decode("ascii")
    except UnicodeDecodeError:
        raise BadReference("a spill reference with a non-ASCII name") from None
    tail = seg[1 + len(expect) :]
    if not seg.startswith("/" + expect) or not tail or not _is_hex(tail):
        raise BadReference(f"a spill reference to {seg!r}, not a name of {expect!r}")
    return seg, size


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdef." for c in s)


def read(ref: bytes | memoryview, expect: str) -> bytes:
    """The content (name + message) of the segment ``ref`` names, which must start with
    ``/expect``; the segment is removed. :class:`SpillError` if it cannot be had."""
    seg, size = _parse(ref, expect)
    try:
        shm = posix_ipc.SharedMemory(seg, 0)
    except posix_ipc.ExistentialError:
        raise SpillError(f"segment {seg} is gone (removed by a sweep or a flush)") from None
    except (posix_ipc.Error, OSError) as exc:
        raise SpillError(f"cannot open segment {seg}: {exc}") from None
    try:
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(seg)  # our open descriptor keeps it until closed
        fd = shm.fd
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_size != size:
            raise SpillError(
                f"segment {seg} has {st.st_size} bytes owned by uid {st.st_uid}, not "
                f"{size} bytes of this user"
            )
        data = os.pread(fd, size, 0)
        if len(data) != size:  # (tmpfs reads whole; only for a very large one, in parts)
            parts = [data]
            got = len(data)
            while got < size:
                more = os.pread(fd, size - got, got)
                if not more:
                    raise SpillError(f"segment {seg} ended after {got} of {size} bytes")
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        return data
    finally:
        shm.close_fd()


def discard(ref: bytes | memoryview, expect: str) -> bool:
    """Remove the segment ``ref`` names without reading it; False if it was not there."""
    try:
        seg, _ = _parse(ref, expect)
    except SpillError:
        return False
    return _unlink(seg)


def _unlink(seg: str) -> bool:
    try:
        posix_ipc.unlink_shared_memory(seg)
    except (posix_ipc.ExistentialError, posix_ipc.PermissionsError, OSError):
        return False
    return True


def _names(prefix: str) -> list[str]:
    try:
        return [e for e in os.listdir(SHM_FS) if e.startswith(prefix)]
    except OSError:
        return []


def remove(prefix: str) -> int:
    """Remove every spill name that starts with ``prefix`` (see :func:`stem`)."""
    return sum(_unlink("/" + e) for e in _names(prefix))


def sweep(slot_prefix: str, own_prefix: str, max_age: float) -> int:
    """An owner's backstop: remove its slot's names of other incarnations (no record of
    its ring can refer to them), and its own last written over ``max_age`` s ago (any
    record that referred to one has expired). Returns how many were removed."""
    cutoff = time.time() - max_age
    n = 0
    for entry in _names(slot_prefix):
        if entry.startswith(own_prefix):
            try:
                if os.stat(f"{SHM_FS}/{entry}").st_mtime > cutoff:
                    continue
            except OSError:
                continue
        n += _unlink("/" + entry)
    return n
