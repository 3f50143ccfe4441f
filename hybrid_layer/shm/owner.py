"""Who owns a name of the namespace, and the error that says so.

Every name of a host namespace is predictable (``hl.<prefix>.<host_id>``: the default
prefix is ``asgi`` and the host id comes from the world-readable machine-id), so any
local user can create one of them first. The site cannot use such a name, nor remove it
from a sticky directory such as ``/dev/shm``. This module turns every failure to attach
one (shared memory segment, lock file, doorbell FIFO) into :class:`NamespaceTaken`, whose
text names the object, what is there and who owns it, and says what to do.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat

from ..errors import NamespaceTaken

#: where Linux keeps POSIX shared memory objects (``shm_open`` names)
SHM_FS = "/dev/shm"

_KINDS = (
    (stat.S_ISLNK, "a symlink"),
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISSOCK, "a socket"),
)


def user_text(uid: int) -> str:
    """``uid 1001 (mallory)``, or ``uid 1001`` when the user database does not know it."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (KeyError, OverflowError):
        return f"uid {uid}"


def describe(path: str) -> str:
    """What is at ``path`` and who owns it, without following a symlink there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "nothing (it vanished)"
    except OSError as exc:
        return f"something this process cannot inspect ({exc.strerror})"
    kind = next((text for test, text in _KINDS if test(st.st_mode)), "a special file")
    if stat.S_ISLNK(st.st_mode):
        with contextlib.suppress(OSError):
            kind += f" to {os.readlink(path)!r}"
    return f"{kind} owned by {user_text(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):04o}"


def shm_path(name: str) -> str:
    """The file behind a POSIX shared memory name (``/hl.x.s0`` -> ``/dev/shm/hl.x.s0``)."""
    return SHM_FS + name


def taken(what: str, path: str, problem: str) -> NamespaceTaken:
    """The error for a name this process may not use: ``what`` (e.g. "doorbell FIFO"),
    ``path``, ``problem`` (what went wrong: "it is not a FIFO owned by this user")."""
    me = user_text(os.geteuid())
    return NamespaceTaken(
        f"cannot attach the {what} {path}: {problem}; found {describe(path)}, this "
        f"process runs as {me}. Another local user created the name first (names are "
        "predictable from CONFIG['prefix'] and the host id), or another user's site "
        "uses the same prefix. Find out who and why, remove it (as root: rm -f "
        f"{path!r}), or give this site a prefix of its own (CONFIG['prefix']) and a "
        "private shm_dir (a 0700 directory owned by the site's user)"
    )
