"""ASGI applications for the system-check tests: one wrapped, one not."""

from __future__ import annotations

from typing import Any

from hybrid_layer.asgi import close_layers_on_shutdown


async def bare(scope: Any, receive: Any, send: Any) -> None:
    return None


wrapped = close_layers_on_shutdown(bare)
