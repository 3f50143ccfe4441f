"""What this machine allows before any channel layer runs: the floors quoted in the README.

    python benchmarks/floors.py [--json]

* ``pipe_blocking``: two processes ping-pong one byte over pipes with blocking syscalls
  (the kernel's wake-up, no Python event loop): round trip p50/p99.
* ``pipe_asyncio``: the same with an asyncio loop on each side (``add_reader``).
* ``spin``: the same over shared memory with both sides polling (no kernel at all).
* ``task_resume``: one loop, 50 tasks waiting on futures, all set at once: time until
  the 25th resumes (what a fan-out to 50 channels in one process pays at its median).
* ``aiormq_loop``: two processes ping-pong 100 bytes through RabbitMQ with bare aiormq
  (a connection in each process's own loop, an exclusive queue each, the default
  exchange, publisher confirms as aiormq defaults to, no_ack): the cross-host round
  trip before any layer code, with aiormq, the AMQP client the design prescribes.
* ``aiormq_thread``: the same with each connection on a second thread's loop and every
  message handed between the two loops with ``call_soon_threadsafe`` both ways: the
  floor of a link that lives on a leader's own thread, as hybrid_layer's does.
  Both need RabbitMQ (``HYBRID_BENCH_AMQP``, default amqp://guest:guest@127.0.0.1:5672/)
  and are left out, with a line saying so, when it cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import socket
import threading
import time
import urllib.parse

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


AMQP_URL = os.environ.get("HYBRID_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
AMQP_N = 3000
AMQP_WARMUP = 200
AMQP_SIZE = 100  # body bytes of the aiormq floors (--size)


async def _amqp_side(me: str, peer: str, initiator: bool, threaded: bool) -> list[float]:
    """One side of ``aiormq_loop`` / ``aiormq_thread``: consume queue ``me``, publish
    to ``peer``; ``threaded``: the connection lives on a second thread's loop."""
    import aiormq

    main = asyncio.get_running_loop()
    got: asyncio.Queue[bytes] = asyncio.Queue()
    ready = threading.Event()
    box: dict[str, object] = {}

    async def open_link() -> object:
        conn = await aiormq.connect(AMQP_URL)
        ch = await conn.channel()
        await ch.queue_declare(me, exclusive=True, auto_delete=True)

        async def on(msg: object) -> None:
            if threaded:
                main.call_soon_threadsafe(got.put_nowait, msg.body)  # type: ignore[attr-defined]
            else:
                got.put_nowait(msg.body)  # type: ignore[attr-defined]

        await ch.basic_consume(me, on, no_ack=True)
        box.update(ch=ch, loop=asyncio.get_running_loop())
        ready.set()
        return conn

    stop = threading.Event()
    if threaded:

        def thread_main() -> None:
            async def run() -> None:
                conn = await open_link()
                while not stop.is_set():
                    await asyncio.sleep(0.05)
                await conn.close()  # type: ignore[attr-defined]

            asyncio.run(run())

        th = threading.Thread(target=thread_main, daemon=True)
        th.start()
        await main.run_in_executor(None, ready.wait)
        link_loop = box["loop"]

        def publish(body: bytes) -> None:
            link_loop.call_soon_threadsafe(  # type: ignore[attr-defined]
                lambda: link_loop.create_task(  # type: ignore[attr-defined]
                    box["ch"].basic_publish(body, routing_key=peer)  # type: ignore[attr-defined]
                )
            )
    else:
        conn = await open_link()

        pending: set[asyncio.Task[object]] = set()

        def publish(body: bytes) -> None:
            t = main.create_task(box["ch"].basic_publish(body, routing_key=peer))  # type: ignore[attr-defined]
            pending.add(t)
            t.add_done_callback(pending.discard)

    await asyncio.sleep(0.5)  # the peer's queue
    lat = []
    body = b"x" * AMQP_SIZE
    # a large body: fewer round trips (about as many bytes as 3 000 of 100 kB)
    n = max(200, min(AMQP_N, 300_000_000 // max(AMQP_SIZE, 1)))
    warmup = min(AMQP_WARMUP, n // 10)
    for i in range(n + warmup):
        if initiator:
            t = time.perf_counter()
            publish(body)
            await asyncio.wait_for(got.get(), 10)  # a dead peer: fail, not hang
            if i >= warmup:
                lat.append(time.perf_counter() - t)
        else:
            await asyncio.wait_for(got.get(), 10)
            publish(body)
    await asyncio.sleep(0.1)
    if threaded:
        stop.set()
        th.join(5)
    else:
        await conn.close()  # type: ignore[attr-defined]
    return lat


def _amqp(threaded: bool) -> dict[str, float]:
    tag = f"hybrid-floor.{os.getpid()}.{int(threaded)}"
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            asyncio.run(_amqp_side(tag + ".b", tag + ".a", False, threaded))
        except BaseException:
            code = 1
        os._exit(code)
    try:
        lat = asyncio.run(_amqp_side(tag + ".a", tag + ".b", True, threaded))
    finally:
        os.waitpid(pid, 0)
    return _q(lat)


def aiormq_loop() -> dict[str, float]:
    return _amqp(False)


def aiormq_thread() -> dict[str, float]:
    return _amqp(True)


def _broker_reachable() -> bool:
    u = urllib.parse.urlsplit(AMQP_URL)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 5672), timeout=1):
            return True
    except OSError:
        return False


def _size(text: str) -> int:
    """bench.py's size names (100B, 10KB, 1MB, 5MB, 20MB), or a number of bytes."""
    from bench import SIZES

    return SIZES[text] if text in SIZES else int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per floor")
    ap.add_argument("--only", default="", help="comma-separated floors to run (default all)")
    ap.add_argument("--size", default="100B",
                    help="body of the aiormq floors: 100B, 1MB, 5MB, ... (default 100B)")
    args = ap.parse_args()
    global AMQP_SIZE
    AMQP_SIZE = _size(args.size)
    floors = [
        ("pipe_blocking", pipe_blocking),
        ("pipe_asyncio", pipe_asyncio),
        ("spin", spin),
        ("task_resume", task_resume),
        ("aiormq_loop", aiormq_loop),
        ("aiormq_thread", aiormq_thread),
    ]
    only = {x for x in args.only.split(",") if x}
    broker = _broker_reachable()
    for name, fn in floors:
        if only and name not in only:
            continue
        if name.startswith("aiormq") and not broker:
            print(f"{name}: left out, no RabbitMQ at {AMQP_URL.rsplit('@', 1)[-1]}")
            continue
        r = fn()
        if name.startswith("aiormq"):
            r = {"size": AMQP_SIZE, **r}
        if args.json:
            print(json.dumps({"floor": name, **r}))
        else:
            print(f"{name:<14} " + "  ".join(f"{k} {v:.1f}" for k, v in r.items()))


if __name__ == "__main__":
    main()
