"""A narrated tour of hybrid_layer on one host, no broker: ``python -m hybrid_layer.demo``.

It starts separate processes (``multiprocessing``, spawn): three async *workers*, each
with two consumer channels in group ``"room"`` (as three ``uvicorn --workers 3``
processes with websocket consumers would have), and one sync *producer* that uses the
layer through ``asgiref.sync.async_to_sync``, as a Django view or a Celery task does.
The main process only directs them (over ``multiprocessing`` queues) and tells what
happened: every message itself travels through the layer's shared memory.

It shows a ``group_send`` fanned out to every worker, direct sends, a normal channel
(``"tasks"``) shared by several readers with each message handled exactly once,
``ChannelFull`` on a full channel, the round-trip latency between two processes, the
layer's statistics, and that the last process out removed the shared memory.

Exit status 0 if every check passed, 1 if one failed, 2 if the demo broke or timed out.
Options: ``--prefix`` (the layer's ``CONFIG['prefix']``, default ``demo``), ``--pings``.

One module on purpose, though over 400 lines: it is a script to be read top to bottom
next to what it prints - the workers, the producer and the director that tells the
story - and uses only the layer's public API; nothing else imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import logging
import multiprocessing as mp
import os
import queue
import statistics as pystats
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any

GROUP = "room"
TASKS = "tasks"
FULL_PREFIX = "full."
FULL_CAPACITY = 5
N_WORKERS = 3
CHANNELS_PER_WORKER = 2
N_TASKS = 30
WARMUP_PINGS = 20
TOTAL_DEADLINE = 25.0  # the whole demo, start to finish
STEP_TIMEOUT = 10.0  # one command or one expected message
QUIET = 0.3  # after the expected messages: how long to watch for duplicates
CHILD_LIFETIME = 60.0  # a child quits by itself after this long (the parent died...)
SHM_DIR = "/dev/shm"

Event = tuple[Any, ...]


def layer_config(prefix: str) -> dict[str, Any]:
    return {"prefix": prefix, "expiry": 30, "channel_capacity": {FULL_PREFIX + "*": FULL_CAPACITY}}


def shm_names(prefix: str) -> list[str]:
    """This demo's names in /dev/shm (every name of a namespace starts ``hl.<prefix>.``)."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(f"hl.{prefix}."))
    except FileNotFoundError:
        return []


def _child_logging() -> None:
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="    (log from pid %(process)d) %(message)s",
    )


class _Commands:
    """A child's command inbox; gives up if the parent is gone or after CHILD_LIFETIME."""

    def __init__(self, q: Any) -> None:
        self.q = q
        self.until = time.monotonic() + CHILD_LIFETIME

    def get(self) -> tuple[int, str, tuple[Any, ...]]:
        parent = mp.parent_process()
        while time.monotonic() < self.until:
            try:
                return self.q.get(timeout=0.25)  # type: ignore[no-any-return]
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    break
        return (-1, "quit", ())


# ====================================================================== worker (async)
def _worker_entry(name: str, cfg: dict[str, Any], cmds: Any, events: Any) -> None:
    _child_logging()
    try:
        asyncio.run(_worker(name, cfg, _Commands(cmds), events))
    except BaseException:
        events.put(("error", name, traceback.format_exc()))
        sys.exit(1)


async def _serve(layer: Any, name: str, channel: str, events: Any) -> None:
    """A consumer: report what arrives; answer pings at once (for the latency test)."""
    pid = os.getpid()
    while True:
        msg = await layer.receive(channel)
        if msg.get("type") == "ping":
            await layer.send(msg["reply_to"], {"type": "pong", "seq": msg["seq"]})
            continue
        events.put(("got", name, pid, channel, msg))


async def _consume(layer: Any, name: str, channel: str, events: Any) -> None:
    pid = os.getpid()
    while True:
        msg = await layer.receive(channel)
        events.put(("task", name, pid, msg))
        await asyncio.sleep(0.001)  # "work", so that the readers take turns


