"""The default host_id groups exactly the processes that share one /dev/shm.

Containers are made with unshare(1): a private IPC namespace and mount namespace with
its own tmpfs on /dev/shm (a container with its own /dev/shm), and a UTS namespace
with another hostname (a sidecar sharing the pod's /dev/shm). Needs root (CI is).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from hybrid_layer.config import default_host_id

pytestmark = pytest.mark.slow

needs_unshare = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) to make container-like namespaces (CI runs as root)",
)


def run_in(args: list[str], setup: str, code: str) -> str:
    script = textwrap.dedent(code)
    inner = f'{setup} && exec {sys.executable} -c "$0"'
    proc = subprocess.run(
        ["unshare", *args, "sh", "-c", inner, script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.getcwd(),
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


PRINT_ID = "from hybrid_layer.config import default_host_id; print(default_host_id())"
PRIVATE_SHM = (["--mount", "--ipc"], "mount -t tmpfs -o mode=1777 tmpfs /dev/shm")
OTHER_HOSTNAME = (["--uts"], "hostname sidecar-of-another-name")


@needs_unshare
def test_own_dev_shm_is_another_host_even_with_the_same_machine_id() -> None:
    here = default_host_id()
    one = run_in(*PRIVATE_SHM, PRINT_ID)
    two = run_in(*PRIVATE_SHM, PRINT_ID)
    assert len({here, one, two}) == 3, (here, one, two)


@needs_unshare
def test_a_sidecar_with_another_hostname_sharing_dev_shm_is_the_same_host(
    ns_prefix: str,
) -> None:
    import asyncio

    from hybrid_layer import HybridChannelLayer

    assert run_in(*OTHER_HOSTNAME, PRINT_ID) == default_host_id()
    # and it really joins this process's namespace: it sees two participants
    lay = HybridChannelLayer(prefix=ns_prefix)
    try:
        mine = asyncio.run(lay.new_channel())
        code = f"""
            import asyncio, json, socket
            from hybrid_layer import HybridChannelLayer
            async def main():
                lay = HybridChannelLayer(prefix={ns_prefix!r})
                await lay.send({mine!r}, {{"type": "hi", "from": socket.gethostname()}})
                n = lay.global_statistics().participants
                await lay.close()
                print(json.dumps(n))
            asyncio.run(main())
        """
        participants = json.loads(run_in(*OTHER_HOSTNAME, code))
        assert participants == 2
        got: dict[str, Any] = asyncio.run(asyncio.wait_for(lay.receive(mine), 5))
        assert got == {"type": "hi", "from": "sidecar-of-another-name"}
    finally:
        lay.close_sync()
