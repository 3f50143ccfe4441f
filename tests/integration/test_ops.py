"""For operators: the health check, the Prometheus collector, the Django system checks.

Real layers on real shared memory (single host here; the broker side is in
tests/broker/test_ops_broker.py); the system checks run in a subprocess with Django
settings of their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from hybrid_layer import HybridChannelLayer
from hybrid_layer.health import check
from hybrid_layer.prometheus import LayerCollector
from tests.remote import wait_until


async def test_health_of_a_single_host(layer: HybridChannelLayer) -> None:
    await layer.new_channel()
    h = check(layer)
    assert h.ok, h
    assert h.problems == [] and h.details["participants"] == 1
    assert h.details["leader_pid"] == os.getpid()
    assert "link" not in h.details  # (no broker)


async def test_health_warns_of_drops_since_the_last_check(layer_config: dict[str, Any]) -> None:
    lay = HybridChannelLayer(**{**layer_config, "capacity": 1})
    try:
        ch = await lay.new_channel()
        await lay.group_add("g", ch)
        assert check(lay).warnings == []  # (the first check only takes note)
        await lay.send(ch, {"type": "a"})
        await lay.group_send("g", {"type": "b"})  # the copy finds the channel full
        # (the host's counters are mirrored about once a second)
        seen: list[Any] = []
        assert wait_until(lambda: bool(seen.append(check(lay)) or seen[-1].warnings), 3)
        h = seen[-1]
        assert h.ok, h  # a full channel is the application's business, not ill health
        assert h.warnings == ["messages dropped since the last check: full 1"], h
        assert check(lay).warnings == []
    finally:
        await lay.close()


async def test_health_of_something_else() -> None:
    h = check(object())
    assert not h.ok and "is not a HybridChannelLayer" in h.problems[0]


async def test_prometheus_exports_every_counter(layer_config: dict[str, Any]) -> None:
    lay = HybridChannelLayer(**{**layer_config, "capacity": 1})
    try:
        ch = await lay.new_channel()
        await lay.group_add("g", ch)
        await lay.send(ch, {"type": "a"})
        await lay.group_send("g", {"type": "b"})
        await lay.receive(ch)
        reg = CollectorRegistry()
        reg.register(LayerCollector(lay))
        text = generate_latest(reg).decode()
    finally:
        await lay.close()
    labels = f'host_id="testhost",prefix="{layer_config["prefix"]}"'
    assert f"hybrid_layer_sent_total{{{labels}}} 1.0" in text, text
    assert f"hybrid_layer_received_total{{{labels}}} 1.0" in text
    assert f"hybrid_layer_group_sends_total{{{labels}}} 1.0" in text
    assert f'hybrid_layer_dropped_total{{{labels},reason="full"}} 1.0' in text
    for reason in (
        "expired",
        "no_channel",
        "corrupt",
        "dead_reader",
        "link_down",
        "malformed",
        "unauthenticated",
    ):
        assert f'hybrid_layer_dropped_total{{{labels},reason="{reason}"}} 0.0' in text
    assert f'hybrid_layer_raised_total{{{labels},reason="full"}} 0.0' in text
    assert f"hybrid_layer_participants{{{labels}}} 1.0" in text
    assert f"hybrid_layer_pending{{{labels}}} 0.0" in text
    assert f"hybrid_layer_repaired_total{{{labels}}} 0.0" in text
    assert f"hybrid_layer_site_clash_total{{{labels}}} 0.0" in text
    assert "hybrid_layer_ring_size_bytes" in text and "hybrid_layer_link_up" not in text


CHECK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import django
    from django.conf import settings
    settings.configure(**json.loads(sys.argv[1]))
    django.setup()
    from django.core.checks import run_checks
    print(json.dumps([[m.id, m.msg] for m in run_checks()]))
    """
)


def run_checks(**settings: Any) -> list[list[str]]:
    base = {"INSTALLED_APPS": ["hybrid_layer"], "SECRET_KEY": "x"}
    p = subprocess.run(
        [sys.executable, "-c", CHECK_SCRIPT, json.dumps({**base, **settings})],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.getcwd(),
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def layers(**config: Any) -> dict[str, Any]:
    return {"default": {"BACKEND": "hybrid_layer.HybridChannelLayer", "CONFIG": config}}


def ids(found: list[list[str]]) -> list[str]:
    return [i for i, _ in found if i.startswith("hybrid_layer.")]


def test_system_check_passes_a_good_config() -> None:
    found = run_checks(
        CHANNEL_LAYERS=layers(prefix="mysite"), ASGI_APPLICATION="tests.apps.ops_asgi.wrapped"
    )
    assert ids(found) == [], found


def test_system_check_names_a_bad_key() -> None:
    found = run_checks(CHANNEL_LAYERS=layers(prefix="mysite", capcity=10))
    assert ids(found) == ["hybrid_layer.E001"], found
    assert "capcity" in found[0][1] and "CHANNEL_LAYERS['default']" in found[0][1]


@pytest.mark.parametrize("mode", [0o777, 0o1777])
def test_system_check_refuses_an_unsafe_shm_dir(mode: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, mode)
        found = run_checks(CHANNEL_LAYERS=layers(shm_dir=d))
    if mode & 0o1000:  # sticky: /dev/shm's own mode
        assert ids(found) == [], found
    else:
        assert ids(found) == ["hybrid_layer.E002"], found
        assert "without the sticky bit" in found[0][1]


def test_system_check_warns_of_messages_over_the_websocket_limit() -> None:
    found = run_checks(CHANNEL_LAYERS=layers(max_message_bytes=32 * 1024 * 1024))
    assert ids(found) == ["hybrid_layer.W001"], found
    found = run_checks(
        CHANNEL_LAYERS=layers(max_message_bytes=32 * 1024 * 1024),
        HYBRID_LAYER_WS_MAX_SIZE=64 * 1024 * 1024,
    )
    assert ids(found) == [], found


def test_system_check_warns_of_an_unwrapped_asgi_application() -> None:
    found = run_checks(CHANNEL_LAYERS=layers(), ASGI_APPLICATION="tests.apps.ops_asgi.bare")
    assert ids(found) == ["hybrid_layer.W002"], found
    assert "close_layers_on_shutdown" in found[0][1]