async def _worker(name: str, cfg: dict[str, Any], cmds: _Commands, events: Any) -> None:
    from hybrid_layer import ChannelFull, HybridChannelLayer

    layer = HybridChannelLayer(**cfg)
    loop = asyncio.get_running_loop()
    background: list[asyncio.Task[None]] = []
    consumer: asyncio.Task[None] | None = None
    full_channel = ""
    cid = -1
    try:
        chans = [await layer.new_channel() for _ in range(CHANNELS_PER_WORKER)]
        for ch in chans:
            await layer.group_add(GROUP, ch)
        background = [asyncio.create_task(_serve(layer, name, ch, events)) for ch in chans]
        st = layer.statistics()
        events.put(("ready", name, os.getpid(), st.slot, chans))
        while True:
            cid, cmd, args = await loop.run_in_executor(None, cmds.get)
            if cmd == "quit":
                break
            result: Any = None
            if cmd == "group_send":
                await layer.group_send(*args)
            elif cmd == "send":
                try:
                    await layer.send(*args)
                    result = "ok"
                except ChannelFull:
                    result = "ChannelFull"
            elif cmd == "consume":
                consumer = asyncio.create_task(_consume(layer, name, args[0], events))
                await asyncio.sleep(0.05)  # its first receive() makes us a reader
            elif cmd == "stop_consume" and consumer is not None:
                consumer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await consumer
                consumer = None
            elif cmd == "make_full_channel":
                full_channel = result = await layer.new_channel(FULL_PREFIX)
            elif cmd == "drain_full":
                got = []
                for _ in range(args[0]):
                    msg = await asyncio.wait_for(layer.receive(full_channel), STEP_TIMEOUT)
                    got.append(msg["seq"])
                result = got
            elif cmd == "ping":
                result = await _pings(layer, *args)
            elif cmd == "stats":
                result = _stats(layer)
            else:
                raise ValueError(f"unknown command {cmd!r}")
            events.put(("done", name, cid, result))
    finally:
        for t in [*background, *([consumer] if consumer else [])]:
            t.cancel()
        for t in [*background, *([consumer] if consumer else [])]:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await layer.close()
    events.put(("done", name, cid, "closed"))


