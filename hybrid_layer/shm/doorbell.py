"""File-descriptor doorbells: a FIFO per slot that another process writes one byte into.

An event loop watches the reading end with ``loop.add_reader`` - a wake-up costs a few
microseconds, against about a hundred for a semaphore waited on in a helper thread (see
the measured facts in DESIGN.md). Writers ring only when the ring's owner said it may be
asleep (``CTRL_WAITING``), so a busy reader is never interrupted per message.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

_ONE = b"\x01"


def ensure_fifo(path: str, mode: int) -> None:
    try:
        os.mkfifo(path, mode)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISFIFO(st.st_mode) or st.st_uid != os.geteuid():
            raise PermissionError(
                f"{path} exists but is not a FIFO owned by this user; remove it"
            ) from None


class Bell:
    """The owner's end. Opened read-write so it never sees EOF and never blocks."""

    __slots__ = ("fd", "path")

    def __init__(self, path: str, mode: int) -> None:
        ensure_fifo(path, mode)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.drain()

    def drain(self) -> None:
        try:
            while len(os.read(self.fd, 65536)) == 65536:
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class BellPush:
    """A sender's end of another slot's bell; lazily (re)opened."""

    __slots__ = ("fd", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def ring(self) -> bool:
        """Wake the owner. ``False`` if nobody has the bell open (owner dead)."""
        if self.fd < 0:
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno in (errno.ENXIO, errno.ENOENT):
                    return False
                raise
        try:
            os.write(self.fd, _ONE)
        except BlockingIOError:  # pipe full: the owner has plenty of wake-ups pending
            pass
        except BrokenPipeError:
            self.close()
            return False
        return True

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
