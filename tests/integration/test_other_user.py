"""Another local Unix user against a site: squatted names, planted symlinks, injection.

The hostile side really runs as a second user (``hl-test-other``, created with
``useradd`` when missing and kept: the name is fixed, so reruns reuse it), through
``setpriv`` and a few lines of stdlib Python (``-I``: it needs neither this code nor
the venv). The site is this test process, running as root like CI. Skipped, saying so,
when not root.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hybrid_layer import HybridChannelLayer, NamespaceTaken
from hybrid_layer._log import limited
from hybrid_layer.shm.doorbell import BellPush

pytestmark = pytest.mark.slow

OTHER = "hl-test-other"
SHM = "/dev/shm"


class Other:
    """Runs small stdlib-only Python snippets as the second user."""

    def __init__(self, name: str, uid: int, gid: int, python: str) -> None:
        self.name, self.uid, self.gid, self.python = name, uid, gid, python

    def argv(self, code: str, *args: str) -> list[str]:
        ids = [f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups"]
        return ["setpriv", *ids, "--", self.python, "-I", "-c", code, *args]

    def run(self, code: str, *args: str) -> str:
        r = subprocess.run(
            self.argv(code, *args),
            capture_output=True,
            text=True,
            timeout=30,
            cwd="/",
            env={"PATH": "/usr/bin:/bin"},
        )
        assert r.returncode == 0, (r.stdout, r.stderr)
        return r.stdout


@pytest.fixture(scope="module")
def other() -> Other:
    if os.geteuid() != 0:
        pytest.skip("runs as a second Unix user: needs root (to useradd and setpriv); CI is root")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    try:
        pw = pwd.getpwnam(OTHER)
    except KeyError:
        r = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER],
            capture_output=True,
            text=True,
        )
        if r.returncode not in (0, 9):  # 9: created meanwhile
            pytest.fail(f"useradd {OTHER} failed: {r.stderr}")
        pw = pwd.getpwnam(OTHER)
    # an interpreter the second user may run (a venv under /root may not be readable)
    for exe in (os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"):
        o = Other(OTHER, pw.pw_uid, pw.pw_gid, exe)
        if os.path.exists(exe) and subprocess.run(o.argv("pass"), cwd="/").returncode == 0:
            return o
    pytest.fail(f"no Python interpreter that {OTHER} can run")


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file of the site's user that a planted symlink points to."""
    v = tmp_path / "victim"
    v.write_bytes(b"precious\n")
    return v


@pytest.fixture
def planted() -> Iterator[list[str]]:
    """Paths the second user planted; removed (as root) after the test."""
    paths: list[str] = []
    yield paths
    for p in paths:
        if os.path.lexists(p):
            os.unlink(p)


# what the second user plants: a regular file, a symlink, a FIFO (mode 0666 each)
PLANT = """
import os, sys
kind, path, target = sys.argv[1:]
if kind == "file":
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    os.chmod(path, 0o666)
elif kind == "symlink":
    os.symlink(target, path)
else:
    os.mkfifo(path, 0o666)
    os.chmod(path, 0o666)
"""


def names(cfg: dict[str, Any]) -> dict[str, str]:
    ns = f"{SHM}/hl.{cfg['prefix']}.{cfg['host_id']}"
    return {
        "registry": f"{ns}.reg",
        "slot segment": f"{ns}.s0",
        "doorbell": f"{ns}.bell0",
        "rescue doorbell": f"{ns}.rescue0",
    }


@pytest.mark.parametrize(
    ("which", "kind"),
    [
        ("registry", "file"),
        ("registry", "symlink"),
        ("doorbell", "symlink"),
        ("doorbell", "fifo"),
        ("rescue doorbell", "file"),
    ],
)
async def test_a_squatted_name_is_refused_naming_it_and_its_owner(
    other: Other,
    layer_config: dict[str, Any],
    victim: Path,
    planted: list[str],
    which: str,
    kind: str,
) -> None:
    path = names(layer_config)[which]
    other.run(PLANT, kind, path, str(victim))
    planted.append(path)
    lay = HybridChannelLayer(**layer_config)
    try:
        with pytest.raises(NamespaceTaken) as info:
            await lay.new_channel()  # the first use attaches
        text = str(info.value)
        assert path in text and f"({OTHER})" in text, text  # the object and its owner
        assert "CONFIG['prefix']" in text and "rm -f" in text, text  # what to do
        assert victim.read_bytes() == b"precious\n"  # nothing written through a symlink
        # once the name is removed, the same layer attaches and works
        os.unlink(path)
        ch = await lay.new_channel()
        await lay.send(ch, {"type": "x"})
        assert (await lay.receive(ch))["type"] == "x"
    finally:
        await lay.close()


