"""Django system checks (``manage.py check``, and at every ``runserver``/``migrate``) for
the ``CHANNEL_LAYERS`` entries that use this backend. Enabled by adding
``"hybrid_layer"`` to ``INSTALLED_APPS``.

* ``hybrid_layer.E001``: the CONFIG does not parse (a bad key or value: the same
  ``ValueError`` the layer would raise at its first use).
* ``hybrid_layer.E002``: ``shm_dir`` is missing, not a directory, or unsafe (other users
  may write into it without the sticky bit, or it is owned by another user).
* ``hybrid_layer.W001``: ``max_message_bytes``, set in the CONFIG, is larger than the
  ASGI server's WebSocket message limit (uvicorn's ``--ws-max-size``, 16 MiB by default;
  set ``HYBRID_LAYER_WS_MAX_SIZE`` in settings to yours): a message that big cannot go
  out to a client. Not for the default (100 MiB), which is there so that messages
  between workers (not only to clients) of any size work.
* ``hybrid_layer.W002``: ``ASGI_APPLICATION`` is not wrapped in
  ``hybrid_layer.asgi.close_layers_on_shutdown`` (as far as can be seen), so Uvicorn
  workers leave without closing the layer.
"""

from __future__ import annotations

from typing import Any

from .config import shm_dir_problem

BACKEND = "hybrid_layer.HybridChannelLayer"
UVICORN_WS_MAX_SIZE = 16 * 1024 * 1024


def check_layers(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    from django.conf import settings
    from django.core.checks import Error, Warning

    from .config import parse_config

    out: list[Any] = []
    layers = getattr(settings, "CHANNEL_LAYERS", {}) or {}
    ours = {a: e for a, e in layers.items() if isinstance(e, dict) and e.get("BACKEND") == BACKEND}
    ws_max = int(getattr(settings, "HYBRID_LAYER_WS_MAX_SIZE", UVICORN_WS_MAX_SIZE))
    for alias, entry in ours.items():
        where = f"CHANNEL_LAYERS[{alias!r}]"
        try:
            cfg = parse_config(entry.get("CONFIG") or {})
        except (TypeError, ValueError) as exc:
            out.append(Error(f"{where}: {exc}", id="hybrid_layer.E001"))
            continue
        problem = shm_dir_problem(cfg.shm_dir)
        if problem:
            out.append(Error(f"{where}: {problem}", id="hybrid_layer.E002"))
        if "max_message_bytes" in (entry.get("CONFIG") or {}) and cfg.max_message_bytes > ws_max:
            out.append(
                Warning(
                    f"{where}: max_message_bytes ({cfg.max_message_bytes}) is larger than "
                    f"the ASGI server's WebSocket message limit ({ws_max})",
                    hint="lower max_message_bytes, or set HYBRID_LAYER_WS_MAX_SIZE to the "
                    "server's limit (uvicorn --ws-max-size)",
                    id="hybrid_layer.W001",
                )
            )
    if ours:
        out.extend(_check_asgi_wrapper(settings))
    return out


def _check_asgi_wrapper(settings: Any) -> list[Any]:
    from django.core.checks import Warning
    from django.utils.module_loading import import_string

    from .asgi import closes_layers

    path = getattr(settings, "ASGI_APPLICATION", None)
    if not path:
        return []
    try:
        app = import_string(path)
    except Exception:  # (the ASGI module may need a server's environment to import)
        return []
    if closes_layers(app):
        return []
    return [
        Warning(
            f"ASGI_APPLICATION {path!r} is not wrapped in close_layers_on_shutdown: Uvicorn "
            "workers end without closing the layer (their slots are reclaimed like a "
            "crashed process's, and the last one cannot remove the host's names)",
            hint="application = close_layers_on_shutdown(ProtocolTypeRouter({...})) "
            "(from hybrid_layer.asgi import close_layers_on_shutdown)",
            id="hybrid_layer.W002",
        )
    ]
