"""Django settings of the test chat app. The layer namespace comes from the environment.

``HL_TEST_PREFIX`` (required) is the layer's ``CONFIG['prefix']``: each test run uses its
own, so that runs never share shared memory and leftovers can be detected.
"""

from __future__ import annotations

import os

DEBUG = False
SECRET_KEY = "hybrid-layer-chatapp-tests-only"
ALLOWED_HOSTS = ["*"]
USE_TZ = True

INSTALLED_APPS = ["channels"]
MIDDLEWARE: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
ROOT_URLCONF = "tests.apps.chatapp.urls"

ASGI_APPLICATION = "tests.apps.chatapp.asgi.application"

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "hybrid_layer.HybridChannelLayer",
        "CONFIG": {
            "prefix": os.environ["HL_TEST_PREFIX"],
            "host_id": os.environ.get("HL_TEST_HOST_ID", "testhost"),
            "expiry": 10,
        },
    }
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {"hybrid_layer": {"handlers": ["stderr"], "level": "INFO"}},
}
