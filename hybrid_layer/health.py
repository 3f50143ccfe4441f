"""Is this host's layer healthy? One call for a Django view or a container probe.

::

    from hybrid_layer.health import check
    h = check()            # the "default" alias of CHANNEL_LAYERS, or check(layer)
    if not h.ok: print(h.problems)

Healthy means: this process is attached to its host's namespace, which has a live
leader; in broker mode the host's link is up and the cross-host messages kept for it
stay below 80 % of ``outbound_limit``. Drops since the previous check (by this
process; the host's counters are mirrored about once a second) are reported in
``warnings``, not made a failure: a full channel is the application's business, and
a probe must not restart a container for it.
``python -m hybrid_layer status`` exits 4 when unhealthy, so it can be a probe too.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

_last_dropped: dict[int, dict[str, int]] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class Health:
    ok: bool
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: what was looked at: participants, leader_pid, link, reason, dropped (since the
    #: previous check), outbound
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": list(self.problems),
            "warnings": list(self.warnings),
            **self.details,
        }


def _layer(alias: str) -> Any:
    from channels.layers import get_channel_layer

    layer = get_channel_layer(alias)
    if layer is None:
        raise LookupError(f"no channel layer {alias!r} in CHANNEL_LAYERS")
    return layer


def check(layer: Any = None, alias: str = "default") -> Health:
    """The health of ``layer`` (default: ``CHANNEL_LAYERS[alias]``) and its host."""
    from .layer import HybridChannelLayer

    if layer is None:
        layer = _layer(alias)
    if not isinstance(layer, HybridChannelLayer):
        return Health(False, [f"channel layer {alias!r} is not a HybridChannelLayer"])
    problems: list[str] = []
    warnings: list[str] = []
    try:
        g = layer.global_statistics()
        deadline = time.monotonic() + 1.0
        while g.leader_pid <= 0 and time.monotonic() < deadline:  # (an election under way)
            time.sleep(0.02)
            g = layer.global_statistics()
    except Exception as exc:  # cannot attach: that is the answer
        return Health(False, [f"cannot attach to the host namespace: {exc}"])
    details: dict[str, Any] = {
        "participants": g.participants,
        "leader_pid": g.leader_pid,
        "pid": os.getpid(),
    }
    if g.leader_pid <= 0:
        problems.append("the host namespace has no leader")
    else:
        try:
            os.kill(g.leader_pid, 0)
        except ProcessLookupError:
            problems.append(f"the leader (pid {g.leader_pid}) is gone and not yet replaced")
        except PermissionError:
            pass
    with _lock:
        before = _last_dropped.get(id(layer), {})
        _last_dropped[id(layer)] = dict(g.dropped)
    grew = {k: v - before.get(k, 0) for k, v in g.dropped.items() if v > before.get(k, 0)}
    grew.pop("flushed", None)  # (a flush is asked for)
    details["dropped"] = grew if before else {}
    if before and grew:
        warnings.append(
            "messages dropped since the last check: "
            + ", ".join(f"{k} {v}" for k, v in sorted(grew.items()))
        )
    b = g.broker
    if b:
        details["link"] = b.get("link", "none")
        details["reason"] = b.get("reason", "")
        if b.get("link") != "up":
            why = b.get("reason") or "not connected yet"
            problems.append(f"the RabbitMQ link is {b.get('link', 'none')}: {why}")
        outbound = b.get("outbound")
        if isinstance(outbound, int):
            details["outbound"] = outbound
            limit = layer.config.outbound_limit
            if outbound >= 0.8 * limit:
                problems.append(
                    f"{outbound} cross-host messages kept for the link (outbound_limit {limit})"
                )
    return Health(not problems, problems, warnings, details)


def health_view(request: Any, alias: str = "default") -> Any:
    """A Django view: 200 and JSON when healthy, 503 and the problems when not::

    path("healthz", hybrid_layer.health.health_view)
    """
    from django.http import JsonResponse

    h = check(alias=alias)
    return JsonResponse(h.as_dict(), status=200 if h.ok else 503)
