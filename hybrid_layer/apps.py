"""``INSTALLED_APPS = [..., "hybrid_layer"]`` turns on the system checks (checks.py)."""

from __future__ import annotations

from django.apps import AppConfig


class HybridLayerConfig(AppConfig):  # type: ignore[misc]  # (django is untyped)
    name = "hybrid_layer"
    verbose_name = "hybrid_layer channel layer"

    def ready(self) -> None:
        from django.core import checks

        from .checks import check_layers

        checks.register(check_layers)
