"""What this machine allows before any channel layer runs: the floors quoted in the README.

    python benchmarks/floors.py [--json]

* ``pipe_blocking``: two processes ping-pong one byte over pipes with blocking syscalls
  (the kernel's wake-up, no Python event loop): round trip p50/p99.
* ``pipe_asyncio``: the same with an asyncio loop on each side (``add_reader``).
* ``spin``: the same over shared memory with both sides polling (no kernel at all).
* ``task_resume``: one loop, 50 tasks waiting on futures, all set at once: time until
  the 25th resumes (what a fan-out to 50 channels in one process pays at its median).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import time

N = 5000


def _q(lat: list[float]) -> dict[str, float]:
    lat = sorted(lat)
    return {"p50_us": lat[len(lat) // 2] * 1e6, "p99_us": lat[int(len(lat) * 0.99)] * 1e6}


def pipe_blocking() -> dict[str, float]:
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        for _ in range(N):
            os.read(a_r, 1)
            os.write(b_w, b"x")
        os._exit(0)
    lat = []
    for _ in range(N):
        t = time.perf_counter()
        os.write(a_w, b"x")
        os.read(b_r, 1)
        lat.append(time.perf_counter() - t)
    os.waitpid(pid, 0)
    for fd in (a_r, a_w, b_r, b_w):
        os.close(fd)
    return _q(lat)


def pipe_asyncio() -> dict[str, float]:
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()

    async def side(r: int, w: int, initiator: bool) -> list[float]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[int] = asyncio.Queue()
        loop.add_reader(r, lambda: (os.read(r, 100), q.put_nowait(1)))
        lat = []
        for _ in range(N):
            if initiator:
                t = time.perf_counter()
                os.write(w, b"x")
                await q.get()
                lat.append(time.perf_counter() - t)
            else:
                await q.get()
                os.write(w, b"x")
        loop.remove_reader(r)
        return lat

    pid = os.fork()
    if pid == 0:
        asyncio.run(side(a_r, b_w, False))
        os._exit(0)
    lat = asyncio.run(side(b_r, a_w, True))
    os.waitpid(pid, 0)
    for fd in (a_r, a_w, b_r, b_w):
        os.close(fd)
    return _q(lat)


def spin() -> dict[str, float]:
    m = mmap.mmap(-1, 4096)
    mv = memoryview(m).cast("Q")
    pid = os.fork()
    if pid == 0:
        for i in range(N):
            while mv[0] != i + 1:
                pass
            mv[8] = i + 1
        os._exit(0)
    lat = []
    for i in range(N):
        t = time.perf_counter()
        mv[0] = i + 1
        while mv[8] != i + 1:
            pass
        lat.append(time.perf_counter() - t)
    os.waitpid(pid, 0)
    mv.release()
    m.close()
    return _q(lat)


def task_resume() -> dict[str, float]:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        out = []
        for _ in range(200):
            futs = [loop.create_future() for _ in range(50)]
            woke: list[int] = []

            async def wait(f: asyncio.Future[None], woke: list[int] = woke) -> None:
                await f
                woke.append(time.perf_counter_ns())

            tasks = [asyncio.create_task(wait(f)) for f in futs]
            await asyncio.sleep(0)
            t0 = time.perf_counter_ns()
            for f in futs:
                f.set_result(None)
            await asyncio.gather(*tasks)
            out.append((sorted(woke)[24] - t0) / 1e9)
        return out

    lat = sorted(asyncio.run(main()))
    return {"p50_us": lat[len(lat) // 2] * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per floor")
    args = ap.parse_args()
    for name, fn in (("pipe_blocking", pipe_blocking), ("pipe_asyncio", pipe_asyncio),
                     ("spin", spin), ("task_resume", task_resume)):
        r = fn()
        if args.json:
            print(json.dumps({"floor": name, **r}))
        else:
            print(f"{name:<14} " + "  ".join(f"{k} {v:.1f}" for k, v in r.items()))


if __name__ == "__main__":
    main()
