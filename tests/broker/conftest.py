"""Broker tests: several simulated hosts (``host_id``) on one real RabbitMQ.

RabbitMQ must run at 127.0.0.1:5672 (guest/guest); without it these tests FAIL with a
message saying so - they never skip (``.ci/run`` starts or installs it). Each test has
its own ``prefix``, so its queues and bindings are its own; exclusive host queues go
with their connections and the normal-channel queues a test creates are deleted.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.remote import Remote

BROKER = os.environ.get("HYBRID_LAYER_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672/")
BROKER_ADDR = ("127.0.0.1", 5672)


def broker_reachable() -> bool:
    try:
        with socket.create_connection(BROKER_ADDR, timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def broker_url() -> str:
    if not broker_reachable():
        pytest.fail(
            "RabbitMQ is not reachable at 127.0.0.1:5672: the broker tests need it "
            "(start it with `rabbitmq-server -detached`; .ci/run starts or installs it)",
            pytrace=False,
        )
    return BROKER


@pytest.fixture
def broker_config(ns_prefix: str, broker_url: str) -> dict[str, Any]:
    # host queues outlive their connections (x-expires): short-lived in tests, and
    # deleted at the end of the session (``_delete_test_queues``)
    return {
        "prefix": ns_prefix,
        "expiry": 10,
        "host": broker_url,
        "heartbeat": 5,
        "host_queue_expires": 120,
    }


@pytest.fixture(scope="session", autouse=True)
def _delete_test_queues() -> Iterator[None]:
    """At the end: delete the queues this session's tests made (names of test
    prefixes, ``t`` and 12 hex digits), which outlive their connections by design."""
    yield
    if not broker_reachable():
        return
    try:
        rows = rabbitmqctl("list_queues", "name")
    except (OSError, subprocess.SubprocessError):
        return
    from tests.conftest import SESSION_PREFIXES

    # (a claim queue is exclusive: it goes with its connection); only this session's
    # prefixes: another test session on the same broker keeps its queues
    mine = [
        r[0]
        for r in rows
        if r and r[0].split(".", 1)[0] in SESSION_PREFIXES and not r[0].endswith(".claim")
    ]
    if mine:
        delete_queues(BROKER, mine)


HostsFactory = Callable[..., dict[str, list[Remote]]]


@pytest.fixture
def hosts(broker_config: dict[str, Any]) -> Iterator[HostsFactory]:
    """``hosts({"ha": 2, "hb": 2}, **overrides)``: participants per simulated host, each a
    separate process; returns once every host's link is up. All closed afterwards."""
    started: list[Remote] = []

    def start(layout: dict[str, int], **overrides: Any) -> dict[str, list[Remote]]:
        out: dict[str, list[Remote]] = {}
        for host_id, n in layout.items():
            cfg = {**broker_config, "host_id": host_id, **overrides}
            out[host_id] = [Remote(cfg) for _ in range(n)]
            started.extend(out[host_id])
        for rs in out.values():
            for r in rs:
                r.call("wait_link", 15.0, timeout=20)
        return out

    yield start
    for r in started:
        r.close()


def delete_queues(url: str, names: list[str]) -> None:
    """Remove broker queues a test created (normal-channel queues outlive connections)."""
    import aiormq

    async def run() -> None:
        conn = await aiormq.connect(url)
        try:
            ch = await conn.channel()
            for n in names:
                await ch.queue_delete(n)
        finally:
            await conn.close()

    asyncio.run(run())


def normal_queue_name(prefix: str, channel: str) -> str:
    from hybrid_layer.amqp.topology import normal_queue
    from hybrid_layer.shm.groupset import name_hash

    return normal_queue(prefix, name_hash("n", channel))


def rabbitmqctl(*args: str) -> list[list[str]]:
    """Rows of ``rabbitmqctl <args> -q`` (tab-separated), header row dropped."""
    out = subprocess.run(
        ["rabbitmqctl", *args, "-q", "--no-table-headers"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [line.split("\t") for line in out.splitlines() if line.strip()]


@pytest.fixture
def proxy() -> Iterator[Any]:
    """Request it before ``hosts``, so that it outlives the processes using it."""
    from tests.broker.proxy import Proxy

    px = Proxy()
    yield px
    px.close()


@pytest.fixture
def procs(broker_config: dict[str, Any]) -> Iterator[Any]:
    """Participants started without waiting for their link (``hosts`` waits)."""
    started: list[Remote] = []

    def start(host_id: str, n: int, **overrides: Any) -> list[Remote]:
        out = [Remote({**broker_config, "host_id": host_id, **overrides}) for _ in range(n)]
        started.extend(out)
        return out

    yield start
    for r in started:
        r.close()
