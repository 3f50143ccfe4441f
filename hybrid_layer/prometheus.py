"""Prometheus metrics of a host's layer (``pip install "hybrid-layer[prometheus]"``).

Every counter of ``global_statistics()`` (the host's processes summed: any worker
answers for its host), labelled with ``prefix`` and ``host_id``: messages sent and
received, group sends and copies, ``raised`` and ``dropped`` by reason, ring fill,
participants, the leader's epoch, and in broker mode the link's state and counters.
Mount it in a Django site::

    # urls.py
    from hybrid_layer.prometheus import metrics_view
    urlpatterns = [..., path("metrics", metrics_view)]

or register the collector with a registry of your own::

    from prometheus_client import REGISTRY
    from hybrid_layer.prometheus import LayerCollector
    REGISTRY.register(LayerCollector())          # CHANNEL_LAYERS["default"]
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .stats import Statistics

NS = "hybrid_layer"
LINK_STATES = ("up", "down", "connecting", "none")
#: broker keys that only grow (exported as counters); other numbers are gauges
BROKER_COUNTERS = {
    "published",
    "confirmed",
    "returned",
    "received",
    "reconnects",
    "batches",
    "duplicates",
    "retried",
    "republished",
    "claim_refused",
    "link_changes",
    "binding_syncs",
    "connect_failures",
}


class LayerCollector:
    """A ``prometheus_client`` collector of one layer (default: the ``alias`` of
    ``CHANNEL_LAYERS``, looked up at each scrape)."""

    def __init__(self, layer: Any = None, alias: str = "default") -> None:
        self._layer = layer
        self.alias = alias

    def layer(self) -> Any:
        if self._layer is not None:
            return self._layer
        from channels.layers import get_channel_layer

        return get_channel_layer(self.alias)

    def collect(self) -> Iterator[Metric]:
        layer = self.layer()
        g: Statistics = layer.global_statistics()
        cfg = layer.config
        yield from metrics(g, cfg.prefix, cfg.host_id)


def metrics(g: Statistics, prefix: str, host_id: str) -> Iterator[Metric]:
    """The metric families of one ``global_statistics()``."""
    names = ["prefix", "host_id"]
    base = [prefix, host_id]

    def counter(name: str, doc: str, value: int) -> CounterMetricFamily:
        m = CounterMetricFamily(f"{NS}_{name}", doc, labels=names)
        m.add_metric(base, value)
        return m

    def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        m = GaugeMetricFamily(f"{NS}_{name}", doc, labels=names)
        m.add_metric(base, value)
        return m

    yield counter("sent", "Messages sent (send) by the host's processes", g.sent)
    yield counter("received", "Messages received (receive), group copies included", g.received)
    yield counter("group_sends", "group_send calls", g.group_sends)
    yield counter("group_copies", "Group messages delivered as one copy per member", g.group_copies)
    raised = CounterMetricFamily(
        f"{NS}_raised", "send() raising (ChannelFull, MessageTooLarge)", labels=[*names, "reason"]
    )
    for reason, v in sorted(g.raised.items()):
        raised.add_metric([*base, reason], v)
    yield raised
    dropped = CounterMetricFamily(
        f"{NS}_dropped", "Messages dropped, by reason (each also logged)", labels=[*names, "reason"]
    )
    for reason, v in sorted(g.dropped.items()):
        dropped.add_metric([*base, reason], v)
    yield dropped
    yield gauge(
        "pending", "Messages waiting for a receiver on the host (global_statistics)", g.pending
    )
    extra_docs = {
        "repaired": "Corrupted shared control words found and repaired",
        "site_clash": "Another site seen sharing this namespace (same prefix)",
    }
    for key, v in sorted(g.extra.items()):
        yield counter(key, extra_docs.get(key, key), v)
    yield gauge("ring_used_bytes", "Bytes waiting in the host's rings", g.ring_used_bytes)
    yield gauge("ring_size_bytes", "Size of the host's rings", g.ring_size_bytes)
    yield gauge("participants", "Processes attached to the host's namespace", g.participants)
    yield gauge(
        "leader_epoch", "Leader elections so far (grows when a leader dies)", g.leader_epoch
    )
    b = g.broker
    if not b:
        return
    state = GaugeMetricFamily(
        f"{NS}_link_state", "The host's RabbitMQ link: 1 for its state", labels=[*names, "state"]
    )
    for s in LINK_STATES:
        state.add_metric([*base, s], 1.0 if b.get("link") == s else 0.0)
    yield state
    yield gauge(
        "link_up", "1 if the host's RabbitMQ link is up", 1.0 if b.get("link") == "up" else 0.0
    )
    for key, v in sorted(b.items()):
        if isinstance(v, bool) or not isinstance(v, int | float) or key == "last_sync":
            continue
        if key in BROKER_COUNTERS:
            yield counter(f"broker_{key}", f"RabbitMQ link: {key}", int(v))
        else:
            yield gauge(f"broker_{key}", f"RabbitMQ link: {key}", float(v))
    if b.get("last_sync"):
        yield gauge(
            "broker_last_sync_timestamp_seconds",
            "When the last binding sync completed",
            b["last_sync"],
        )


def metrics_view(request: Any, alias: str = "default") -> Any:
    """A Django view serving the layer's metrics in the Prometheus text format."""
    from django.http import HttpResponse
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(LayerCollector(alias=alias))
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
