"""Shared fixtures: a private namespace per test, and a check that nothing leaks in /dev/shm."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.remote import Remote

SHM = "/dev/shm"


def _ours(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir(SHM) if f".{prefix}." in n)


SESSION_PREFIXES: set[str] = set()
"""Every prefix this session's tests used (broker cleanup deletes only their queues,
so two test sessions on one broker leave each other alone)."""


@pytest.fixture
def ns_prefix() -> Iterator[str]:
    """A unique CONFIG['prefix'] for this test; fails the test if names are left behind."""
    prefix = "t" + uuid.uuid4().hex[:12]
    SESSION_PREFIXES.add(prefix)
    yield prefix
    left = _ours(prefix)
    if left:
        # clean up so one failure does not cascade, then fail loudly
        import contextlib

        import posix_ipc

        for n in left:
            with contextlib.suppress(Exception):
                if ".s" in n.rsplit(".", 1)[-1][:2] or n.endswith(".reg"):
                    posix_ipc.unlink_shared_memory("/" + n)
                else:
                    os.unlink(os.path.join(SHM, n))
        pytest.fail(f"test left shared-memory names behind: {left}")


@pytest.fixture
def layer_config(ns_prefix: str) -> dict[str, Any]:
    return {"prefix": ns_prefix, "host_id": "testhost", "expiry": 10}


@pytest.fixture
async def layer(layer_config: dict[str, Any]) -> AsyncIterator[Any]:
    from hybrid_layer import HybridChannelLayer

    lay = HybridChannelLayer(**layer_config)
    yield lay
    await lay.close()


@pytest.fixture
def remotes(layer_config: dict[str, Any]) -> Iterator[Callable[..., list[Remote]]]:
    """Start participants in separate spawned processes; all closed after the test."""
    from tests.remote import Remote

    started: list[Remote] = []

    def start(n: int, **overrides: Any) -> list[Remote]:
        out = [Remote({**layer_config, **overrides}) for _ in range(n)]
        started.extend(out)
        return out

    yield start
    for r in started:
        r.close()
