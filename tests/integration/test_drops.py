"""Drops are visible: each kind logged (rate-limited, with summaries flushed on a timer),
``global_statistics().pending`` real, ``status`` showing every counter and whose
registry it reads, and a usage error for a bad ``--prefix``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hybrid_layer import HybridChannelLayer
from hybrid_layer._log import limited
from hybrid_layer.shm import layout as L
from hybrid_layer.stats import DROP_REASONS
from tests.remote import Remote, wait_until


@pytest.fixture
def short_interval(monkeypatch: pytest.MonkeyPatch) -> Iterator[float]:
    """The drop logger with a 1 s interval and no memory of other tests' sites."""
    limited.reset()
    monkeypatch.setattr(limited, "interval", 1.0)
    yield 1.0
    limited.reset()


def drop_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def test_a_group_copy_storm_logs_at_once_then_the_exact_count_without_a_new_drop(
    layer_config: dict[str, Any], caplog: pytest.LogCaptureFixture, short_interval: float
) -> None:
    caplog.set_level(logging.INFO, logger="hybrid_layer")
    lay = HybridChannelLayer(**{**layer_config, "capacity": 1})
    try:
        ch = await lay.new_channel()
        await lay.group_add("room", ch)
        await lay.send(ch, {"type": "fill"})  # the member's channel is now full
        for i in range(474):
            await lay.group_send("room", {"type": "m", "i": i})
        lay._p().drain(None)  # (the host thread would within a second) fans them out
        t0 = time.monotonic()
        assert lay.statistics().dropped["full"] == 474
        lines = drop_lines(caplog, "dropped: channel full")
        assert len(lines) == 1, lines  # one line at once, the rest counted
        # no further drop: the host thread's tick writes the summary within the interval
        assert wait_until(lambda: drop_lines(caplog, "more full drops"), short_interval + 1.0)
        assert time.monotonic() - t0 < short_interval + 1.0
        (summary,) = drop_lines(caplog, "more full drops")
        assert summary.startswith("hybrid_layer: 473 more full drops in the last "), summary
    finally:
        await lay.close()


async def test_expired_messages_are_logged(
    layer_config: dict[str, Any], caplog: pytest.LogCaptureFixture, short_interval: float
) -> None:
    caplog.set_level(logging.WARNING, logger="hybrid_layer")
    lay = HybridChannelLayer(**{**layer_config, "expiry": 0.05})
    try:
        ch = await lay.new_channel()
        for i in range(3):
            await lay.send(ch, {"type": "old", "i": i})
        await asyncio.sleep(0.1)
        await lay.send(ch, {"type": "new"})
        assert await lay.receive(ch) == {"type": "new"}
        assert lay.statistics().dropped["expired"] == 3
        lines = drop_lines(caplog, "expired unread")
        assert lines and ch in lines[0] and "expiry 0.05 s" in lines[0], lines
        assert wait_until(lambda: drop_lines(caplog, "2 more expired drops"), 3)
    finally:
        await lay.close()


