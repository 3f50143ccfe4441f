"""A live namespace is judged live by its shared memory, never zeroed under its workers
(issue 12 point 3): the lock file that used to carry the locks could be deleted by a
/dev/shm cleaner or missed by a process with another ``shm_dir``."""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
import tempfile
from typing import Any

import posix_ipc
import pytest

from hybrid_layer import HybridChannelLayer
from hybrid_layer.errors import NamespaceMismatch
from hybrid_layer.shm import layout as L
from hybrid_layer.shm.registry import proc_start
from tests.remote import Remote

pytestmark = pytest.mark.slow


def _exchange(a: Remote, b: Remote, tag: str) -> None:
    ch = b.call("new_channel")
    a.call("send", ch, {"type": tag})
    assert b.call("receive", ch, 5) == {"type": tag}


async def test_lock_file_deleted_under_live_workers_does_not_zero_them(
    remotes: Any, layer_config: dict[str, Any]
) -> None:
    a, b = remotes(2)
    ns = f"hl.{layer_config['prefix']}.{layer_config['host_id']}"
    gens = {a.call("internals")["gen"], b.call("internals")["gen"]}
    # what a /dev/shm cleaner (or logind's RemoveIPC for plain files) did to the old
    # design: the lock file in shm_dir disappears under live workers
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/shm/{ns}.lock")
    c = remotes(1)[0]  # a new process joins: it must see the namespace live
    assert c.call("internals")["slot"] not in {
        a.call("internals")["slot"],
        b.call("internals")["slot"],
    }
    assert {a.call("internals")["gen"], b.call("internals")["gen"]} == gens
    for x, y in ((a, b), (b, a), (c, a), (a, c), (c, b), (b, c)):
        _exchange(x, y, "after-delete")
    c.call("group_add", "room", cc := c.call("new_channel"))
    a.call("group_send", "room", {"type": "g"})
    assert c.call("receive", cc, 5) == {"type": "g"}
    # and an in-process layer too
    lay = HybridChannelLayer(**layer_config)
    try:
        ch = await lay.new_channel()
        a.call("send", ch, {"type": "to-local"})
        assert await lay.receive(ch) == {"type": "to-local"}
    finally:
        await lay.close()


def test_other_shm_dir_is_refused_clearly_and_never_zeroes(
    remotes: Any, layer_config: dict[str, Any]
) -> None:
    a, b = remotes(2)
    a.call("internals"), b.call("internals")  # (a layer attaches at first use)
    with tempfile.TemporaryDirectory() as other:
        os.chmod(other, 0o700)
        with pytest.raises(NamespaceMismatch, match=r"shm_dir.*'/dev/shm'.*" + other):
            HybridChannelLayer(**layer_config, shm_dir=other)._p()
        assert os.listdir(other) == []
    _exchange(a, b, "still-live")
    _exchange(b, a, "still-live")


def _fake_registry(name: str, pid: int, pstart: int) -> None:
    """A registry as an older version (locks elsewhere) leaves it: slot 0 LIVE for
    ``pid``, no lock held on the registry's file."""
    from hybrid_layer.config import parse_config

    cfg = parse_config({"prefix": "x"})
    lay = L.SlotLayout.for_sizes(cfg.ring_bytes, cfg.channel_buckets, cfg.max_groups_per_process)
    size = L.registry_size(cfg.max_participants)
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
    try:
        buf = bytearray(size)
        L.REG_HEADER.pack_into(
            buf,
            0,
            L.MAGIC,
            4,
            lay.ring_bytes,
            cfg.max_participants,
            lay.channel_buckets,
            lay.group_slots,
            -1,
            0,
            0,
            0,
            0,
            0,
            0.0,
        )
        off = L.reg_slot_offset(0)
        L.REG_SLOT.pack_into(buf, off, L.SLOT_LIVE, 7, pid, 0.0)
        struct.pack_into("<Q", buf, off + L.REG_PSTART_OFFSET, pstart)
        os.pwrite(shm.fd, bytes(buf), 0)
    finally:
        shm.close_fd()


def test_registry_listing_a_live_process_without_locks_is_never_zeroed(
    layer_config: dict[str, Any],
) -> None:
    ns = f"hl.{layer_config['prefix']}.{layer_config['host_id']}"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _fake_registry(f"/{ns}.reg", sleeper.pid, proc_start(sleeper.pid))
        with pytest.raises(NamespaceMismatch, match=rf"live process\(es\) \[{sleeper.pid}\]"):
            HybridChannelLayer(**layer_config)._p()
        with open(f"/dev/shm/{ns}.reg", "rb") as f:
            assert L.REG_SLOT.unpack_from(f.read(), L.reg_slot_offset(0))[2] == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()
        posix_ipc.unlink_shared_memory(f"/{ns}.reg")


async def test_registry_listing_a_reused_pid_is_a_stale_set(layer_config: dict[str, Any]) -> None:
    ns = f"hl.{layer_config['prefix']}.{layer_config['host_id']}"
    # our own parent's pid, but with another start time: a recycled pid, not the owner
    _fake_registry(f"/{ns}.reg", os.getppid(), proc_start(os.getppid()) + 12345)
    lay = HybridChannelLayer(**layer_config)
    ch = await lay.new_channel()
    await lay.send(ch, {"type": "ok"})
    assert await lay.receive(ch) == {"type": "ok"}
    await lay.close()
