"""Leaving the namespace when a process ends: at exit, on SIGTERM, when a layer is dropped.

Servers rarely call ``close()``. So that the last process out still removes the
shared-memory names (and a leaving process frees its slot at once, not at the next
reclaim), every layer object is listed in ``_layers`` (weakly) and closed:
``_close_all_at_exit`` at interpreter exit (``atexit``); on SIGTERM, by a handler
installed only where SIGTERM still has its default disposition (``_on_sigterm``:
close within ``SIGTERM_CLOSE_WAIT``, then die of SIGTERM as if unhandled); and when a
layer object is garbage-collected while attached (``_release_collected``, a
``weakref.finalize`` set up by ``HybridChannelLayer._p``).

Owns ``_layers`` (also read by ``hybrid_layer.asgi`` and the fork hook in ``layer``)
and whether the SIGTERM handler is installed. Invariants: a handler someone else
installed is never replaced; the close never runs inside a signal handler that may
have interrupted a ``send`` holding a layer lock (it runs from the event loop's next
callback, or on a thread). Nothing here is on a per-message path.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import signal
import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .layer import HybridChannelLayer
    from .participant import Participant

#: how long the SIGTERM handler waits for the layers to close before the process dies
#: anyway (below docker's default stop timeout of 10 s; systemd's is 90 s)
SIGTERM_CLOSE_WAIT = 8.0

_layers: weakref.WeakSet[HybridChannelLayer] = weakref.WeakSet()


def _release_collected(p: Participant) -> None:
    """A layer object was garbage-collected while attached: leave the namespace.

    Collection can happen in any thread, the host thread and a running event loop's
    included, so the close (which may wait for the link to publish what is queued)
    runs on a thread of its own; at interpreter exit it runs here.
    """
    if p.closed or p.pid != os.getpid():
        return
    try:
        threading.Thread(target=_close_quietly, args=(p,), name="hybrid-layer-release").start()
    except RuntimeError:  # interpreter shutting down: no new threads
        _close_quietly(p)


def _close_quietly(p: Participant) -> None:
    try:
        p.close()
    except Exception:  # pragma: no cover - best effort
        logging.getLogger("hybrid_layer").exception("hybrid_layer: releasing a layer failed")


def _close_all_at_exit() -> None:
    """Servers rarely call ``close()``: leave the namespace cleanly at interpreter exit,
    so the last process out still removes the shared-memory names."""
    for layer in list(_layers):
        try:
            layer.close_sync()
        except Exception:  # pragma: no cover - best effort at exit
            logging.getLogger("hybrid_layer").exception("hybrid_layer: close at exit failed")


_sigterm_installed = False


def _install_sigterm_handler() -> None:
    """Close the layers on SIGTERM (systemd's and docker's stop signal), where that is
    safe: only from the main thread, and only while SIGTERM has its default disposition
    - a handler someone else installed (uvicorn, gunicorn, the application) is never
    replaced; there the server's own shutdown (the ASGI lifespan wrapper of
    ``hybrid_layer.asgi``) closes. Installed once per process; a handler installed
    later by anyone simply replaces it."""
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # (not the main interpreter, no signals here)
        return
    _sigterm_installed = True


#: how long a SIGTERM waits for the main thread's event loop to run the close
SIGTERM_LOOP_WAIT = 1.0


def _on_sigterm(signum: int, frame: object) -> None:
    """Leave the namespace (the last process out removes the names, another frees its
    slot at once), then die of SIGTERM as if there had been no handler: same exit
    status, same meaning for the supervisor. A second SIGTERM ends it at once.

    A signal handler runs in the main thread between two bytecodes: maybe in the middle
    of a ``send`` holding one of the layer's locks, which the close needs. When the main
    thread runs an event loop (``runworker``, a consumer), the close is therefore done
    from that loop's next callback, where no layer code is half-way through; otherwise
    (the main thread blocked in ``async_to_sync``, a sleep) at once.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    loop = asyncio._get_running_loop()
    if loop is not None and not loop.is_closed():
        started = threading.Event()
        try:
            loop.call_soon_threadsafe(_close_then_die, started)
        except RuntimeError:  # (closing under us: do it here)
            pass
        else:
            # a loop whose tasks never yield would never run it: then die within a
            # second without a clean close (as with SIGKILL: the leader reclaims the slot)
            threading.Thread(target=_unless_started, args=(started,), daemon=True).start()
            return
    _close_then_die()


def _unless_started(started: threading.Event) -> None:
    if not started.wait(SIGTERM_LOOP_WAIT):
        logging.getLogger("hybrid_layer").warning(
            "hybrid_layer: SIGTERM: the event loop did not run the close within %.0f s "
            "(a task that never yields?); exiting without it",
            SIGTERM_LOOP_WAIT,
        )
        os.kill(os.getpid(), signal.SIGTERM)


def _close_then_die(started: threading.Event | None = None) -> None:
    """The close runs in a thread and gets at most ``SIGTERM_CLOSE_WAIT`` s (then the
    process dies without a clean close, as with SIGKILL, and the leader reclaims its
    slot); then SIGTERM again, now with the default disposition."""
    if started is not None:
        started.set()
    closer = threading.Thread(target=_close_all_at_exit, name="hybrid-layer-sigterm", daemon=True)
    closer.start()
    closer.join(SIGTERM_CLOSE_WAIT)
    if closer.is_alive():
        logging.getLogger("hybrid_layer").warning(
            "hybrid_layer: SIGTERM: the layers did not close within %.0f s; exiting anyway",
            SIGTERM_CLOSE_WAIT,
        )
    signal.raise_signal(signal.SIGTERM)
    # still here: the default disposition ignores SIGTERM, which the kernel does for a
    # namespace's init - python as PID 1 in a container without --init. Exit as a
    # SIGTERM'd process would (a closed layer must not go on serving)
    os._exit(128 + signal.SIGTERM)


atexit.register(_close_all_at_exit)
