"""SIGTERM (systemd's and docker's stop signal) closes the layer where that is safe.

Real separate processes: a runworker-like process (the layer created in its main thread,
channels' ``Worker`` - what ``manage.py runworker`` runs - receiving a normal channel)
is sent SIGTERM. It must leave the namespace (the last one out removes every name;
otherwise its slot is free at once, with nothing for the leader to reclaim) and still
die of SIGTERM. A process with a SIGTERM handler of its own keeps it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from hybrid_layer import HybridChannelLayer
from tests.conftest import _ours
from tests.remote import wait_until

WORKER = r"""
import json, os, signal, sys, threading
from channels.worker import Worker
from hybrid_layer import HybridChannelLayer

config, mode = json.loads(sys.argv[1]), sys.argv[2]
if mode == "own":
    def own(signum, frame):
        print("own handler ran", flush=True)
    signal.signal(signal.SIGTERM, own)
if mode == "thread":  # the layer created outside the main thread: no handler
    box = []
    t = threading.Thread(target=lambda: box.append(HybridChannelLayer(**config)))
    t.start(); t.join()
    print("disposition", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
    box[0].close_sync()
    sys.exit(0)
layer = HybridChannelLayer(**config)  # like channels' get_channel_layer() in runworker

async def app(scope, receive, send):
    while True:
        msg = await receive()
        print("got", msg["type"], flush=True)

worker = Worker(application=app, channels=["jobs"], channel_layer=layer)
layer._p()  # attached (runworker attaches on its first receive)
print("ready", os.getpid(), flush=True)
if mode == "own":
    import asyncio, time
    deadline = time.monotonic() + 30
    while not sys.stdin.readline().strip() == "check" and time.monotonic() < deadline:
        pass
    kept = signal.getsignal(signal.SIGTERM).__name__ == "own"
    print("kept", kept, flush=True)
    layer.close_sync()
    sys.exit(0)
worker.run()
"""


def start(config: dict[str, Any], mode: str = "worker") -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(config), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line.startswith("ready"):
        p.kill()
        raise AssertionError(f"worker did not start: {line!r} {p.stderr.read()}")  # type: ignore[union-attr]
    return p


def stop(p: subprocess.Popen[str]) -> None:
    if p.poll() is None:
        p.kill()
    p.communicate(timeout=10)


def test_sigterm_on_the_last_process_leaves_no_names(layer_config: dict[str, Any]) -> None:
    p = start(layer_config)
    try:
        assert _ours(layer_config["prefix"])  # the namespace exists
        os.kill(p.pid, signal.SIGTERM)
        p.wait(15)
        assert p.returncode == -signal.SIGTERM  # died of SIGTERM, as without a handler
        assert _ours(layer_config["prefix"]) == []
    finally:
        stop(p)


async def test_sigterm_frees_the_slot_at_once_when_others_remain(
    layer_config: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hybrid_layer")
    p = start(layer_config)  # first: it leads
    lay = HybridChannelLayer(**layer_config)
    try:
        await lay.send("jobs", {"type": "job"})
        assert p.stdout is not None and p.stdout.readline().strip() == "got job"
        assert lay.global_statistics().participants == 2
        os.kill(p.pid, signal.SIGTERM)
        p.wait(15)
        assert p.returncode == -signal.SIGTERM
        # nothing to reclaim: it left by itself (a SIGKILLed one stays until reclaimed)
        assert lay.global_statistics().participants == 1
        time.sleep(0.6)  # (we take over as leader and look for dead slots meanwhile)
        assert not [r for r in caplog.records if "reclaimed slot" in r.getMessage()]
        assert lay.global_statistics().dropped.get("dead_reader", 0) == 0
        await lay.send("jobs", {"type": "after"})  # parked with us, the new leader
        assert wait_until(lambda: lay.global_statistics().leader_pid == os.getpid(), 5)
    finally:
        stop(p)
        await lay.close()


def test_a_handler_of_the_process_is_kept(layer_config: dict[str, Any]) -> None:
    p = start(layer_config, "own")
    try:
        os.kill(p.pid, signal.SIGTERM)
        assert p.stdout is not None and p.stdout.readline().strip() == "own handler ran"
        assert p.stdin is not None
        p.stdin.write("check\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "kept True"
        p.wait(15)
        assert p.returncode == 0
        assert _ours(layer_config["prefix"]) == []
    finally:
        stop(p)


def test_no_handler_from_another_thread(layer_config: dict[str, Any]) -> None:
    p = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(layer_config), "thread"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert p.stdout.strip() == "disposition True", p


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/usr/bin/unshare"), reason="needs root and unshare"
)
def test_python_as_pid_1_still_exits(layer_config: dict[str, Any]) -> None:
    """In a container without --init, python is PID 1 and the kernel ignores a SIGTERM
    it has no handler for: after closing, the process exits with status 143."""
    p = subprocess.Popen(
        ["unshare", "--pid", "--fork", sys.executable, "-c", WORKER, json.dumps(layer_config), "x"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line.startswith("ready"):
            pytest.skip(f"no PID namespace here: {line!r} {p.stderr.read()}")  # type: ignore[union-attr]
        assert line.split() == ["ready", "1"]
        with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
            (child,) = (int(x) for x in f.read().split())
        os.kill(child, signal.SIGTERM)
        p.wait(15)
        assert p.returncode == 128 + signal.SIGTERM, p.stderr.read()  # type: ignore[union-attr]
        assert _ours(layer_config["prefix"]) == []
    finally:
        stop(p)


BUSY = r"""
import asyncio, json, os, sys
from hybrid_layer import HybridChannelLayer
from hybrid_layer.errors import ChannelFull

config = json.loads(sys.argv[1])
layer = HybridChannelLayer(**config)

async def main():
    me = await layer.new_channel()
    await layer.group_add("g", me)
    print("ready", os.getpid(), flush=True)
    i = 0
    while True:  # sends into its own inbox and takes them out: its ring locks all the time
        n = 0
        for _ in range(20):
            try:
                await layer.send(me, {"type": "x", "i": i, "b": b"y" * (i % 500)})
                n += 1
            except ChannelFull:
                pass
            await layer.group_send("g", {"type": "g"})
            i += 1
        while True:  # what is there (direct and group copies), then yield
            try:
                await asyncio.wait_for(layer.receive(me), 0.01)
            except asyncio.TimeoutError:
                break
        await asyncio.sleep(0)

asyncio.run(main())
"""


def test_sigterm_under_load_closes_at_once(layer_config: dict[str, Any]) -> None:
    """The signal arrives while the main thread is inside send()/receive(), maybe holding
    a lock the close needs: the close is run from the event loop's next callback, so the
    process leaves within moments (not after the 8 s bound), dies of SIGTERM, and its
    slot is free at once (nothing for the leader to reclaim)."""
    import random

    cfg = {**layer_config, "capacity": 1000}
    rnd = random.Random(12)
    keeper = subprocess.Popen(
        [sys.executable, "-c", BUSY, json.dumps(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert keeper.stdout is not None and keeper.stdout.readline().startswith("ready")
        for _ in range(6):
            p = subprocess.Popen(
                [sys.executable, "-c", BUSY, json.dumps(cfg)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": os.getcwd()},
            )
            assert p.stdout is not None and p.stdout.readline().startswith("ready")
            time.sleep(rnd.uniform(0.05, 0.5))
            t0 = time.monotonic()
            os.kill(p.pid, signal.SIGTERM)
            _, err = p.communicate(timeout=15)
            took = time.monotonic() - t0
            assert p.returncode == -signal.SIGTERM, err
            assert took < 3.0, (took, err)
            assert "did not close" not in err and "exiting without" not in err, err
    finally:
        keeper.send_signal(signal.SIGTERM)
        keeper.communicate(timeout=15)
    assert keeper.returncode == -signal.SIGTERM
    assert _ours(layer_config["prefix"]) == []  # the last one out removed every name
