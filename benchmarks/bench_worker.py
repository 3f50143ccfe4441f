"""Worker side of the benchmark: one spawned process, one layer object, one role.

The orchestrator (``bench.py``) starts each process with a :class:`Spec` and a
``multiprocessing`` pipe. The pipe is the control plane (names of channels, "go",
"expect", "stop", "close"); every message that is measured goes through the channel
layer's public API only: ``new_channel``, ``send``, ``receive``, ``group_add``,
``group_send``.

Protocol, seen from a worker::

    -> ("ready", info)          layer built, channels created, groups joined
    <- ("go", {role: info})     everybody's info (channel names)
    -> ("done", {...})          sources only: finished sending (how many were sent)
    <- ("expect", n)            sinks only: how many sends the sources completed
    <- ("stop", None)           give up now (stalled peer, or echo no longer needed)
    -> ("result", metrics)      includes VmRSS, read before the layer is closed
    <- ("close", None)          everybody is done and the orchestrator measured /dev/shm
    -> ("closed", info)         the layer is closed; the process then exits

Every wait is bounded: a role that stops making progress for ``stall_s`` is cancelled and
reports what it had (the loss is then visible in its counters).

Most workers are ``multiprocessing`` spawn children of the orchestrator. Workers of a
layer that cannot share the orchestrator's virtualenv (channels_rabbitmq needs pamqp 3,
hybrid_layer's aiormq needs pamqp 4) run this file as a script under another interpreter,
``python bench_worker.py --fd N``: N is their end of the control pipe, and the first
thing read from it is the spec (a dict). So this module imports nothing but the standard
library at module level; each layer's package is imported in :func:`_build_layer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

perf_ns = time.perf_counter_ns
mono_ns = time.monotonic_ns  # CLOCK_MONOTONIC: comparable between processes on one host


@dataclass
class Spec:
    layer: dict[str, Any]  # {"kind": ..., plus constructor arguments}
    role: str  # single | ping | echo | producer | consumer | sender | receiver
    name: str  # this process's name in the measurement, e.g. "producer1"
    params: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- layers
class _SelfTestDropping:
    """Harness self-test only (env BENCH_SELFTEST_DROP=N): silently drop every Nth send
    and group_send, to check that losses are counted and that no wait hangs."""

    def __init__(self, layer: Any, every: int) -> None:
        self._layer, self._every, self._n = layer, max(2, every), 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._layer, name)

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        self._n += 1
        if self._n % self._every:
            await self._layer.send(channel, message)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        self._n += 1
        if self._n % self._every:
            await self._layer.group_send(group, message)


def build_layer(cfg: dict[str, Any]) -> Any:
    layer = _build_layer(cfg)
    drop = os.environ.get("BENCH_SELFTEST_DROP")
    return _SelfTestDropping(layer, int(drop)) if drop else layer


def _build_layer(cfg: dict[str, Any]) -> Any:
    kind = cfg["kind"]
    args = {k: v for k, v in cfg.items() if k != "kind"}
    if kind == "hybrid":
        from hybrid_layer import HybridChannelLayer

        return HybridChannelLayer(**args)
    if kind == "inmemory":
        from channels.layers import InMemoryChannelLayer

        return InMemoryChannelLayer(**args)
    if kind == "redis":
        from channels_redis.core import RedisChannelLayer

        return RedisChannelLayer(**args)
    if kind == "redis_pubsub":
        from channels_redis.pubsub import RedisPubSubChannelLayer

        return RedisPubSubChannelLayer(**args)
    if kind == "rabbitmq":
        from channels_rabbitmq.core import RabbitmqChannelLayer

        return RabbitmqChannelLayer(**args)
    raise ValueError(f"unknown layer kind {kind!r}")


async def close_layer(layer: Any, kind: str, cleanup: bool) -> None:
    """Close the way each package documents; ``cleanup``: also delete the run's keys."""
    if kind == "hybrid":
        await layer.close()
    elif kind == "inmemory":
        await layer.flush()
    elif kind == "redis":
        if cleanup:
            await layer.flush()  # deletes every key of this run's unique prefix, closes pools
        else:
            await layer.close_pools()
    elif kind == "redis_pubsub":
        await layer.flush()  # unsubscribes and closes its connections
    elif kind == "rabbitmq":
        await layer.close()


