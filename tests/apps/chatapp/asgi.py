"""ASGI entry point: ``tests.apps.chatapp.asgi:application``.

The channel layer object is created at import time (``get_channel_layer()`` at module
level, as many projects do), so under ``gunicorn --preload`` it exists in the master
before the workers are forked; each worker must still attach on its own.

With ``HL_TEST_ATTACH_AT_IMPORT=1`` the importing process also *uses* the layer once
(mints a channel name), so under ``--preload`` the master is a participant of the host
namespace when it forks the workers.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.apps.chatapp.settings")

from channels.layers import get_channel_layer
from channels.routing import ProtocolTypeRouter, URLRouter
from django.core.asgi import get_asgi_application
from django.urls import path

django_asgi_app = get_asgi_application()  # sets Django up before the consumers import

from .consumers import ChatConsumer  # noqa: E402

channel_layer = get_channel_layer()

if os.environ.get("HL_TEST_ATTACH_AT_IMPORT") == "1":
    import asyncio

    asyncio.run(channel_layer.new_channel())

from hybrid_layer.asgi import close_layers_on_shutdown  # noqa: E402

# closes this worker's layer on lifespan shutdown: uvicorn ends workers by re-raising
# SIGTERM, which skips atexit, so this is what lets the last worker out clean up
application = close_layers_on_shutdown(
    ProtocolTypeRouter(
        {
            "http": django_asgi_app,
            "websocket": URLRouter([path("ws/chat/", ChatConsumer.as_asgi())]),
        }
    )
)
