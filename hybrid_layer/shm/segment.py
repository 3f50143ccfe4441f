"""POSIX shared-memory segments (``posix_ipc``) mapped with ``mmap``."""

from __future__ import annotations

import contextlib
import mmap
import os

import posix_ipc


class Segment:
    """One mapped segment. ``buf`` is a memoryview of the whole mapping."""

    __slots__ = ("_views", "buf", "created", "map", "name", "size")

    def __init__(self, name: str, size: int, mode: int, *, create: bool) -> None:
        self.name = name
        self.size = size
        flags = posix_ipc.O_CREAT if create else 0
        shm = posix_ipc.SharedMemory(name, flags, mode=mode, size=0)
        try:
            st = os.fstat(shm.fd)
            if st.st_uid != os.geteuid():
                raise PermissionError(f"shared memory {name} belongs to uid {st.st_uid}")
            self.created = st.st_size == 0
            if st.st_size != size:
                if not create:
                    raise ValueError(f"shared memory {name} has size {st.st_size}, not {size}")
                os.ftruncate(shm.fd, size)
            if self.created:
                # reserve the pages now: a full /dev/shm must fail here with a clear
                # error, not later with SIGBUS when a page is first touched
                try:
                    os.posix_fallocate(shm.fd, 0, size)
                except OSError as exc:
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

    def cast(self, view: memoryview, fmt: str) -> memoryview:
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


def unlink(name: str) -> bool:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        return False
    return True
