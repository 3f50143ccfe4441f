"""The adapter that runs a peer's own test suite against hybrid_layer.

Imported by the ``conftest.py`` that ``run_peer_suites.py`` writes next to the peer's
test files. It swaps only the construction of the layer: every layer the peer's tests
build (their fixtures, their direct constructor calls, ``CHANNEL_LAYERS`` settings via
``get_channel_layer()``) becomes a :class:`PeerLayer`, a ``HybridChannelLayer`` in a
namespace of the current test (``prefix``), on one host (``host_id``), with a broker URL
in broker mode. Every layer a test built is closed after it, and the test fails if it
left shared-memory names behind.

Environment (set by the driver): ``HL_PEER_MODE`` (``single`` or ``broker``),
``HL_PEER_BROKER`` (the AMQP URL), ``HL_PEER_RUN`` (a run id: prefixes are
``p<run><n>``, and ``HL_PEER_PREFIXES`` names a file each prefix is appended to, so the
driver can delete the broker queues of exactly these prefixes).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from hybrid_layer import HybridChannelLayer

MODE = os.environ.get("HL_PEER_MODE", "single")
BROKER = os.environ.get("HL_PEER_BROKER", "amqp://guest:guest@127.0.0.1:5672/")
RUN = os.environ.get("HL_PEER_RUN", "x")
PREFIX_FILE = os.environ.get("HL_PEER_PREFIXES", "")
HOST_ID = "peerhost"
SHM = "/dev/shm"

#: construction arguments of a peer's layer that configure the peer's own transport
#: (Redis servers, Redis key prefix): not ours, dropped
PEER_ONLY_KWARGS = ("hosts", "prefix")

_counter = itertools.count()
_prefix = f"p{RUN}0"
#: every layer built in this run, held strongly: a layer a test drops without
#: ``close()`` must still be closed after it (a garbage-collected layer does not release
#: its namespace, issue 13 item 5), and a layer outlives its test when the peer caches it
#: (``get_channel_layer()`` keeps the settings' layer across tests) and attaches again
#: at its next use (README, *Delivery semantics*: "The layer object stays usable"),
#: so all are closed after each test, not only those the test built
_built: list[HybridChannelLayer] = []
#: ``--drop-check``: hold layers weakly, so a layer a test drops is not closed for it
_weak: weakref.WeakSet[HybridChannelLayer] = weakref.WeakSet()
DROP_CHECK = os.environ.get("HL_PEER_DROP_CHECK") == "1"


def _new_prefix() -> str:
    global _prefix
    _prefix = f"p{RUN}{next(_counter)}"
    if PREFIX_FILE:
        with open(PREFIX_FILE, "a") as f:
            f.write(_prefix + "\n")
    return _prefix


class PeerLayer(HybridChannelLayer):
    """A ``HybridChannelLayer`` built from a peer's constructor arguments.

    All layers built during one test share that test's namespace (as all
    ``RedisChannelLayer`` objects of a test share one Redis), so two of them see each
    other's messages, as in the peer's own runs.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for key in PEER_ONLY_KWARGS:
            kwargs.pop(key, None)
        cfg: dict[str, Any] = {"prefix": _prefix, "host_id": HOST_ID}
        if MODE == "broker":
            # host queues outlive their connections (x-expires): short-lived here, and
            # deleted by the driver at the end of the run
            cfg.update(host=BROKER, host_queue_expires=120)
        cfg.update(kwargs)
        super().__init__(*args, **cfg)
        (_weak.add if DROP_CHECK else _built.append)(self)

    async def close_pools(self) -> None:
        """channels_redis' ``close_pools()`` closes the Redis connection pools of the
        current event loop; the layer itself and its channels live on. This layer has no
        per-loop pools: nothing to do (the layer is closed after the test)."""


def _close_all() -> None:
    """Close every live layer (in a loop of its own: the test's is gone)."""
    for layer in [*_built, *_weak]:

        async def close(layer: HybridChannelLayer = layer) -> None:
            await layer.close()

        try:
            asyncio.run(close())
        except Exception:
            layer.close_sync()


def _left() -> list[str]:
    """Shared-memory names of any namespace of this run."""
    return sorted(n for n in os.listdir(SHM) if f".p{RUN}" in n)


@pytest.fixture(autouse=True)
def _hybrid_namespace() -> Iterator[None]:
    """A namespace per test; every layer built in it closed after it; no names left."""
    _new_prefix()
    yield
    _close_all()
    deadline = time.monotonic() + 2.0
    while (left := _left()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        for n in left:  # so one failure does not cascade into the next tests
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(SHM, n))
        pytest.fail(f"the layer left shared-memory names behind: {left}", pytrace=False)


# ---------------------------------------------------------------- public-API rewrites
# Checks a peer's test makes through the peer's private attributes, asked of
# hybrid_layer's public API instead (the driver substitutes these calls, see
# tests/PEER_SUITES.md).


def waiting_channels(layer: HybridChannelLayer, *names: str) -> set[str]:
    """InMemory's ``layer.channels`` (its dict of channels holding messages), asked
    through ``channel_statistics()``: those of ``names`` with messages waiting."""
    return {n for n in names if layer.channel_statistics(n).pending > 0}


async def group_is_empty(layer: HybridChannelLayer, group: str) -> bool:
    """InMemory's ``layer.groups == {}`` after the consumer left its groups, asked
    through ``statistics()``: this process is a member of no group any more, and a
    ``group_send`` to the group makes no copy."""
    before = layer.statistics()
    await layer.group_send(group, {"type": "peer.probe"})
    after = layer.statistics()
    return before.extra["groups"] == 0 and after.group_copies == before.group_copies