async def test_a_bell_replaced_by_a_symlink_is_never_written_and_nothing_is_lost(
    other: Other,
    layer_config: dict[str, Any],
    victim: Path,
    planted: list[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A live receiver's bell replaced by a symlink (what a shared-writable, non-sticky
    shm_dir would allow; the layer now refuses such a directory, so the test removes
    the FIFO as root and lets the second user plant the link in the sticky /dev/shm)."""
    limited.reset()  # an earlier test's refusal may rate-limit
    sender = HybridChannelLayer(**layer_config)
    receiver = HybridChannelLayer(**layer_config)
    try:
        await sender.new_channel()  # slot 0
        ch = await receiver.new_channel()  # slot 1
        bell = names(layer_config)["doorbell"].replace("bell0", "bell1")
        assert os.path.exists(bell)
        waiting = asyncio.ensure_future(receiver.receive(ch))
        await asyncio.sleep(0.2)  # asleep on its bell
        os.unlink(bell)
        other.run(PLANT, "symlink", bell, str(victim))
        planted.append(bell)
        with caplog.at_level(logging.WARNING, logger="hybrid_layer"):
            await sender.send(ch, {"type": "hello"})
            # woken through its other (rescue) bell by its host thread: not lost
            msg = await asyncio.wait_for(waiting, 5)
        assert msg["type"] == "hello"
        assert victim.read_bytes() == b"precious\n"
        assert sender.statistics().extra["doorbells_refused"] >= 1
        lines = [r.getMessage() for r in caplog.records if "doorbell" in r.getMessage()]
        assert any(bell in line and f"({OTHER})" in line for line in lines), lines
    finally:
        await sender.close()
        await receiver.close()


def test_a_sender_refuses_a_fifo_of_another_user(
    other: Other, ns_prefix: str, planted: list[str]
) -> None:
    """Even a FIFO that someone holds open for reading (here: the test, on the second
    user's behalf) gets nothing unless it belongs to this user."""
    path = f"{SHM}/hl.{ns_prefix}.testhost.bell3"
    other.run(PLANT, "fifo", path, "")
    planted.append(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        b = BellPush(path)
        assert b.ring() is False
        assert b.refused == 1
        try:
            data = os.read(fd, 16)  # b"": no writer (any more); never a byte
        except BlockingIOError:
            data = b""
        assert data == b""
        b.close()
    finally:
        os.close(fd)


async def test_a_squatted_slot_name_is_taken_back_by_the_first_process(
    other: Other, layer_config: dict[str, Any], planted: list[str]
) -> None:
    """The first process in removes every slot name before creating its own (a stale
    set may have another size); root may remove another user's, so a root site is
    unaffected. (A non-root site cannot: it logs the name and owner, and the process
    that claims that slot gets NamespaceTaken like the names above.)"""
    path = names(layer_config)["slot segment"]
    other.run(PLANT, "file", path, "")
    planted.append(path)
    lay = HybridChannelLayer(**layer_config)
    try:
        ch = await lay.new_channel()
        assert os.stat(path).st_uid == os.geteuid()  # ours now, not the squatter's
        await lay.send(ch, {"type": "x"})
        assert (await lay.receive(ch))["type"] == "x"
    finally:
        await lay.close()


INJECT = """
import os, sys
out = []
for path in sys.argv[1:]:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        out.append(exc.__class__.__name__)
    else:
        os.close(fd)
        out.append("opened")
print(" ".join(out))
"""


async def test_another_user_can_neither_open_nor_inject(
    other: Other, layer: HybridChannelLayer
) -> None:
    ch = await layer.new_channel()
    cfg = layer.config
    ns = f"{SHM}/{cfg.namespace}"
    # (the locks are byte-range locks on the registry's own file: no lock file any more)
    paths = [f"{ns}.reg", f"{ns}.s0", f"{ns}.bell0", f"{ns}.rescue0"]
    assert other.run(INJECT, *paths).split() == ["PermissionError"] * len(paths)
    await layer.send(ch, {"type": "still"})
    assert (await layer.receive(ch))["type"] == "still"