async def wait_link(layer: Any, timeout: float, ctl: Control) -> None:
    """hybrid broker mode: return once this host's leader reports its RabbitMQ link up
    (``statistics().broker["link"] == "up"``), so the first measured message does not
    race the leader's connect. Raises ``TimeoutError`` (the worker then reports an error
    before "ready") if it is not up within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    state = "?"
    while time.monotonic() < deadline and not ctl.stop_event.is_set():
        state = layer.statistics().broker.get("link", "none")
        if state == "up":
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"RabbitMQ link of this host not up within {timeout:.0f}s ({state})")


def hybrid_stats(layer: Any) -> dict[str, Any]:
    """What hybrid_layer itself counted in this process (explains losses)."""
    try:
        s = layer.statistics()
    except Exception as exc:  # closed or never attached
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
    out: dict[str, Any] = {
        "is_leader": s.is_leader, "sent": s.sent, "received": s.received,
        "raised": {k: v for k, v in s.raised.items() if v},
        "dropped": {k: v for k, v in s.dropped.items() if v},
    }
    if s.broker:
        keep = ("link", "link_changes", "published", "confirmed", "returned", "received",
                "reconnects", "outbound", "in_flight")
        out["broker"] = {k: s.broker[k] for k in keep if k in s.broker}
    return out


def channel_full_types() -> tuple[type[BaseException], ...]:
    from channels.exceptions import ChannelFull

    return (ChannelFull,)


# ---------------------------------------------------------------------------- helpers
def proc_status() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k.strip().lower() + "_kb"] = int(v.split()[0])
    except OSError:
        pass
    return out


def payload(size: int) -> str:
    # ASCII text, so its size in bytes is its length; not all one letter (compression)
    base = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ-_"
    return (base * (size // len(base) + 1))[:size]


class _CountingHandler(logging.Handler):
    """Keep warnings from the layers out of the table, but count them and keep a few."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.first: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.first) < 5:
            try:
                text = f"{record.name}: {record.getMessage()}"
                if record.exc_info and record.exc_info[1] is not None:
                    exc = record.exc_info[1]
                    text += f" [{type(exc).__name__}: {exc}]"
                self.first.append(text[:400])
            except Exception:  # pragma: no cover
                self.first.append(f"{record.name}: <unformattable>")