def _stats(layer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(this process's statistics, the host's) as dicts for the demo's report."""
    # global_statistics() first publishes this process's own counters
    g = layer.global_statistics()
    return dataclasses.asdict(layer.statistics()), dataclasses.asdict(g)


async def _pings(layer: Any, target: str, n: int) -> list[float]:
    """``n`` round trips to ``target`` (another process's consumer); microseconds each."""
    reply_to = await layer.new_channel("pong.")
    out = []
    for seq in range(WARMUP_PINGS + n):
        t0 = time.perf_counter()
        await layer.send(target, {"type": "ping", "seq": seq, "reply_to": reply_to})
        msg = await asyncio.wait_for(layer.receive(reply_to), STEP_TIMEOUT)
        dt = time.perf_counter() - t0
        if msg.get("seq") != seq:
            raise AssertionError(f"pong {msg!r} for ping {seq}")
        if seq >= WARMUP_PINGS:
            out.append(dt * 1e6)
    return out


# ====================================================================== producer (sync)
def _producer_entry(name: str, cfg: dict[str, Any], cmds: Any, events: Any) -> None:
    _child_logging()
    try:
        _producer(name, cfg, _Commands(cmds), events)
    except BaseException:
        events.put(("error", name, traceback.format_exc()))
        sys.exit(1)


def _producer(name: str, cfg: dict[str, Any], cmds: _Commands, events: Any) -> None:
    """Plain sync code, like a Django view or a Celery task: no event loop of its own."""
    from asgiref.sync import async_to_sync

    from hybrid_layer import ChannelFull, HybridChannelLayer

    layer = HybridChannelLayer(**cfg)
    send = async_to_sync(layer.send)
    group_send = async_to_sync(layer.group_send)
    cid = -1
    try:
        events.put(("ready", name, os.getpid(), layer.statistics().slot, []))
        while True:
            cid, cmd, args = cmds.get()
            if cmd == "quit":
                break
            result: Any = None
            if cmd == "group_send":
                group_send(*args)
            elif cmd == "send":
                send(*args)
            elif cmd == "send_tasks":
                for i in range(args[0]):
                    send(TASKS, {"type": "task", "n": i})
            elif cmd == "fill":
                channel, n = args
                result = []
                for seq in range(n):
                    try:
                        send(channel, {"type": "fill", "seq": seq})
                    except ChannelFull:
                        result.append("ChannelFull")
                        break
                    result.append("ok")
            elif cmd == "stats":
                result = _stats(layer)
            else:
                raise ValueError(f"unknown command {cmd!r}")
            events.put(("done", name, cid, result))
    finally:
        layer.close_sync()
    events.put(("done", name, cid, "closed"))


# ====================================================================== the director
class DemoBroken(Exception):
    """A child failed or did not answer in time: the demo cannot go on."""


@dataclasses.dataclass
class Proc:
    name: str
    process: Any
    cmds: Any
    pid: int = 0
    slot: int = -1
    channels: list[str] = dataclasses.field(default_factory=list)


class Demo:
    def __init__(self, prefix: str, pings: int) -> None:
        self.prefix = prefix
        self.pings = pings
        self.cfg = layer_config(prefix)
        self.ctx = mp.get_context("spawn")
        self.events: Any = self.ctx.Queue()
        self.pending: list[Event] = []
        self.procs: dict[str, Proc] = {}
        self.labels: dict[str, str] = {}
        self.checks: list[tuple[bool, str]] = []
        self.ids = itertools.count(1)
        self.deadline = time.monotonic() + TOTAL_DEADLINE
        self.stats: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}

    # ------------------------------------------------------------------ plumbing
    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def check(self, ok: bool, text: str) -> bool:
        self.checks.append((ok, text))
        self.say(f"    [{'ok' if ok else 'FAILED'}] {text}")
        return ok

    def _left(self, timeout: float) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DemoBroken(f"the demo ran over its {TOTAL_DEADLINE}s budget")
        return min(timeout, left)

    def _pull(self, timeout: float) -> bool:
        try:
            ev = self.events.get(timeout=max(timeout, 0.001))
        except queue.Empty:
            return False
        if ev[0] == "error":
            raise DemoBroken(f"process {ev[1]} failed:\n{ev[2]}")
        self.pending.append(ev)
        return True

    def collect(self, pred: Callable[[Event], bool], count: int, timeout: float) -> list[Event]:
        """Up to ``count`` matching events within ``timeout`` (fewer if they do not come)."""
        end = time.monotonic() + self._left(timeout)
        while True:
            got = [e for e in self.pending if pred(e)]
            if len(got) >= count:
                got = got[:count]
                break
            left = end - time.monotonic()
            if left <= 0 or (not self._pull(min(left, 0.5)) and time.monotonic() >= end):
                break
        for e in got:
            self.pending.remove(e)
        return got

    def call(self, name: str, cmd: str, *args: Any, timeout: float = STEP_TIMEOUT) -> Any:
        cid = next(self.ids)
        self.procs[name].cmds.put((cid, cmd, args))
        got = self.collect(lambda e: e[0] == "done" and e[1] == name and e[2] == cid, 1, timeout)
        if not got:
            raise DemoBroken(f"{name} did not carry out {cmd!r} within {timeout}s")
        return got[0][3]

    def label(self, channel: str) -> str:
        return self.labels.get(channel, channel)

    def who(self, name: str) -> str:
        p = self.procs[name]
        return f"{name} (pid {p.pid})"

    @property
    def workers(self) -> list[Proc]:
        return [p for n, p in self.procs.items() if n != "producer"]

    # ------------------------------------------------------------------ the story
    def run(self) -> None:
        self.say(
            "hybrid_layer demo: one host, no broker, every message through POSIX shared memory"
        )
        self.say(f"CONFIG = {self.cfg}")
        before = shm_names(self.prefix)
        self.say(f"/dev/shm before: {', '.join(before) if before else 'no names for this prefix'}")
        if before:
            self.say(
                "    (a set left behind by a crash: the first process in detects and reuses it)"
            )
        self.start()
        self.group_sends()
        self.direct_sends()
        self.normal_channel()
        self.channel_full()
        self.latency()
        self.statistics()

    def start(self) -> None:
        self.say()
        self.say(f"[1] Starting {N_WORKERS} async worker processes and 1 sync producer (spawn)")
        for i in range(1, N_WORKERS + 1):
            self._spawn(f"W{i}", _worker_entry)
        self._spawn("producer", _producer_entry)
        ready = self.collect(lambda e: e[0] == "ready", len(self.procs), 15.0)
        if len(ready) != len(self.procs):
            raise DemoBroken(f"only {[e[1] for e in ready]} came up within 15s")
        for _, name, pid, slot, chans in sorted(ready, key=lambda e: e[1]):
            p = self.procs[name]
            p.pid, p.slot, p.channels = pid, slot, chans
            for k, ch in enumerate(chans):
                self.labels[ch] = f"{name}.c{k}"
        for p in self.workers:
            self.say(
                f"    {p.name}  pid {p.pid}  slot {p.slot}  consumer channels, both in group "
                f"{GROUP!r}:"
            )
            for ch in p.channels:
                self.say(f"        {self.label(ch)} = {ch}")
        prod = self.procs["producer"]
        self.say(
            f"    producer  pid {prod.pid}  slot {prod.slot}  (sync code calling "
            "async_to_sync(layer.send / layer.group_send))"
        )
        names = shm_names(self.prefix)
        self.say(f"    /dev/shm now holds {len(names)} names for this prefix: {', '.join(names)}")
        self.check(
            len({p.pid for p in self.procs.values()}) == len(self.procs),
            f"{len(self.procs)} separate processes attached to one host namespace",
        )

    def _spawn(self, name: str, target: Callable[..., None]) -> None:
        cmds = self.ctx.Queue()
        process = self.ctx.Process(
            target=target,
            args=(name, self.cfg, cmds, self.events),
            name=f"demo-{name}",
            daemon=True,
        )
        process.start()
        self.procs[name] = Proc(name, process, cmds)

    def _expect_once_each(self, text: str, channels: list[str], sender: str) -> None:
        def mine(e: Event) -> bool:
            return e[0] == "got" and bool(e[4].get("text") == text)

        got = self.collect(mine, len(channels), STEP_TIMEOUT)
        time.sleep(QUIET)  # anything more would be a duplicate
        got += self.collect(mine, 10**6, 0.01)
        for _, name, pid, ch, msg in got:
            self.say(
                f"    {name} (pid {pid}) received it on {self.label(ch)} "
                f"(sent by pid {msg['from_pid']})"
            )
        per_channel = Counter(e[3] for e in got)
        missing = [self.label(c) for c in channels if per_channel[c] == 0]
        dups = [self.label(c) for c, k in per_channel.items() if k > 1]
        strangers = [c for c in per_channel if c not in channels]
        procs = {e[1] for e in got}
        if len(channels) == 1:
            what = f"{sender}'s message: exactly one copy, on {self.label(channels[0])} only"
        else:
            what = (
                f"{sender}'s message: exactly one copy on each of {len(channels)} channels "
                f"in {len(procs)} processes"
            )
        self.check(
            not missing and not dups and not strangers,
            what
            + (f"; missing on {missing}" if missing else "")
            + (f"; duplicates on {dups}" if dups else "")
            + (f"; unexpected on {strangers}" if strangers else ""),
        )

    def group_sends(self) -> None:
        members = [ch for p in self.workers for ch in p.channels]
        self.say()
        text = "hello room, from a sync view"
        self.say(f"[2] group_send: {self.who('producer')} -> group {GROUP!r}: {text!r}")
        self.say("    (one record per member *process*; each worker fans out to its own channels)")
        prod = self.procs["producer"]
        self.call(
            "producer", "group_send", GROUP, {"type": "chat", "text": text, "from_pid": prod.pid}
        )
        self._expect_once_each(text, members, "producer")

        w1 = self.workers[0]
        text = "hello room, from a consumer"
        self.say(f"    group_send: {self.who(w1.name)} -> group {GROUP!r}: {text!r}")
        self.call(w1.name, "group_send", GROUP, {"type": "chat", "text": text, "from_pid": w1.pid})
        self._expect_once_each(text, members, w1.name)

    def direct_sends(self) -> None:
        self.say()
        self.say("[3] direct send to one consumer channel (its name says which process reads it)")
        w = self.workers
        plan = [("producer", w[1].channels[1]), (w[2].name, w[0].channels[0])]
        for sender, target in plan:
            text = f"for {self.label(target)} only"
            self.say(f"    {self.who(sender)} -> {self.label(target)}: {text!r}")
            args = (target, {"type": "chat", "text": text, "from_pid": self.procs[sender].pid})
            r = self.call(sender, "send", *args)
            if r not in (None, "ok"):
                self.check(False, f"send from {sender} returned {r}")
            self._expect_once_each(text, [target], sender)

    def normal_channel(self) -> None:
        self.say()
        self.say(f"[4] normal channel {TASKS!r}: every worker reads it, each message goes to one")
        for p in self.workers:
            self.call(p.name, "consume", TASKS)
        self.say(f"    {self.who('producer')} sends {N_TASKS} messages to {TASKS!r}")
        self.call("producer", "send_tasks", N_TASKS)
        got = self.collect(lambda e: e[0] == "task", N_TASKS, STEP_TIMEOUT)
        time.sleep(QUIET)
        got += self.collect(lambda e: e[0] == "task", 10**6, 0.01)
        for p in self.workers:
            self.call(p.name, "stop_consume")
        by_worker = Counter(e[1] for e in got)
        self.say(
            "    handled by: "
            + ", ".join(f"{p.name} (pid {p.pid}): {by_worker[p.name]}" for p in self.workers)
        )
        counts = Counter(e[3]["n"] for e in got)
        missing = sorted(set(range(N_TASKS)) - set(counts))
        dups = sorted(n for n, k in counts.items() if k > 1)
        self.check(
            not missing and not dups,
            f"each of the {N_TASKS} tasks handled exactly once"
            + (f"; never handled: {missing}" if missing else "")
            + (f"; handled twice: {dups}" if dups else ""),
        )
        self.check(len(by_worker) >= 2, f"the work was shared by {len(by_worker)} worker processes")

    def channel_full(self) -> None:
        self.say()
        w3 = self.workers[-1]
        full = self.call(w3.name, "make_full_channel")
        self.labels[full] = f"{w3.name}.full"
        self.say(
            f"[5] capacity: channel_capacity {{'{FULL_PREFIX}*': {FULL_CAPACITY}}}; "
            f"{self.who(w3.name)} owns {full}"
        )
        self.say(f"    and does not read it yet; {self.who('producer')} sends until it is full")
        results = self.call("producer", "fill", full, FULL_CAPACITY + 3)
        for seq, r in enumerate(results):
            self.say(f"    send #{seq + 1}: {'accepted' if r == 'ok' else 'raised ChannelFull'}")
        self.check(
            results == ["ok"] * FULL_CAPACITY + ["ChannelFull"],
            f"{FULL_CAPACITY} sends accepted, then ChannelFull",
        )
        seqs = self.call(w3.name, "drain_full", FULL_CAPACITY)
        self.say(
            f"    {w3.name} now reads {len(seqs)} messages (seq {seqs}); the producer tries again"
        )
        self.check(seqs == list(range(FULL_CAPACITY)), "the reader got them in order (FIFO)")
        again = self.call("producer", "fill", full, 1)
        self.check(again == ["ok"], "after the reader made room, send is accepted again")
        self.call(w3.name, "drain_full", 1)

    def latency(self) -> None:
        self.say()
        a, b = self.workers[0], self.workers[1]
        target = b.channels[0]
        self.say(
            f"[6] round trips: {self.who(a.name)} sends a ping to {self.label(target)} "
            f"in {self.who(b.name)}, which answers; {self.pings} times, one at a time"
        )
        rtts = self.call(a.name, "ping", target, self.pings, timeout=max(STEP_TIMEOUT, 20.0))
        if not self.check(len(rtts) == self.pings, f"{self.pings} pongs, in order"):
            return
        rtts.sort()
        p90 = rtts[int(len(rtts) * 0.9) - 1] if len(rtts) >= 10 else rtts[-1]
        self.say(
            f"    round trip: median {pystats.median(rtts):.0f} µs, p90 {p90:.0f} µs, "
            f"min {rtts[0]:.0f} µs, max {rtts[-1]:.0f} µs"
        )

    def statistics(self) -> None:
        self.say()
        self.say(
            "[7] statistics: layer.statistics() in every process, "
            "layer.global_statistics() for the host"
        )
        # the worker asked last sees everyone's counters as they were just published
        order = ["producer", *[p.name for p in self.workers]]
        for name in order:
            own, host = self.call(name, "stats")
            self.stats[name] = (own, host)
        head = (
            f"    {'process':<9} {'pid':>7} {'slot':>4} {'sent':>5} {'recv':>5} "
            f"{'grp_send':>8} {'grp_copy':>8} {'raised':>6} {'dropped':>7}"
        )
        self.say(head)
        total: Counter[str] = Counter()
        for name in order:
            s = self.stats[name][0]
            raised, dropped = sum(s["raised"].values()), sum(s["dropped"].values())
            for k in ("sent", "received", "group_sends", "group_copies"):
                total[k] += s[k]
            total["raised"] += raised
            total["dropped"] += dropped
            self.say(
                f"    {name:<9} {s['pid']:>7} {s['slot']:>4} {s['sent']:>5} "
                f"{s['received']:>5} {s['group_sends']:>8} {s['group_copies']:>8} "
                f"{raised:>6} {dropped:>7}" + ("  (leader)" if s["is_leader"] else "")
            )
        g = self.stats[order[-1]][1]
        self.say(
            f"    host (global_statistics from {order[-1]}): participants {g['participants']}, "
            f"leader pid {g['leader_pid']}, sent {g['sent']}, received {g['received']}, "
            f"group_sends {g['group_sends']}, group_copies {g['group_copies']}"
        )
        self.say(f"        raised {g['raised']}, dropped {g['dropped']}")
        self.say(
            "        (received = sent + group_copies - what is still waiting: every "
            "group_send is delivered as one copy per member channel, counted as received)"
        )
        waiting = g["sent"] + g["group_copies"] - g["received"] - sum(g["dropped"].values())
        self.check(
            waiting >= 0,
            f"received {g['received']} = sent {g['sent']} + group copies "
            f"{g['group_copies']} - {waiting} not yet received",
        )
        self.check(
            g["participants"] == len(self.procs),
            f"{g['participants']} participants on the host (expected {len(self.procs)})",
        )
        same = all(g[k] == total[k] for k in ("sent", "received", "group_sends", "group_copies"))
        self.check(same, "the host totals equal the sum of the per-process counters")
        self.check(g["raised"].get("full") == 1, "exactly one ChannelFull raised on the host")
        self.check(sum(g["dropped"].values()) == 0, "no message dropped anywhere")
        members = N_WORKERS * CHANNELS_PER_WORKER
        self.check(
            g["group_sends"] == 2 and g["group_copies"] == 2 * members,
            f"2 group_sends became {g['group_copies']} copies (expected {2 * members})",
        )

    # ------------------------------------------------------------------ the end
    def shutdown(self) -> None:
        """Ask every child to close its layer and exit; make sure none is left running."""
        self.say()
        self.say(
            "[8] shutting down: every process calls layer.close(); the last one out "
            "removes the names"
        )
        self.deadline = max(self.deadline, time.monotonic() + 10.0)
        for p in self.procs.values():
            if p.process.is_alive():
                with contextlib.suppress(Exception):
                    p.cmds.put((0, "quit", ()))
        end = time.monotonic() + 10.0
        clean = True
        for p in self.procs.values():
            p.process.join(max(0.1, end - time.monotonic()))
            if p.process.is_alive():
                clean = False
                self.say(f"    {p.name} (pid {p.pid}) did not exit: terminating it")
                p.process.terminate()
                p.process.join(3)
                if p.process.is_alive():
                    p.process.kill()
                    p.process.join(3)
            self.say(f"    {p.name} (pid {p.pid}) exited with code {p.process.exitcode}")
        with contextlib.suppress(Exception):
            while self._pull(0.01):
                pass
        self.check(
            clean and all(p.process.exitcode == 0 for p in self.procs.values()),
            "every process closed its layer and exited cleanly",
        )
        after = shm_names(self.prefix)
        self.say(f"/dev/shm after: {', '.join(after) if after else 'no names for this prefix'}")
        self.check(not after, "the shared memory was removed by the last process out")
        if after:
            self.say("    removing the leftovers: attach to the stale set and close again")
            _remove_stale(self.cfg)
            self.say(f"    /dev/shm now: {', '.join(shm_names(self.prefix)) or 'clean'}")
        for p in self.procs.values():
            with contextlib.suppress(Exception):
                p.cmds.close()
                p.cmds.join_thread()
        with contextlib.suppress(Exception):
            self.events.close()
            self.events.join_thread()


