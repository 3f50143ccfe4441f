"""Robust inter-process locks: fcntl *open file description* (OFD) byte-range locks.

The kernel releases an OFD lock when the last descriptor of its open file description
closes - in particular when the holder is SIGKILLed - so no lock can be left held by a
dead process. (POSIX semaphores, by contrast, stay taken forever if their holder dies.)

OFD locks belong to an open file description, not to a thread: threads of one process
share it and do not exclude each other, so every user pairs a byte with a
``threading.Lock``. A forked child must open the file again (``LockFile`` is not
fork-inherited usefully: the child would share the parent's locks).
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct

from .owner import taken

_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux/x86-64 and aarch64: 32 bytes


def _flock(kind: int, start: int, length: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, start, length, 0)


class LockFile:
    """The namespace's lock file; every lock of the namespace is a byte range of it."""

    __slots__ = ("fd", "path")

    def __init__(self, path: str, mode: int) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
        except OSError as exc:  # ELOOP: a symlink; EACCES: another user's file
            raise taken("lock file", path, f"open failed: {exc.strerror}") from exc
        st = os.fstat(self.fd)
        if st.st_uid != os.geteuid() or not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            self.fd = -1
            raise taken("lock file", path, "it is not a regular file owned by this user")

    def acquire(self, start: int, length: int = 1, *, blocking: bool = True) -> bool:
        cmd = fcntl.F_OFD_SETLKW if blocking else fcntl.F_OFD_SETLK
        try:
            fcntl.fcntl(self.fd, cmd, _flock(fcntl.F_WRLCK, start, length))
        except (BlockingIOError, PermissionError):
            return False
        return True

    def release(self, start: int, length: int = 1) -> None:
        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, start, length))

    def held_by_other(self, start: int, length: int = 1) -> bool:
        """True if another open file description (another process) holds a lock there."""
        res = fcntl.fcntl(self.fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, start, length))
        return bool(_FLOCK.unpack(res)[0] != fcntl.F_UNLCK)

    def is_current(self) -> bool:
        """False if the path was unlinked or replaced since we opened it."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self.fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
