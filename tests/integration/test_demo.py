"""``python -m hybrid_layer.demo`` runs, passes its own checks and leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0  # the demo itself promises well under 30s


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_demo_runs_and_passes(ns_prefix: str) -> None:
    # its own prefix (the fixture then checks /dev/shm), so it never meets a demo run by hand
    cmd = [sys.executable, "-m", "hybrid_layer.demo", "--prefix", ns_prefix]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: anything left running is found
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"the demo did not finish within {TIMEOUT}s\n--- stdout ---\n{out}\n"
            f"--- stderr ---\n{err}"
        )
    elapsed = time.monotonic() - t0
    report = f"--- stdout ---\n{out}\n--- stderr ---\n{err}"
    deadline = time.monotonic() + 5
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _group_alive(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the demo left processes running (SIGKILLed them)\n{report}")
    assert proc.returncode == 0, f"the demo exited with {proc.returncode}\n{report}"
    assert "checks passed" in out and "FAILED" not in out, report
    assert "no names for this prefix" in out.rsplit("/dev/shm after:", 1)[-1], report
    assert elapsed < 30, f"the demo took {elapsed:.1f}s (promised: well under 30s)\n{report}"