def _remove_stale(cfg: dict[str, Any]) -> None:
    """Attach to a set nobody holds any more (it is reinitialised) and leave as the last one."""
    from hybrid_layer import HybridChannelLayer

    with contextlib.suppress(Exception):
        layer = HybridChannelLayer(**cfg)
        layer.statistics()  # attaches
        layer.close_sync()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hybrid_layer.demo", description=__doc__.splitlines()[0] if __doc__ else ""
    )
    parser.add_argument("--prefix", default="demo", help="CONFIG['prefix'] (default: demo)")
    parser.add_argument("--pings", type=int, default=300, help="round trips to time (300)")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    demo = Demo(args.prefix, max(1, args.pings))
    broken = ""
    try:
        demo.run()
    except DemoBroken as exc:
        broken = str(exc)
    except KeyboardInterrupt:
        broken = "interrupted"
    except Exception:
        broken = traceback.format_exc()
    finally:
        demo.shutdown()
    failed = [text for ok, text in demo.checks if not ok]
    print()
    if broken:
        print(f"DEMO BROKEN: {broken}")
    print(
        f"{len(demo.checks) - len(failed)}/{len(demo.checks)} checks passed in "
        f"{time.monotonic() - t0:.1f}s"
    )
    for text in failed:
        print(f"  FAILED: {text}")
    if broken:
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
