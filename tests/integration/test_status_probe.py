"""``python -m hybrid_layer status`` as a container probe: exit 0 when the host is
healthy, 4 (with the reasons) when it has no live leader or its RabbitMQ link is not up."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from tests.remote import Remote, wait_until


def status(prefix: str, host_id: str, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "hybrid_layer", "status", "--prefix", prefix]
    return subprocess.run(
        [*cmd, "--host-id", host_id, *extra], capture_output=True, text=True, timeout=30
    )


def test_a_healthy_single_host_exits_0(layer_config: dict[str, Any]) -> None:
    (r,) = [Remote(layer_config)]
    try:
        r.call("new_channel")
        assert wait_until(lambda: status(layer_config["prefix"], "testhost").returncode == 0, 5)
        out = status(layer_config["prefix"], "testhost")
        assert "health: ok" in out.stdout, out.stdout
        info = json.loads(status(layer_config["prefix"], "testhost", "--json").stdout)
        assert info["problems"] == []
        # told it should be in broker mode, a host without any link is unhealthy
        broker = status(layer_config["prefix"], "testhost", "--broker")
        assert broker.returncode == 4 and "no RabbitMQ link" in broker.stdout, broker.stdout
    finally:
        r.close()
    # nothing attached (the layer attaches on first use): not a failure of the probe
    assert status(layer_config["prefix"], "testhost").returncode == 0


def test_a_dead_leader_not_yet_replaced_is_unhealthy(layer_config: dict[str, Any]) -> None:
    (r,) = [Remote(layer_config)]
    r.call("new_channel")
    r.kill()  # the only process: nobody takes over; its names stay until the next start
    try:
        out = status(layer_config["prefix"], "testhost")
        assert out.returncode == 4, out.stdout
        assert "UNHEALTHY" in out.stdout and "leader" in out.stdout, out.stdout
    finally:
        (again,) = [Remote(layer_config)]  # the next start finds the set stale...
        again.call("new_channel")
        again.close()  # ...and, last out, removes every name


def test_a_link_that_cannot_connect_is_unhealthy_with_its_reason(
    layer_config: dict[str, Any],
) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = {**layer_config, "host": f"amqp://guest:guest@127.0.0.1:{port}/"}
    (r,) = [Remote(cfg)]
    try:
        r.call("new_channel")
        assert wait_until(
            lambda: "unreachable" in status(layer_config["prefix"], "testhost").stdout, 10
        )
        out = status(layer_config["prefix"], "testhost")
        assert out.returncode == 4, out.stdout
        assert "the RabbitMQ link is" in out.stdout and "broker unreachable" in out.stdout
    finally:
        r.close()