async def test_close_writes_what_was_suppressed(
    layer_config: dict[str, Any], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    limited.reset()
    monkeypatch.setattr(limited, "interval", 600.0)  # the timer would not fire in time
    caplog.set_level(logging.WARNING, logger="hybrid_layer")
    lay = HybridChannelLayer(**layer_config)
    try:
        for _ in range(5):
            await lay.send("specific.testhost.0.1!nobody", {"type": "x"})  # (no such reader)
    finally:
        await lay.close()
    limited.reset()
    assert lay is not None
    assert drop_lines(caplog, "4 more no channel drops"), caplog.text


async def test_global_pending_counts_what_waits_on_the_host(
    layer: HybridChannelLayer, remotes: Callable[..., list[Remote]]
) -> None:
    (r,) = remotes(1)
    theirs = r.call("new_channel", "specific.")
    mine = await layer.new_channel()
    assert layer.global_statistics().pending == 0
    for i in range(3):
        await layer.send(theirs, {"type": "t", "i": i})
    await layer.send(mine, {"type": "m"})
    await layer.send("jobs", {"type": "parked"})  # a normal channel nobody reads yet
    g = layer.global_statistics()
    assert g.pending == 5, g
    assert layer.statistics().pending >= 1
    assert r.call("receive", theirs, 5) == {"type": "t", "i": 0}
    assert await layer.receive(mine) == {"type": "m"}
    assert layer.global_statistics().pending == 3


AS_USER = (
    "import os, sys, shutil, json, gettext, locale, textwrap, re\n"
    "from hybrid_layer.__main__ import main\n"  # (imported as root: the venv may be private)
    "os.setgroups([]); os.setgid(int(sys.argv[1])); os.setuid(int(sys.argv[1]))\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


def run_status(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    cmd = ["-m", "hybrid_layer"] if user is None else ["-c", AS_USER, str(user)]
    return subprocess.run(
        [sys.executable, *cmd, "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )


async def test_status_shows_every_counter(layer_config: dict[str, Any]) -> None:
    lay = HybridChannelLayer(**{**layer_config, "capacity": 1})
    try:
        ch = await lay.new_channel()
        await lay.group_add("g", ch)
        await lay.send(ch, {"type": "a"})
        await lay.group_send("g", {"type": "b"})  # a group send, its copy dropped: full
        p = lay._p()
        p.drain(None)  # the fan-out (the host thread's, at any moment): the copy is dropped
        p.ns.publish_stats(p.counters.values())
        args = ("--prefix", layer_config["prefix"], "--host-id", "testhost")
        out = run_status(*args)
        js = run_status(*args, "--json")
    finally:
        await lay.close()
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"owner uid {os.geteuid()}" in text
    assert "messages: sent 1, received 0, group_sends 1, group_copies 0" in text
    assert "raised: full 0, too_large 0" in text
    for reason in DROP_REASONS:
        want = 1 if reason == "full" else 0
        assert re.search(rf"dropped:.*\b{reason} {want}\b", text), (reason, text)
    for k in L.STATS_FIELDS:
        if k.startswith("broker_"):
            assert re.search(rf"broker:.*\b{k[7:]} 0\b", text), (k, text)
    assert "host: pending 1" in text and "pending 1" in text.splitlines()[-3], text
    info = json.loads(js.stdout)
    assert set(info["totals"]) == set(L.STATS_FIELDS)
    assert info["totals"]["group_sends"] == 1 and info["pending"] == 1
    assert info["yours"] is True and info["participants"][0]["pending"] == 1


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--prefix", "bad/prefix"], "argument --prefix: 'bad/prefix'"),
        (["--prefix", ""], "argument --prefix: ''"),
        (["--host-id", "a b"], "argument --host-id: 'a b'"),
    ],
)
def test_status_bad_arguments_are_a_usage_error(args: list[str], named: str) -> None:
    p = run_status(*args)
    assert p.returncode == 2, p
    assert named in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert "usage:" in p.stderr


def test_status_without_a_namespace(ns_prefix: str) -> None:
    p = run_status("--prefix", ns_prefix)
    assert p.returncode == 0 and "no shared memory" in p.stdout, p


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, run as nobody)")


@needs_root
async def test_status_says_when_the_registry_is_another_users(
    layer_config: dict[str, Any],
) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody").pw_uid
    lay = HybridChannelLayer(**layer_config)
    reg = f"/dev/shm/hl.{layer_config['prefix']}.testhost.reg"
    args = ("--prefix", layer_config["prefix"], "--host-id", "testhost")
    try:
        await lay.new_channel()
        # as nobody: root's 0600 registry cannot be read; it says whose it is
        denied = run_status(*args, user=nobody)
        os.chown(reg, nobody, -1)  # as root: readable, but not ours
        try:
            other = run_status(*args)
            other_js = run_status(*args, "--json")
        finally:
            os.chown(reg, 0, -1)
    finally:
        await lay.close()
    assert denied.returncode == 3, denied
    assert "permission denied" in denied.stdout and "uid 0 (root)" in denied.stdout, denied
    assert other.returncode == 3, other
    assert other.stdout.startswith(f"NOTE: hl.{layer_config['prefix']}.testhost belongs to ")
    assert f"uid {nobody} (nobody), not to you (uid 0, root)" in other.stdout, other.stdout
    assert "participant(s)" in other.stdout  # still shown
    info = json.loads(other_js.stdout)
    assert info["yours"] is False and info["owner_uid"] == nobody and info["owner"] == "nobody"
