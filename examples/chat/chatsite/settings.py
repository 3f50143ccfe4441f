"""The Channels tutorial's chat site on hybrid_layer (its single-host default).

``HYBRID_CHAT_PREFIX`` sets the layer's namespace (default ``chatexample``);
``HYBRID_CHAT_BROKER``, if set, is a RabbitMQ URL (broker mode: several hosts) and
``HYBRID_CHAT_HOST_ID`` this "host"'s id.
"""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "hybrid-layer-chat-example-not-for-production"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True

INSTALLED_APPS = [
    "django.contrib.staticfiles",
    "channels",
    "hybrid_layer",  # its system checks (manage.py check)
    "chat",
]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "chatsite.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {},
    }
]
DATABASES: dict[str, dict[str, str]] = {}
STATIC_URL = "static/"
ASGI_APPLICATION = "chatsite.asgi.application"

_config: dict[str, object] = {"prefix": os.environ.get("HYBRID_CHAT_PREFIX", "chatexample")}
if os.environ.get("HYBRID_CHAT_BROKER"):
    _config["host"] = os.environ["HYBRID_CHAT_BROKER"]
    if os.environ.get("HYBRID_CHAT_HOST_ID"):
        _config["host_id"] = os.environ["HYBRID_CHAT_HOST_ID"]

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "hybrid_layer.HybridChannelLayer",
        "CONFIG": _config,
    }
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"hybrid_layer": {"handlers": ["console"], "level": "INFO"}},
}
