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

from .._log import limited
from .owner import describe, taken

_ONE = b"\x01"
# never follow a symlink planted in place of a FIFO; never block on open or write
_OPEN_FLAGS = os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW


def _ours(fd: int) -> bool:
    st = os.fstat(fd)
    return stat.S_ISFIFO(st.st_mode) and st.st_uid == os.geteuid()


def ensure_fifo(path: str, mode: int) -> None:
    """Create the FIFO (exclusively: ``mkfifo`` fails if the name exists), or accept an
    existing one only if it is a FIFO of this user (a crashed owner's)."""
    try:
        os.mkfifo(path, mode)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISFIFO(st.st_mode) or st.st_uid != os.geteuid():
            raise taken("doorbell FIFO", path, "it is not a FIFO owned by this user") from None
    except OSError as exc:
        raise taken("doorbell FIFO", path, f"mkfifo failed: {exc.strerror}") from exc


class Bell:
    """The owner's end. Opened read-write so it never sees EOF and never blocks."""

    __slots__ = ("fd", "path")

    def __init__(self, path: str, mode: int) -> None:
        ensure_fifo(path, mode)
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | _OPEN_FLAGS)
        except OSError as exc:  # ELOOP: replaced by a symlink since ensure_fifo
            raise taken("doorbell FIFO", path, f"open failed: {exc.strerror}") from exc
        if not _ours(self.fd):  # replaced between the check and the open
            os.close(self.fd)
            self.fd = -1
            raise taken("doorbell FIFO", path, "it is not a FIFO owned by this user")
        os.fchmod(self.fd, mode)  # a crashed owner's FIFO keeps the mode it was made with
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
    """A sender's end of another slot's bell; lazily (re)opened.

    Opened with ``O_NOFOLLOW`` and checked to be a FIFO of this user before anything is
    written: a sender never writes a byte into a file someone planted in its place. A
    refusal is counted (``refused``, the layer's ``statistics().extra``) and logged; the
    message itself is already in the owner's ring and waits there until the owner next
    looks (its own bell, its host thread, its next ``receive()``).
    """

    __slots__ = ("fd", "path", "refused")

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.refused = 0

    def ring(self) -> bool:
        """Wake the owner. ``False`` if nobody has the bell open (owner dead) or the
        bell was refused. Never raises: the record it announces is already written."""
        if self.fd < 0 and not self._open():
            return False
        try:
            os.write(self.fd, _ONE)
        except BlockingIOError:  # pipe full: the owner has plenty of wake-ups pending
            pass
        except OSError:  # EPIPE: the owner closed it (died)
            self.close()
            return False
        return True

    def _open(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | _OPEN_FLAGS)
        except OSError as exc:
            if exc.errno in (errno.ENXIO, errno.ENOENT):
                return False  # no reader has it open, or no such bell: owner gone
            self._refuse(exc.strerror or str(exc))
            return False
        try:
            ok = _ours(fd)
        except OSError:
            ok = False
        if not ok:
            os.close(fd)
            self._refuse("it is not a FIFO owned by this user")
            return False
        self.fd = fd
        return True

    def _refuse(self, why: str) -> None:
        self.refused += 1
        limited.warning(
            "bell-refused",
            "hybrid_layer: doorbell %s refused (%s; found %s): nothing written to it; the "
            "message waits in its inbox until the owner next looks. Another user may be "
            "tampering with shm_dir",
            self.path,
            why,
            describe(self.path),
        )

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
