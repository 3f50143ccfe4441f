from __future__ import annotations

from django.urls import include, path

import hybrid_layer.health

urlpatterns = [
    path("chat/", include("chat.urls")),
    path("healthz", hybrid_layer.health.health_view),
]

try:  # metrics if prometheus_client is installed (pip install "hybrid-layer[prometheus]")
    import hybrid_layer.prometheus

    urlpatterns.append(path("metrics", hybrid_layer.prometheus.metrics_view))
except ImportError:
    pass