class Control:
    """The pipe to the orchestrator, read from the event loop (never blocks it)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.stop_event = asyncio.Event()
        self.close_event = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(conn.fileno(), self._readable)
        self.eof = False

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                verb, arg = self.conn.recv()
                if verb == "stop":
                    self.stop_event.set()
                elif verb == "close":
                    self.close_event.set()
                else:
                    self.queue.put_nowait((verb, arg))
        except (EOFError, OSError):  # orchestrator gone: stop everything
            self.eof = True
            self.loop.remove_reader(self.conn.fileno())
            self.stop_event.set()
            self.close_event.set()

    def send(self, verb: str, arg: Any = None) -> None:
        with contextlib.suppress(OSError):
            self.conn.send((verb, arg))

    async def expect(self, verb: str, timeout: float) -> Any:
        got_verb, arg = await asyncio.wait_for(self.queue.get(), timeout)
        if got_verb != verb:
            raise RuntimeError(f"expected {verb!r} from the orchestrator, got {got_verb!r}")
        return arg

    def detach(self) -> None:
        if not self.eof:
            self.loop.remove_reader(self.conn.fileno())


class State:
    """What a role measured so far; reported even if the role is cancelled."""

    def __init__(self) -> None:
        self.progress = 0
        self.armed = False  # the stall watchdog runs once the role got "go"
        self.m: dict[str, Any] = {}


def quantiles_us(ns_values: list[int]) -> dict[str, float]:
    if not ns_values:
        return {}
    v = sorted(ns_values)
    n = len(v)

    def q(p: float) -> float:
        return v[min(n - 1, int(p * n))] / 1000.0

    return {
        "p50_us": q(0.50), "p90_us": q(0.90), "p99_us": q(0.99),
        "max_us": v[-1] / 1000.0, "mean_us": sum(v) / n / 1000.0, "samples": n,
    }


# ---------------------------------------------------------------------------- roles
async def prime(layer: Any, ch: str) -> None:
    """Send one message to our own channel and receive it, before saying "ready".

    channels_rabbitmq only connects (and declares the queue other processes send to) on
    the first send/group_add; a reader that never sent would silently lose everything.
    Same treatment for every layer, public API only.
    """
    await layer.send(ch, {"type": "bench.prime"})
    await asyncio.wait_for(layer.receive(ch), 10.0)


async def role_single(layer: Any, ctl: Control, p: dict[str, Any], st: State) -> None:
    ch = await layer.new_channel()
    ctl.send("ready", {"channel": ch})
    await ctl.expect("go", p["ready_timeout"])
    st.armed = True
    msg = {"type": "bench.msg", "seq": 0, "payload": payload(p["size"])}
    for _ in range(p["warmup"]):
        await layer.send(ch, msg)
        await layer.receive(ch)
        st.progress += 1
    n = 0
    limit = p["count"]
    t0 = t_last = perf_ns()
    deadline = t0 + int(p["duration"] * 1e9)
    lost = 0
    try:
        while n < limit:
            await layer.send(ch, msg)
            await layer.receive(ch)
            n += 1
            st.progress += 1
            t_last = perf_ns()
            if t_last >= deadline:
                break
    except asyncio.CancelledError:
        lost = 1  # stalled: the message just sent never arrived
        raise
    finally:
        dt = (t_last - t0) / 1e9  # up to the last completed pair (not the stall)
        st.m.update(pairs=n, seconds=dt, pairs_per_s=n / dt if dt > 0 else 0.0, lost=lost)


async def role_ping(layer: Any, ctl: Control, p: dict[str, Any], st: State) -> None:
    ch = await layer.new_channel()
    await prime(layer, ch)
    ctl.send("ready", {"channel": ch})
    peers = await ctl.expect("go", p["ready_timeout"])
    st.armed = True
    peer = peers["echo"]["channel"]
    body = payload(p["size"])
    lat: list[int] = []
    lost = 0
    mismatched = 0
    st.m.update(warmup=0, round_trips=0)
    try:
        for i in range(p["warmup"]):
            await layer.send(peer, {"type": "bench.ping", "seq": -1 - i, "payload": body})
            await layer.receive(ch)
            st.progress += 1
            st.m["warmup"] = i + 1
        t_end = perf_ns() + int(p["duration"] * 1e9)
        for i in range(p["count"]):
            msg = {"type": "bench.ping", "seq": i, "payload": body}
            t = perf_ns()
            await layer.send(peer, msg)
            reply = await layer.receive(ch)
            lat.append(perf_ns() - t)
            st.progress += 1
            if reply.get("seq") != i:
                mismatched += 1
            if t >= t_end:
                break
    except asyncio.CancelledError:
        lost = 1  # the one message in flight never came back
        raise
    finally:
        st.m.update(quantiles_us(lat))
        st.m.update(round_trips=len(lat), lost=lost, mismatched=mismatched)
        # tell the echo to stop (best effort; the orchestrator stops it anyway)
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(layer.send(peer, {"type": "bench.stop"}), 1.0)


async def role_echo(layer: Any, ctl: Control, p: dict[str, Any], st: State) -> None:
    ch = await layer.new_channel()
    await prime(layer, ch)
    ctl.send("ready", {"channel": ch})
    peers = await ctl.expect("go", p["ready_timeout"])
    st.armed = True
    peer = peers["ping"]["channel"]
    n = 0
    try:
        while True:
            msg = await layer.receive(ch)
            if msg.get("type") == "bench.stop":
                break
            await layer.send(peer, msg)
            n += 1
            st.progress += 1
    finally:
        st.m.update(echoed=n)


async def role_producer(layer: Any, ctl: Control, p: dict[str, Any], st: State) -> None:
    ctl.send("ready", {})
    peers = await ctl.expect("go", p["ready_timeout"])
    st.armed = True
    dest = peers["consumer"]["channel"]
    body = payload(p["size"])
    src = p["index"]
    full = channel_full_types()
    sent = retries = errors = 0
    first_error = None
    t0 = perf_ns()
    deadline = t0 + int(p["duration"] * 1e9)
    retry_sleep = p["retry_sleep"]
    try:
        for seq in range(p["count"]):
            msg = {"type": "bench.msg", "src": src, "seq": seq, "payload": body}
            while True:
                try:
                    await layer.send(dest, msg)
                    break
                except full:
                    retries += 1
                    st.progress += 1
                    await asyncio.sleep(retry_sleep)
                    if perf_ns() >= deadline + 5_000_000_000:
                        raise TimeoutError("consumer never made room") from None
            sent += 1
            st.progress += 1
            if perf_ns() >= deadline:
                break
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a layer error: record, stop sending
        errors += 1
        first_error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        dt = (perf_ns() - t0) / 1e9
        st.m.update(sent=sent, retries=retries, errors=errors, send_seconds=dt,
                    send_rate=sent / dt if dt > 0 else 0.0)
        if first_error:
            st.m["first_error"] = first_error
        ctl.send("done", {"sent": sent})


async def _collect_until_expected(
    ctl: Control, p: dict[str, Any], st: State, count: Any, per_send: int
) -> tuple[int, bool]:
    """Sinks: wait for ("expect", n), then until count() >= n*per_send or idle/deadline."""
    expected_sends = await ctl.expect("expect", p["run_timeout"])
    expected = expected_sends * per_send
    idle_ns = int(p["idle_s"] * 1e9)
    hard = perf_ns() + int(p["straggler_cap_s"] * 1e9)
    last_progress = st.progress
    last_t = perf_ns()
    while count() < expected:
        await asyncio.sleep(0.005)
        now = perf_ns()
        if st.progress != last_progress:
            last_progress, last_t = st.progress, now
        if now - last_t > idle_ns or now > hard:
            return expected, True
    return expected, False


async def role_consumer(layer: Any, ctl: Control, p: dict[str, Any], st: State) -> None:
    ch = await layer.new_channel()
    await prime(layer, ch)
    ctl.send("ready", {"channel": ch})
    await ctl.expect("go", p["ready_timeout"])
    st.armed = True
    t_go = perf_ns()
    got = [0]
    last_seq: dict[int, int] = {}
    seen = {"dup_or_reorder": 0, "first_ns": 0, "last_ns": 0}

    async def pump() -> None:
        while True:
            msg = await layer.receive(ch)
            now = perf_ns()
            if not got[0]:
                seen["first_ns"] = now
            seen["last_ns"] = now
            got[0] += 1
            st.progress += 1
            src, seq = msg["src"], msg["seq"]
            if seq <= last_seq.get(src, -1):
                seen["dup_or_reorder"] += 1
            last_seq[src] = seq

    task = asyncio.create_task(pump())
    expected = 0
    timed_out = False
    try:
        expected, timed_out = await _collect_until_expected(ctl, p, st, lambda: got[0], 1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        n = got[0]
        dt = (seen["last_ns"] - t_go) / 1e9 if n else 0.0
        st.m.update(received=n, expected=expected, lost=max(0, expected - n),
                    extra=max(0, n - expected), dup_or_reorder=seen["dup_or_reorder"],
                    straggler_timeout=timed_out, seconds=dt,
                    msgs_per_s=n / dt if dt > 0 else 0.0)


async def role_sender(layer: Any, ctl: Control, p: dict[str, Any], st: State) -> None:
    ctl.send("ready", {})
    await ctl.expect("go", p["ready_timeout"])
    st.armed = True
    group = p["group"]
    body = payload(p["size"])
    rate = p.get("rate")  # group_sends per second, None = as fast as possible
    sent = errors = 0
    first_error = None
    t0 = mono_ns()
    deadline = t0 + int(p["duration"] * 1e9)
    try:
        for seq in range(p["count"]):
            if rate:
                due = t0 + int(seq * 1e9 / rate)
                delay = (due - mono_ns()) / 1e9
                if delay > 0:
                    await asyncio.sleep(delay)
            await layer.group_send(
                group, {"type": "bench.msg", "seq": seq, "ts": mono_ns(), "payload": body}
            )
            sent += 1
            st.progress += 1
            if mono_ns() >= deadline:
                break
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except Exception as exc:
        errors += 1
        first_error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        t1 = mono_ns()
        st.m.update(sent=sent, errors=errors, t0_ns=t0, t_end_ns=t1,
                    send_seconds=(t1 - t0) / 1e9, rate_target=rate or 0)
        if first_error:
            st.m["first_error"] = first_error
        ctl.send("done", {"sent": sent, "t0_ns": t0})


async def role_receiver(layer: Any, ctl: Control, p: dict[str, Any], st: State) -> None:
    group = p["group"]
    channels = [await layer.new_channel() for _ in range(p["members"])]
    for ch in channels:
        await layer.group_add(group, ch)
    ctl.send("ready", {"members": len(channels)})
    await ctl.expect("go", p["ready_timeout"])
    st.armed = True
    got = [0]
    lat: list[int] = []
    bad = {"dup_or_reorder": 0, "last_ns": 0}

    async def pump(ch: str) -> None:
        last = -1
        while True:
            msg = await layer.receive(ch)
            now = mono_ns()
            lat.append(now - msg["ts"])
            bad["last_ns"] = now
            got[0] += 1
            st.progress += 1
            if msg["seq"] <= last:
                bad["dup_or_reorder"] += 1
            last = msg["seq"]

    tasks = [asyncio.create_task(pump(ch)) for ch in channels]
    expected = 0
    timed_out = False
    try:
        expected, timed_out = await _collect_until_expected(
            ctl, p, st, lambda: got[0], len(channels)
        )
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        st.m.update(delivered=got[0], expected=expected, lost=max(0, expected - got[0]),
                    extra=max(0, got[0] - expected), dup_or_reorder=bad["dup_or_reorder"],
                    straggler_timeout=timed_out, last_ns=bad["last_ns"], latencies_ns=lat)


ROLES = {
    "single": role_single, "ping": role_ping, "echo": role_echo, "producer": role_producer,
    "consumer": role_consumer, "sender": role_sender, "receiver": role_receiver,
}


# ---------------------------------------------------------------------------- runner
async def _run(spec: Spec, conn: Any) -> None:
    ctl = Control(conn)
    handler = _CountingHandler()
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.WARNING)
    kind = spec.layer["kind"]
    p = spec.params
    st = State()
    status = "ok"
    error = None
    layer = None
    try:
        layer = build_layer(spec.layer)
        if p.get("wait_link"):
            await wait_link(layer, p["wait_link"], ctl)
        task = asyncio.create_task(ROLES[spec.role](layer, ctl, p, st))
        stop_wait = asyncio.create_task(ctl.stop_event.wait())
        stall_ns = int(p["stall_s"] * 1e9)
        hard = perf_ns() + int(p["run_timeout"] * 1e9)
        last = -1
        last_t = perf_ns()
        while not task.done():
            await asyncio.wait({task, stop_wait}, timeout=0.1,
                               return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                break
            now = perf_ns()
            if ctl.stop_event.is_set():
                status = "stopped"
            elif now > hard:
                status = "timeout"
            elif st.progress != last or not st.armed:
                last, last_t = st.progress, now
                continue
            elif now - last_t > stall_ns and p.get("watchdog", True):
                status = "stalled"
            else:
                continue
            task.cancel()
            break
        stop_wait.cancel()
        results = await asyncio.gather(task, return_exceptions=True)
        exc = results[0]
        if isinstance(exc, BaseException) and not isinstance(exc, asyncio.CancelledError):
            status = "error"
            error = "".join(traceback.format_exception(exc))[-2000:]
    except Exception:
        status = "error"
        error = traceback.format_exc()[-2000:]
    m = dict(st.m)
    m.update(proc_status())
    m["pid"] = os.getpid()
    m["status"] = status
    if error:
        m["error"] = error
    m["log_warnings"] = handler.count
    if handler.first:
        m["log_first"] = handler.first
    ctl.send("result", m)
    # stay attached until the orchestrator has measured /dev/shm, then close
    closed: dict[str, Any] = {}
    try:
        await asyncio.wait_for(ctl.close_event.wait(), p["close_wait_s"])
    except TimeoutError:
        closed["close_signal_timeout"] = True
    if kind == "hybrid" and layer is not None:
        # every process has finished measuring by now (sinks included), so the counters
        # include what the leaders did while the consumer was still receiving
        closed["layer_stats"] = hybrid_stats(layer)
    if layer is not None:
        t = perf_ns()
        try:
            await asyncio.wait_for(close_layer(layer, kind, p.get("cleanup", False)),
                                   p["close_timeout_s"])
        except TimeoutError:
            closed["close_error"] = "close() timed out"
        except Exception as exc:
            closed["close_error"] = f"{type(exc).__name__}: {exc}"[:300]
        closed["close_s"] = (perf_ns() - t) / 1e9
    await asyncio.sleep(0)
    closed["tasks_left"] = len([t for t in asyncio.all_tasks()
                                if t is not asyncio.current_task()])
    closed["threads_left"] = [t.name for t in threading.enumerate()
                              if t is not threading.main_thread()]
    ctl.detach()
    ctl.send("closed", closed)


def main(spec: Spec, conn: Any) -> None:
    """Entry point of a spawned worker process."""
    try:
        asyncio.run(_run(spec, conn))
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("crashed", traceback.format_exc()[-2000:]))
        raise
    finally:
        conn.close()


def script_main(argv: list[str] | None = None) -> int:
    """``python bench_worker.py --fd N``: a worker under another interpreter."""
    import argparse
    from multiprocessing.connection import Connection

    ap = argparse.ArgumentParser(description="bench.py worker (started by bench.py)")
    ap.add_argument("--fd", type=int, required=True, help="control pipe file descriptor")
    args = ap.parse_args(argv)
    conn = Connection(args.fd)
    try:
        raw = conn.recv()
    except (EOFError, OSError):
        return 1
    main(Spec(**raw), conn)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(script_main())
