"""POSIX shared-memory segments (``posix_ipc``) mapped with ``mmap``."""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
from typing import Literal

import posix_ipc

from .owner import shm_path, taken

log = logging.getLogger("hybrid_layer")

# errors of shm_open that mean "something not ours is there" (ELOOP: glibc opens with
# O_NOFOLLOW, so a symlink planted there)
_NOT_OURS = frozenset({errno.ELOOP, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENXIO})


class Segment:
    """One mapped segment. ``buf`` is a memoryview of the whole mapping."""

    __slots__ = ("_views", "buf", "created", "map", "name", "size")

    def __init__(self, name: str, size: int, mode: int, *, create: bool) -> None:
        self.name = name
        self.size = size
        shm = _open(name, mode, create=create)
        try:
            st = os.fstat(shm.fd)
            if st.st_uid != os.geteuid():
                raise taken("shared memory", shm_path(name), "it belongs to another user")
            self.created = st.st_size == 0
            if st.st_size != size:
                if not create:
                    raise ValueError(f"shared memory {name} has size {st.st_size}, not {size}")
                os.ftruncate(shm.fd, size)
            # reserve the pages now: a full /dev/shm must fail here with a clear error,
            # not later with SIGBUS when a page is first touched. Also a segment found at
            # its size but not reserved: its creator was killed between the resize and
            # the reservation (cheap where the pages are reserved already)
            if self.created or (create and st.st_blocks * 512 < size):
                try:
                    os.posix_fallocate(shm.fd, 0, size)
                except OSError as exc:
                    if self.created:
                        with contextlib.suppress(posix_ipc.ExistentialError):
                            posix_ipc.unlink_shared_memory(name)
                    raise OSError(
                        exc.errno,
                        f"cannot reserve {size} bytes of shared memory for {name} "
                        f"({exc.strerror}); free space in /dev/shm or lower "
                        "CONFIG['ring_bytes'] / CONFIG['max_participants']",
                    ) from exc
            self.map = mmap.mmap(shm.fd, size)
        finally:
            shm.close_fd()
        self.buf = memoryview(self.map)
        self._views: list[memoryview] = []

    def view(self, start: int, end: int) -> memoryview:
        """A sub-view that :meth:`close` releases, so the mapping can be unmapped."""
        v = self.buf[start:end]
        self._views.append(v)
        return v

    def cast(self, view: memoryview, fmt: Literal["Q", "I", "i"]) -> memoryview:
        """A typed view (``"Q"``, ``"I"``, ``"i"``) that :meth:`close` releases."""
        v = view.cast(fmt)
        self._views.append(v)
        return v

    def close(self) -> None:
        """Release every view and unmap. Idempotent."""
        for v in reversed(self._views):
            v.release()
        self._views.clear()
        self.buf.release()
        with contextlib.suppress(BufferError, ValueError):
            self.map.close()


def _open(name: str, mode: int, *, create: bool) -> posix_ipc.SharedMemory:
    """``shm_open``; a name this user may not open (another user's, a symlink: glibc
    opens with ``O_NOFOLLOW``) becomes :class:`NamespaceTaken` naming it and its owner.
    ``posix_ipc.ExistentialError`` (no such name, without ``create``) passes through."""
    try:
        return posix_ipc.SharedMemory(name, posix_ipc.O_CREAT if create else 0, mode=mode, size=0)
    except posix_ipc.PermissionsError as exc:
        raise taken("shared memory", shm_path(name), f"open refused ({exc})") from exc
    except OSError as exc:
        if exc.errno not in _NOT_OURS:
            raise
        raise taken("shared memory", shm_path(name), f"open failed: {exc.strerror}") from exc


def unlink(name: str) -> bool:
    """Remove a name; False if it did not exist or cannot be removed. Another user's
    name in a sticky ``/dev/shm`` cannot be: that is logged, naming it and its owner
    (whoever then needs the name gets :class:`NamespaceTaken` from ``Segment``)."""
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        return False
    except (posix_ipc.PermissionsError, OSError) as exc:
        log.warning(
            "hybrid_layer: %s", taken("shared memory", shm_path(name), f"cannot remove it ({exc})")
        )
        return False
    return True
