"""ASGI glue: close this process's layers on lifespan shutdown.

Uvicorn (and uvicorn-worker under Gunicorn) end a worker by re-raising SIGTERM after the
graceful shutdown, so ``atexit`` handlers never run there. Without a clean close the
worker's slot is reclaimed by the leader (nothing breaks), but the last worker out cannot
remove the host's shared-memory names; the next start finds them stale and reuses them.
Wrap the application to leave cleanly::

    from hybrid_layer.asgi import close_layers_on_shutdown
    application = close_layers_on_shutdown(ProtocolTypeRouter({...}))
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def close_all_layers() -> None:
    """Close every ``HybridChannelLayer`` attached in this process."""
    from .shutdown import _layers

    for layer in list(_layers):
        await layer.close()


def close_layers_on_shutdown(app: ASGIApp) -> ASGIApp:
    """Answer the ASGI ``lifespan`` scope, closing the layers at shutdown.

    Other scopes go to ``app``. Channels' ``ProtocolTypeRouter`` has no lifespan
    handler of its own, so this is safe to put in front of it.
    """

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await close_all_layers()
                except Exception as exc:  # report, never hang the server's shutdown
                    await send({"type": "lifespan.shutdown.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return

    wrapped.closes_hybrid_layers = True  # type: ignore[attr-defined]  # (the system check)
    return wrapped


def closes_layers(app: Any) -> bool:
    """Whether ``app`` is (or wraps, as far as can be seen) ``close_layers_on_shutdown``."""
    seen = 0
    while app is not None and seen < 8:
        if getattr(app, "closes_hybrid_layers", False):
            return True
        app = getattr(app, "app", None) or getattr(app, "application", None)
        seen += 1
    return False
