"""receive_spin_us: the adaptive rule that stops spinning when it does not pay."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from hybrid_layer import HybridChannelLayer
from hybrid_layer.layer import SPIN_BACKOFF, SPIN_MISSES_MAX


async def test_fruitless_spins_back_off(ns_prefix: str) -> None:
    layer = HybridChannelLayer(prefix=ns_prefix, receive_spin_us=200)
    try:
        ch = await layer.new_channel()
        for _ in range(SPIN_MISSES_MAX):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(layer.receive(ch), 0.01)
        assert layer._spin_skip == SPIN_BACKOFF  # the next receives sleep at once
        await layer.send(ch, {"type": "m"})
        assert await layer.receive(ch) == {"type": "m"}
    finally:
        await layer.close()


async def test_a_message_that_arrives_during_the_spin_needs_no_doorbell(ns_prefix: str) -> None:
    layer = HybridChannelLayer(prefix=ns_prefix, receive_spin_us=10_000)
    try:
        ch = await layer.new_channel()
        loop = asyncio.get_running_loop()
        other = asyncio.new_event_loop()

        def send_soon() -> None:
            time.sleep(0.002)  # while the receive below spins (it holds the loop 10 ms)
            other.run_until_complete(layer.send(ch, {"type": "late"}))

        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0001)  # the spinning thread hands over the GIL quickly
        try:
            fut = loop.run_in_executor(None, send_soon)
            got = await asyncio.wait_for(layer.receive(ch), 5)
            await fut
        finally:
            sys.setswitchinterval(old_interval)
            other.close()
        assert got == {"type": "late"}
        # it never slept: no waiter was registered, no loop watches the doorbell yet
        assert len(layer._p().loop_regs) == 0
        assert layer._spin_misses == 0
        # without the spin, the same thing sleeps on the doorbell
        plain = HybridChannelLayer(prefix=ns_prefix)
        try:
            ch2 = await plain.new_channel()
            fut = loop.run_in_executor(None, lambda: asyncio.run(plain.send(ch2, {"type": "x"})))
            assert await asyncio.wait_for(plain.receive(ch2), 5) == {"type": "x"}
            await fut
        finally:
            await plain.close()
    finally:
        await layer.close()
