"""ASGI entry point: HTTP pages and the chat's WebSocket, closing the layer on shutdown."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
django_asgi_app = get_asgi_application()

import chat.routing  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from hybrid_layer.asgi import close_layers_on_shutdown  # noqa: E402

application = close_layers_on_shutdown(
    ProtocolTypeRouter(
        {
            "http": django_asgi_app,
            "websocket": URLRouter(chat.routing.websocket_urlpatterns),
        }
    )
)
