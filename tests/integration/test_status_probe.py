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
    leader, other = Remote(layer_config), Remote(layer_config)
    try:
        leader.call("new_channel")
        other.call("new_channel")
        assert leader.call("internals")["is_leader"]
        other.kill()
        leader.kill()
        # both gone: a stale set, not a failure (the next process re-initialises it)
        out = status(layer_config["prefix"], "testhost")
        assert out.returncode == 0 and "no live process" in out.stdout, out.stdout
    finally:
        (again,) = [Remote(layer_config)]  # the next start finds the set stale...
        again.call("new_channel")
        again.close()  # ...and, last out, removes every name


def test_a_leader_gone_while_others_live_is_unhealthy_until_replaced(
    layer_config: dict[str, Any],
) -> None:
    import os
    import signal

    leader, other = Remote(layer_config), Remote(layer_config)
    try:
        leader.call("new_channel")
        other.call("new_channel")
        assert leader.call("internals")["is_leader"]
        os.kill(other.pid, signal.SIGSTOP)  # alive, but cannot take the lease
        leader.kill()
        out = status(layer_config["prefix"], "testhost")
        assert out.returncode == 4, out.stdout
        assert "UNHEALTHY" in out.stdout and "leader" in out.stdout, out.stdout
        assert status(layer_config["prefix"], "testhost", "--liveness").returncode == 4
        os.kill(other.pid, signal.SIGCONT)  # it takes over: healthy again
        assert wait_until(lambda: status(layer_config["prefix"], "testhost").returncode == 0, 5)
    finally:
        os.kill(other.pid, signal.SIGCONT)
        other.close()


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
        # a liveness probe does not restart a container for a broker outage
        assert status(layer_config["prefix"], "testhost", "--liveness").returncode == 0
    finally:
        r.close()
