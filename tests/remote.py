"""A participant in a separate (spawned) process, driven over a pipe.

Tests use it to put several real processes on one host namespace and tell each what to
do. Commands run in one persistent event loop in the child; ``collect`` starts a
background receiver so that a process can receive while it is told to do other things.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import time
import traceback
from typing import Any

CTX = mp.get_context("spawn")


class RemoteError(Exception):
    pass


def _serve(conn: Any, config: dict[str, Any]) -> None:
    asyncio.run(_main(conn, config))


async def _main(conn: Any, config: dict[str, Any]) -> None:
    from hybrid_layer import HybridChannelLayer
    from hybrid_layer.errors import ChannelFull

    cafile = config.pop("test_ssl_cafile", None)  # (an SSLContext does not pickle)
    if cafile is not None:
        import ssl

        config["ssl_context"] = ssl.create_default_context(cafile=cafile)
    layer = HybridChannelLayer(**config)
    loop = asyncio.get_running_loop()
    collected: dict[str, list[Any]] = {}
    tasks: dict[str, asyncio.Task[None]] = {}
    done = asyncio.Event()
    inbox: asyncio.Queue[Any] = asyncio.Queue()

    def readable() -> None:
        try:
            inbox.put_nowait(conn.recv())
        except EOFError:
            inbox.put_nowait(("exit",))

    loop.add_reader(conn.fileno(), readable)

    async def collect(channel: str, n: int) -> None:
        out = collected.setdefault(channel, [])
        for _ in range(n):
            out.append(await layer.receive(channel))

    async def handle(cmd: str, *args: Any) -> Any:
        if cmd == "pid":
            return os.getpid()
        if cmd == "new_channel":
            return await layer.new_channel(*args)
        if cmd == "send":
            await layer.send(*args)
            return None
        if cmd == "send_many":  # channel, messages -> number sent before ChannelFull
            channel, messages = args
            for i, m in enumerate(messages):
                try:
                    await layer.send(channel, m)
                except ChannelFull:
                    return i
            return len(messages)
        if cmd == "receive":
            channel, timeout = args
            return await asyncio.wait_for(layer.receive(channel), timeout)
        if cmd == "echo":  # channel, n: in the background, send n messages back to "reply"
            channel, n = args

            async def echo() -> None:
                for _ in range(n):
                    m = await layer.receive(channel)
                    await layer.send(m["reply"], m)

            tasks[channel] = asyncio.create_task(echo())
            return None
        if cmd == "pingpong":  # peer, n: n round trips from a new channel -> seqs back
            peer, n = args
            me = await layer.new_channel()
            seqs = []
            for i in range(n):
                await layer.send(peer, {"type": "ping", "seq": i, "reply": me})
                seqs.append((await asyncio.wait_for(layer.receive(me), 10.0))["seq"])
            return seqs
        if cmd == "receive_many":
            channel, n, timeout = args
            return [await asyncio.wait_for(layer.receive(channel), timeout) for _ in range(n)]
        if cmd == "collect":
            channel, n = args
            tasks[channel] = asyncio.create_task(collect(channel, n))
            return None
        if cmd == "collect_timed":  # channel: receive for ever, noting arrival times
            (channel,) = args
            out = collected.setdefault(channel, [])

            async def timed() -> None:
                while True:
                    m = await layer.receive(channel)
                    out.append((m, time.time()))

            tasks[channel] = asyncio.create_task(timed())
            return None
        if cmd == "paced":  # channel, group|None, sender id, rate/s, seconds (background)
            channel, group, sid, rate, seconds = args

            async def paced() -> dict[str, Any]:
                accepted, full, groups = [], 0, []
                t0, k = loop.time(), 0
                while loop.time() - t0 < seconds:
                    delay = t0 + k / rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    try:
                        await layer.send(channel, {"type": "m", "s": sid, "n": k, "t": time.time()})
                        accepted.append(k)
                    except ChannelFull:
                        full += 1
                    if group is not None and k % 10 == 0:
                        await layer.group_send(group, {"type": "m", "s": -sid - 1, "n": k})
                        groups.append(k)
                    k += 1
                return {"accepted": accepted, "full": full, "groups": groups}

            tasks["paced"] = asyncio.create_task(paced())  # type: ignore[assignment]
            return None
        if cmd == "paced_result":
            return await tasks["paced"]
        if cmd == "collected_channels":
            return list(collected)
        if cmd == "collected":
            (channel,) = args
            return list(collected.get(channel, []))
        if cmd == "wait_collected":
            channel, timeout = args
            await asyncio.wait_for(asyncio.shield(tasks[channel]), timeout)
            return list(collected.get(channel, []))
        if cmd == "group_add":
            await layer.group_add(*args)
            return None
        if cmd == "group_discard":
            await layer.group_discard(*args)
            return None
        if cmd == "group_send":
            await layer.group_send(*args)
            return None
        if cmd == "flush":
            await layer.flush()
            return None
        if cmd == "stats":
            return layer.statistics()
        if cmd == "global_stats":
            return layer.global_statistics()
        if cmd == "internals":  # slot, gen, pid
            p = layer._p()
            return {"slot": p.slot, "gen": p.gen, "pid": os.getpid(), "is_leader": p.ns.is_leader}
        if cmd == "hold_ring_lock":  # slot index: take its ring lock and never let go
            from hybrid_layer.shm.layout import RING_LOCK_BASE

            p = layer._p()
            p.ns.lockfile.acquire(RING_LOCK_BASE + args[0])
            return None
        if cmd == "half_write":  # slot: write half a record without publishing, hold lock
            from hybrid_layer.shm.layout import RING_LOCK_BASE

            p = layer._p()
            sv = p.ns.slot(args[0])
            p.ns.lockfile.acquire(RING_LOCK_BASE + args[0])
            ring = sv.ring
            off = ring.tail % ring.size
            n = min(64, ring.size - off)
            ring.data[off : off + n] = b"\xee" * n
            return None
        if cmd == "inject_garbage":  # slot: publish a record with a bad header
            from hybrid_layer.shm.layout import Q_TAIL

            p = layer._p()
            sv = p.ns.slot(args[0])
            with p.ns.ring_locked(sv):
                ring = sv.ring
                off = ring.tail % ring.size
                ring.data[off : off + 32] = b"\xde\xad\xbe\xef" * 8
                sv.cq[Q_TAIL] = ring.tail + 32
            return None
        if cmd == "send_raw":  # channel, payload bytes: as a peer that skips encode_message
            channel, payload = args
            p = layer._p()
            return p.send(channel, payload, time.monotonic() + 30)
        if cmd == "group_send_raw":  # group, payload bytes (likewise)
            group, payload = args
            layer._p().group_send(group, payload, time.monotonic() + 30)
            return None
        if cmd == "wait_link":  # broker mode: until the host's link is up (or timeout)
            (timeout,) = args
            deadline = time.monotonic() + timeout
            while layer.statistics().broker.get("link") != "up":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"link not up: {layer.statistics().broker}")
                await asyncio.sleep(0.02)
            return layer.statistics().broker
        if cmd == "collect_any":  # channels, n: receive n messages over all of them
            chans, n = args
            for ch in chans:
                tasks[ch] = asyncio.create_task(collect(ch, n))
            return None
        if cmd in ("send_big", "group_send_big"):  # channel|group, size, seed -> digest
            # (the payload is made here, not pickled through the pipe)
            import hashlib
            import random

            dest, size, seed = args
            body = random.Random(seed).randbytes(size)
            m = {"type": "big", "seed": seed, "b": body}
            await (layer.send if cmd == "send_big" else layer.group_send)(dest, m)
            return hashlib.sha256(body).hexdigest()
        if cmd == "receive_digest":  # channel, timeout -> (seed, size, sha256)
            import hashlib

            channel, timeout = args
            m = await asyncio.wait_for(layer.receive(channel), timeout)
            return m["seed"], len(m["b"]), hashlib.sha256(m["b"]).hexdigest()
        if cmd == "spill_orphan":  # slot, gen, size: a spill segment nobody will publish
            from hybrid_layer.shm import spill

            slot, gen, size = args
            p = layer._p()
            ref = spill.write(p.ns.ns, slot, gen, p.cfg.mode, b"x", b"\x00" * size)
            return ref[9:].decode()
        if cmd == "close":
            await layer.close()
            done.set()
            return None
        if cmd == "exit":
            done.set()
            return None
        raise RemoteError(f"unknown command {cmd}")

    async def pump() -> None:
        while not done.is_set():
            msg = await inbox.get()
            try:
                result = await handle(*msg)
                conn.send(("ok", result))
            except BaseException as exc:  # report to the test, keep serving
                conn.send(("err", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))

    await pump()
    loop.remove_reader(conn.fileno())


class Remote:
    """Handle on one participant process."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.conn, child = CTX.Pipe()
        self.proc = CTX.Process(target=_serve, args=(child, config), daemon=True)
        self.proc.start()
        child.close()
        self.pid = self.call("pid")

    def call(self, *cmd: Any, timeout: float = 30) -> Any:
        self.conn.send(cmd)
        if not self.conn.poll(timeout):
            raise TimeoutError(f"remote {self.proc.pid} did not answer {cmd[0]} in {timeout}s")
        status, value = self.conn.recv()
        if status == "err":
            raise RemoteError(value)
        return value

    def start_call(self, *cmd: Any) -> None:
        """Send a command without waiting: ``result()`` collects its answer (so that
        several processes can be made to act at the same moment)."""
        self.conn.send(cmd)

    def result(self, timeout: float = 30) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"remote {self.proc.pid} did not answer in {timeout}s")
        status, value = self.conn.recv()
        if status == "err":
            raise RemoteError(value)
        return value

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("close", timeout=15)
                self.conn.send(("exit",))
            except (TimeoutError, OSError, EOFError, RemoteError):
                pass
            self.proc.join(10)
            if self.proc.is_alive():
                self.kill()
        self.conn.close()


def wait_until(pred: Any, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())
