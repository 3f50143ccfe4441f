#!/usr/bin/env python
"""Benchmark hybrid_layer against the other Django Channels layers, process by process.

    python benchmarks/bench.py [--quick] [--runs 3] [--scenarios single,pingpong,...]
                               [--layers hybrid,redis,...] [--json]
                               [--rabbitmq-python benchmarks/.venv-rabbitmq/bin/python]

Every measurement runs in freshly spawned processes (``multiprocessing`` "spawn"), each
building its own layer object and using only the public channel layer API. The workers of
channels_rabbitmq run under a second interpreter (its own virtualenv: it needs pamqp 3,
hybrid_layer needs pamqp 4). See ``benchmarks/README.md`` for what each scenario does and
what every number means.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_report  # noqa: E402
import bench_worker  # noqa: E402

REDIS = ("127.0.0.1", 6379)
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
SHM_DIR = "/dev/shm"
HYBRID_HOST_ID = "bench"
# cross-host scenarios: hybrid in broker mode, two simulated hosts on this machine
XHOST_IDS = {"a": "ha", "b": "hb"}
LINK_WAIT = 30.0  # seconds a hybrid broker-mode worker waits for its host's link
WORKER_SCRIPT = os.path.join(HERE, "bench_worker.py")
RABBITMQ_VENV_PYTHON = os.path.join(HERE, ".venv-rabbitmq", "bin", "python")
RABBITMQ_PROBE = (
    "import json, platform, importlib.metadata as m\n"
    "import channels_rabbitmq.core, channels.exceptions\n"
    "v = {}\n"
    "for p in ('channels-rabbitmq', 'carehare', 'pamqp', 'channels', 'msgpack'):\n"
    "    try:\n"
    "        v[p] = m.version(p)\n"
    "    except m.PackageNotFoundError:\n"
    "        v[p] = 'not installed'\n"
    "print(json.dumps({'python': platform.python_version(), 'packages': v}))\n"
)

SIZES = {"100B": 100, "10KB": 10_000, "1MB": 1_000_000, "5MB": 5_000_000, "20MB": 20_000_000}
BIG = ("5MB", "20MB")  # large messages: pingpong and xpingpong only (--sizes 5MB,20MB)
FANOUT_SIZES = ("100B", "10KB")  # 1 MB x 100 members is not a fan-out workload
FANOUT_MEMBERS = 50  # per receiver process; two receivers -> a group of 100

SPIN_US = 100  # hybrid_spin's receive_spin_us
LAYERS = {
    # name: (kind, scenarios it can run, label)
    "hybrid": ("hybrid", None, "hybrid_layer.HybridChannelLayer (same host; broker mode "
               "with two host_ids in x-scenarios)"),
    "hybrid_spin": ("hybrid", {"pingpong", "throughput", "fanout-paced", "fanout-unpaced",
                               "xpingpong", "xthroughput"},
                    f"hybrid_layer.HybridChannelLayer with receive_spin_us={SPIN_US} (opt-in: "
                    "an idle receive() polls its inbox that long before sleeping)"),
    "inmemory": ("inmemory", {"single"}, "channels.layers.InMemoryChannelLayer"),
    "redis": ("redis", None, "channels_redis.core.RedisChannelLayer"),
    "redis_pubsub": ("redis_pubsub", None, "channels_redis.pubsub.RedisPubSubChannelLayer"),
    "rabbitmq": ("rabbitmq", None, "channels_rabbitmq.core.RabbitmqChannelLayer"),
}
LAYER_ALIASES = {"pubsub": "redis_pubsub", "memory": "inmemory", "rabbit": "rabbitmq"}

SCENARIOS = ("single", "pingpong", "throughput", "fanout-paced", "fanout-unpaced",
             "xpingpong", "xthroughput")
SCENARIO_ALIASES = {"fanout": ("fanout-paced", "fanout-unpaced"),
                    "cross": ("xpingpong", "xthroughput")}
CROSS = {"xpingpong", "xthroughput"}  # two simulated hosts: hybrid through RabbitMQ

# Per mode: how long / how many. Every loop stops at its count or its duration, whichever
# comes first, so a slow layer costs time, not a hang.
MODES: dict[str, dict[str, Any]] = {
    "full": {
        "single": {"duration": 1.0, "count": {"100B": 400_000, "10KB": 400_000, "1MB": 400},
                   "warmup": {"100B": 500, "10KB": 500, "1MB": 5}},
        "pingpong": {"duration": 1.0,
                     "count": {"100B": 5000, "10KB": 5000, "1MB": 60, "5MB": 20, "20MB": 8},
                     "warmup": {"100B": 200, "10KB": 200, "1MB": 5, "5MB": 2, "20MB": 1}},
        "throughput": {"duration": 1.5,
                       "count": {"100B": 1_000_000, "10KB": 1_000_000, "1MB": 100}},
        "fanout-paced": {"duration": 1.5, "rate": 100, "count": {"100B": 10**6, "10KB": 10**6}},
        "fanout-unpaced": {"duration": 1.5, "count": {"100B": 500, "10KB": 300}},
        "xpingpong": {"duration": 1.0,
                      "count": {"100B": 5000, "10KB": 5000, "1MB": 60, "5MB": 20, "20MB": 8},
                      "warmup": {"100B": 200, "10KB": 200, "1MB": 5, "5MB": 2, "20MB": 1}},
        "xthroughput": {"duration": 1.5,
                        "count": {"100B": 1_000_000, "10KB": 1_000_000, "1MB": 100}},
        "idle_s": 1.0, "straggler_cap_s": 10.0, "stall_s": 5.0,
        "sizes": ("100B", "10KB", "1MB"),
    },
    "quick": {
        "single": {"duration": 0.25, "count": {"100B": 100_000, "10KB": 100_000, "1MB": 40},
                   "warmup": {"100B": 200, "10KB": 200, "1MB": 2}},
        "pingpong": {"duration": 0.3,
                     "count": {"100B": 1000, "10KB": 1000, "1MB": 15, "5MB": 6, "20MB": 3},
                     "warmup": {"100B": 100, "10KB": 100, "1MB": 2, "5MB": 1, "20MB": 1}},
        "throughput": {"duration": 0.4,
                       "count": {"100B": 1_000_000, "10KB": 1_000_000, "1MB": 20}},
        "fanout-paced": {"duration": 0.5, "rate": 100, "count": {"100B": 10**6, "10KB": 10**6}},
        "fanout-unpaced": {"duration": 0.5, "count": {"100B": 200, "10KB": 100}},
        "xpingpong": {"duration": 0.3,
                      "count": {"100B": 1000, "10KB": 1000, "1MB": 15, "5MB": 6, "20MB": 3},
                      "warmup": {"100B": 100, "10KB": 100, "1MB": 2, "5MB": 1, "20MB": 1}},
        "xthroughput": {"duration": 0.4,
                        "count": {"100B": 1_000_000, "10KB": 1_000_000, "1MB": 20}},
        "idle_s": 0.5, "straggler_cap_s": 5.0, "stall_s": 4.0,
        "sizes": ("100B", "1MB"),  # --sizes 100B,10KB,1MB for all three
    },
}

READY_TIMEOUT = 60.0  # spawning + importing + connecting, on a loaded 2-core box
RETRY_SLEEP = 0.001  # producers: sleep after ChannelFull, then retry the same message
ECHO_GRACE = 1.0  # after the pinger reported, how long the echo may take to notice
CLOSE_TIMEOUT = 10.0


# ---------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def port_open(addr: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(addr, timeout=1.0):
            return True
    except OSError:
        return False


def shm_names(prefix: str) -> list[str]:
    marker = f".{prefix}."
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if marker in n)
    except OSError:
        return []


def shm_usage(prefix: str) -> dict[str, int]:
    size = resident = 0
    names = shm_names(prefix)
    for n in names:
        try:
            st = os.stat(os.path.join(SHM_DIR, n))
        except OSError:
            continue
        size += st.st_size
        resident += st.st_blocks * 512
    return {"shm_names": len(names), "shm_bytes": size, "shm_resident_bytes": resident}


_tags = itertools.count(1)


def unique_tag() -> str:
    return f"b{os.getpid()}x{next(_tags)}"


def layer_config(layer: str, tag: str, host: str | None = None) -> dict[str, Any]:
    """Constructor arguments (plus "kind") of one worker's layer. ``host`` ("a"/"b"): the
    simulated host of a cross-host scenario; only hybrid needs to know (broker mode)."""
    kind = LAYERS[layer][0]
    if kind == "hybrid":
        extra = {"receive_spin_us": SPIN_US} if layer == "hybrid_spin" else {}
        if host is not None:
            return {"kind": kind, "prefix": tag, "host_id": XHOST_IDS[host], "host": AMQP_URL,
                    **extra}
        return {"kind": kind, "prefix": tag, "host_id": HYBRID_HOST_ID, **extra}
    if kind == "inmemory":
        return {"kind": kind}
    if kind in ("redis", "redis_pubsub"):
        return {"kind": kind, "hosts": [REDIS], "prefix": tag}
    if kind == "rabbitmq":
        return {"kind": kind, "host": AMQP_URL}
    raise ValueError(layer)


def roles_for(scenario: str, size: str, mode: dict[str, Any], tag: str) -> list[tuple]:
    """[(process name, role, params, simulated host or None)] for one measurement.

    Cross-host scenarios put the initiator / the producers on host "a" and the echo /
    the consumer on host "b"."""
    sc = mode[scenario]
    base = {"size": SIZES[size], "duration": sc["duration"], "count": sc["count"][size]}
    if scenario == "single":
        return [("single", "single", {**base, "warmup": sc["warmup"][size]}, None)]
    if scenario in ("pingpong", "xpingpong"):
        x = scenario == "xpingpong"
        return [("ping", "ping", {**base, "warmup": sc["warmup"][size]}, "a" if x else None),
                ("echo", "echo", {**base, "watchdog": False}, "b" if x else None)]
    if scenario in ("throughput", "xthroughput"):
        x = scenario == "xthroughput"
        out = [("consumer", "consumer", dict(base), "b" if x else None)]
        for i in range(2):
            out.append((f"producer{i}", "producer",
                        {**base, "index": i, "retry_sleep": RETRY_SLEEP}, "a" if x else None))
        return out
    if scenario.startswith("fanout"):
        group = f"bench-{tag}"
        rate = sc.get("rate")
        count = sc["count"][size]
        if rate:
            count = min(count, int(rate * sc["duration"]))
        out = [("sender", "sender", {**base, "count": count, "group": group, "rate": rate},
                None)]
        for i in range(2):
            out.append((f"receiver{i}", "receiver",
                        {**base, "group": group, "members": FANOUT_MEMBERS}, None))
        return out
    raise ValueError(scenario)


SOURCES = {"producer", "sender"}
SINKS = {"consumer", "receiver"}


class ExternalWorker:
    """A worker under another interpreter: ``python -I bench_worker.py --fd N``.

    Same surface as the ``multiprocessing.Process`` objects the orchestrator uses (pid,
    join, is_alive, kill) and the same control pipe: a ``multiprocessing`` duplex pipe
    (a socketpair) whose child end the worker inherits; the spec goes first, as a dict.
    ``-I`` keeps the orchestrator's environment (PYTHONPATH, user site) out of it."""

    def __init__(self, python: str, spec: bench_worker.Spec, name: str) -> None:
        self.name = name
        parent, child = mp.Pipe()
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        try:
            self.proc = subprocess.Popen(
                [python, "-I", WORKER_SCRIPT, "--fd", str(child.fileno())],
                pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, env=env,
            )
        finally:
            child.close()
        self.pid = self.proc.pid
        self.conn = parent
        parent.send(asdict(spec))

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


# ---------------------------------------------------------------------------- one measurement
class Measurement:
    def __init__(self, layer: str, scenario: str, size: str, run: int, mode: dict[str, Any],
                 python: str | None = None):
        self.layer, self.scenario, self.size, self.run = layer, scenario, size, run
        self.mode = mode
        self.tag = unique_tag()
        self.python = python  # another interpreter for this layer's workers (rabbitmq)
        self.notes: list[str] = []

    def _params(self, params: dict[str, Any]) -> dict[str, Any]:
        sc = self.mode[self.scenario]
        run_timeout = sc["duration"] + self.mode["straggler_cap_s"] + 30.0
        return {
            **params, "ready_timeout": READY_TIMEOUT, "run_timeout": run_timeout,
            "stall_s": self.mode["stall_s"], "idle_s": self.mode["idle_s"],
            "straggler_cap_s": self.mode["straggler_cap_s"],
            "close_wait_s": READY_TIMEOUT + run_timeout, "close_timeout_s": CLOSE_TIMEOUT,
        }

    def execute(self) -> dict[str, Any]:
        ctx = mp.get_context("spawn")
        roles = roles_for(self.scenario, self.size, self.mode, self.tag)
        procs: dict[str, Any] = {}
        conns: dict[str, Any] = {}
        role_of: dict[str, str] = {}
        self.shm, self.phases = {}, {}
        t_start = time.monotonic()
        for idx, (name, role, params, host) in enumerate(roles):
            params = self._params(params)
            params["cleanup"] = idx == 0  # one process deletes the run's Redis keys
            cfg = layer_config(self.layer, self.tag, host)
            if "host" in cfg and cfg["kind"] == "hybrid":
                params["wait_link"] = LINK_WAIT
            spec = bench_worker.Spec(layer=cfg, role=role, name=name, params=params)
            if self.python:
                try:
                    w = ExternalWorker(self.python, spec, name)
                except OSError as exc:
                    self.notes.append(f"cannot start {name} with {self.python}: {exc}")
                    self._reap(procs, conns)
                    return self._summarise({n: {"status": "error"} for n in role_of} | {
                        name: {"status": "error", "error": str(exc)}}, {}, {
                        **role_of, name: role}, time.monotonic() - t_start)
                procs[name], conns[name], role_of[name] = w, w.conn, role
                continue
            parent, child = ctx.Pipe()
            p = ctx.Process(target=bench_worker.main, args=(spec, child),
                            name=f"bench-{self.layer}-{name}", daemon=True)
            p.start()
            child.close()
            procs[name], conns[name], role_of[name] = p, parent, role
        try:
            results, closed = self._drive(procs, conns, role_of)
        finally:
            killed = self._reap(procs, conns)
        if killed:
            self.notes.append(f"killed unresponsive worker(s): {', '.join(killed)}")
        return self._summarise(results, closed, role_of, time.monotonic() - t_start)

    def _drive(self, procs: dict, conns: dict, role_of: dict) -> tuple[dict, dict]:
        names = list(procs)
        infos: dict[str, Any] = {}
        done: dict[str, Any] = {}
        results: dict[str, Any] = {}
        closed: dict[str, Any] = {}
        eof: set[str] = set()
        phase = "ready"
        sc = self.mode[self.scenario]
        run_budget = sc["duration"] + self.mode["straggler_cap_s"] + 25.0
        deadline = time.monotonic() + READY_TIMEOUT
        echo_deadline = None
        stopped = False
        expect_sent = False
        self.shm: dict[str, int] = {}
        t0 = time.monotonic()
        self.phases: dict[str, float] = {}

        def send(name: str, verb: str, arg: Any = None) -> None:
            if name in eof:
                return
            try:
                conns[name].send((verb, arg))
            except (BrokenPipeError, OSError):
                eof.add(name)

        def stop_all(why: str) -> None:
            nonlocal stopped, deadline
            if not stopped:
                self.notes.append(why)
                stopped = True
                for n in names:
                    if n not in results:
                        send(n, "stop")
                deadline = time.monotonic() + 15.0

        while True:
            if phase == "close":
                if all(n in closed or n in eof for n in names):
                    break
            elif all(n in results or n in eof for n in names):
                # everybody measured and is still attached: now /dev/shm is the layer's
                self.shm = shm_usage(self.tag)
                self.phases["run_s"] = time.monotonic() - t0 - self.phases.get("start_s", 0)
                phase = "close"
                deadline = time.monotonic() + CLOSE_TIMEOUT + 10.0
                for n in names:
                    send(n, "close")
                continue
            live = [conns[n] for n in names if n not in eof]
            if not live:
                break
            timeout = max(0.0, deadline - time.monotonic())
            if echo_deadline is not None:
                timeout = min(timeout, max(0.0, echo_deadline - time.monotonic()))
            ready = mp.connection.wait(live, timeout=timeout)
            now = time.monotonic()
            if not ready:
                if echo_deadline is not None and now >= echo_deadline:
                    echo_deadline = None
                    for n in names:
                        if n not in results:
                            send(n, "stop")
                    continue
                if phase == "ready":
                    missing = [n for n in names if n not in infos]
                    self.notes.append(f"not ready within {READY_TIMEOUT:.0f}s: {missing}")
                    for n in names:  # give up; let them report and close
                        send(n, "stop")
                    phase = "run"
                    stopped = True
                    deadline = now + 15.0
                    continue
                if phase == "run" and not stopped:
                    stop_all(f"measurement exceeded {run_budget:.0f}s: stopped")
                    continue
                self.notes.append(f"no answer in phase {phase!r}; giving up on the workers")
                break
            for c in ready:
                name = next(n for n in names if conns[n] is c)
                try:
                    verb, arg = c.recv()
                except (EOFError, OSError):
                    eof.add(name)
                    if name not in results:
                        results[name] = {"status": "crashed", "error": "process exited"}
                    if phase != "close" and role_of[name] in SOURCES and name not in done:
                        done[name] = {"sent": 0, "crashed": True}
                    if phase == "ready":  # a worker died before "ready": abandon the run
                        self.notes.append(f"{name} exited before it was ready")
                        for n in names:
                            send(n, "stop")
                        phase = "run"
                        stopped = True
                        deadline = time.monotonic() + 15.0
                    continue
                if verb == "ready":
                    infos[name] = arg
                    if phase == "ready" and len(infos) == len(names):
                        for n in names:
                            send(n, "go", infos)
                        phase = "run"
                        deadline = time.monotonic() + run_budget
                        self.phases["start_s"] = time.monotonic() - t0
                elif verb == "done":
                    done[name] = arg
                elif verb == "result":
                    results[name] = arg
                    if phase == "ready":  # failed before "ready" (e.g. cannot connect)
                        self.notes.append(f"{name} gave up before it was ready")
                        for n in names:
                            send(n, "stop")
                        phase = "run"
                        stopped = True
                        deadline = time.monotonic() + 15.0
                    if role_of[name] == "ping":
                        echo_deadline = time.monotonic() + ECHO_GRACE
                elif verb == "closed":
                    closed[name] = arg
                elif verb == "crashed":
                    results.setdefault(name, {"status": "crashed", "error": arg})
                    closed.setdefault(name, {})
            sources = [n for n in names if role_of[n] in SOURCES]
            if sources and not expect_sent and all(n in done for n in sources):
                total = sum(done[n].get("sent", 0) for n in sources)
                expect_sent = True
                for n in names:
                    if role_of[n] in SINKS:
                        send(n, "expect", total)
        return results, closed

    def _reap(self, procs: dict, conns: dict) -> list[str]:
        killed = []
        end = time.monotonic() + 5.0
        for name, p in procs.items():
            p.join(max(0.1, end - time.monotonic()))
            if p.is_alive():  # only ever a process this harness started
                p.kill()
                p.join(2.0)
                killed.append(f"{name} (pid {p.pid})")
        for c in conns.values():
            c.close()
        return killed

    # ------------------------------------------------------------------ metrics
    def _summarise(self, results: dict, closed: dict, role_of: dict,
                   wall: float) -> dict[str, Any]:
        m: dict[str, Any] = {}
        statuses = {n: r.get("status", "missing") for n, r in results.items()}
        for n in role_of:
            statuses.setdefault(n, "missing")
        sc = self.scenario
        if sc == "single":
            r = results.get("single", {})
            m.update({k: r.get(k) for k in ("pairs_per_s", "pairs", "seconds", "lost")})
        elif sc in ("pingpong", "xpingpong"):
            r = results.get("ping", {})
            for k in ("p50_us", "p90_us", "p99_us", "max_us", "mean_us", "round_trips",
                      "lost", "mismatched"):
                m[k] = r.get(k)
            m["echoed"] = results.get("echo", {}).get("echoed")
        elif sc in ("throughput", "xthroughput"):
            c = results.get("consumer", {})
            prods = [results.get(n, {}) for n in role_of if role_of[n] == "producer"]
            sent = sum(p.get("sent", 0) for p in prods)
            m.update(
                msgs_per_s=c.get("msgs_per_s"), received=c.get("received"), sent=sent,
                lost=max(0, sent - (c.get("received") or 0)),
                retries=sum(p.get("retries", 0) for p in prods),
                send_errors=sum(p.get("errors", 0) for p in prods),
                dup_or_reorder=c.get("dup_or_reorder"),
                straggler_timeout=c.get("straggler_timeout"), seconds=c.get("seconds"),
            )
            for p in prods:
                if p.get("first_error"):
                    self.notes.append(f"producer error: {p['first_error']}")
        else:  # fanout
            s = results.get("sender", {})
            recs = [results.get(n, {}) for n in role_of if role_of[n] == "receiver"]
            lat: list[int] = []
            for r in recs:
                lat.extend(r.pop("latencies_ns", []) or [])
            delivered = sum(r.get("delivered", 0) for r in recs)
            sent = s.get("sent", 0)
            expected = sent * FANOUT_MEMBERS * len(recs)
            last = max((r.get("last_ns", 0) for r in recs), default=0)
            t0 = s.get("t0_ns", 0)
            dt = (last - t0) / 1e9 if last and t0 and last > t0 else 0.0
            q = bench_worker.quantiles_us(lat)
            m.update(
                deliveries_per_s=delivered / dt if dt > 0 else 0.0, group_sends=sent,
                group_sends_per_s=s.get("sent", 0) / s["send_seconds"]
                if s.get("send_seconds") else None,
                delivered=delivered, expected=expected, lost=max(0, expected - delivered),
                dup_or_reorder=sum(r.get("dup_or_reorder", 0) for r in recs),
                seconds=dt, rate_target=s.get("rate_target"),
                p50_us=q.get("p50_us"), p90_us=q.get("p90_us"), p99_us=q.get("p99_us"),
                max_us=q.get("max_us"),
            )
            if s.get("first_error"):
                self.notes.append(f"sender error: {s['first_error']}")
        # memory
        rss = {n: r.get("vmrss_kb") for n, r in results.items() if r.get("vmrss_kb")}
        m["rss_kb"] = rss
        m["rss_max_kb"] = max(rss.values()) if rss else None
        m["rss_total_kb"] = sum(rss.values()) if rss else None
        m.update(self.shm)
        # hybrid_layer's own counters: where a lost message went (dropped full, link...)
        lstats = {n: c["layer_stats"] for n, c in closed.items() if c.get("layer_stats")}
        if lstats:
            m["layer_stats"] = lstats
            for n, ls in lstats.items():
                role = f"{n}{' (leader)' if ls.get('is_leader') else ''}"
                if ls.get("dropped"):
                    self.notes.append(f"{role}: hybrid_layer dropped {ls['dropped']}")
                if ls.get("error"):
                    self.notes.append(f"{role}: statistics() failed: {ls['error']}")
        m["wall_s"] = wall
        m["phases_s"] = self.phases
        # anything odd
        for n, st in statuses.items():
            if st != "ok":
                self.notes.append(f"{n}: {st}")
            r = results.get(n, {})
            if r.get("error"):
                self.notes.append(f"{n} error: {r['error'].strip().splitlines()[-1][:300]}")
            if r.get("log_warnings"):
                first = "; ".join(r.get("log_first", [])[:2])
                self.notes.append(f"{n}: {r['log_warnings']} log warnings ({first})")
        for n, c in closed.items():
            if c.get("close_error"):
                self.notes.append(f"{n}: close failed: {c['close_error']}")
            if c.get("threads_left"):
                self.notes.append(f"{n}: threads alive after close: {c['threads_left']}")
            if c.get("tasks_left"):
                self.notes.append(f"{n}: {c['tasks_left']} asyncio tasks left after close")
        m["close_s_max"] = max((c.get("close_s", 0) for c in closed.values()), default=None)
        leaked = shm_names(self.tag)
        if leaked:
            self.notes.append(f"/dev/shm names left after every process exited: {leaked}")
            for n in leaked:  # this run's unique prefix: ours to remove
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(SHM_DIR, n))
        m["shm_leaked"] = len(leaked)
        status = "ok"
        for st in statuses.values():
            if st != "ok":
                status = st if status == "ok" else status
        if status == "ok" and (m.get("lost") or 0) > 0:
            status = "loss"
        return {
            "layer": self.layer, "scenario": self.scenario, "size": self.size,
            "run": self.run, "status": status, "prefix": self.tag, "metrics": m,
            "notes": self.notes,
        }


# ---------------------------------------------------------------------------- driver
def probe_rabbitmq_python(given: str | None) -> tuple[dict[str, Any], str]:
    """({python_path, python, packages}, "") for the interpreter of the channels_rabbitmq
    workers, or ({}, why it cannot be used)."""
    python = os.path.abspath(given or RABBITMQ_VENV_PYTHON)  # not realpath: a venv's link
    if not os.path.exists(python):
        return {}, (f"no interpreter for channels_rabbitmq: {python} does not exist "
                    "(`make bench` creates benchmarks/.venv-rabbitmq; or pass "
                    "--rabbitmq-python). "
                    "It cannot share hybrid_layer's virtualenv: channels_rabbitmq -> carehare "
                    "needs pamqp<4, aiormq (hybrid_layer) needs pamqp>=4")
    try:
        out = subprocess.run([python, "-I", "-c", RABBITMQ_PROBE], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return {}, f"cannot run {python}: {type(exc).__name__}: {exc}"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {}, f"{python} cannot import channels_rabbitmq: {last}"
    try:
        info = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}, f"{python}: unexpected probe output {out.stdout[:200]!r}"
    return {"python_path": python, **info}, ""


def parse_list(value: str, known: Any, aliases: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        expanded = aliases.get(item, item)
        for x in (expanded if isinstance(expanded, tuple) else (expanded,)):
            if x not in known:
                raise SystemExit(f"unknown name {item!r}; choose from {sorted(known)}")
            if x not in out:
                out.append(x)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--quick", action="store_true", help="short runs (about 2 minutes)")
    ap.add_argument("--runs", type=int, default=3, help="repetitions (median over them)")
    ap.add_argument("--scenarios", default=",".join(("single", "pingpong", "throughput",
                                                     "fanout", "cross")),
                    help="single,pingpong,throughput,fanout (= fanout-paced,fanout-unpaced),"
                         "cross (= xpingpong,xthroughput: two host_ids through RabbitMQ)")
    ap.add_argument("--layers",
                    default="hybrid,hybrid_spin,inmemory,redis,redis_pubsub,rabbitmq",
                    help="hybrid,hybrid_spin,inmemory,redis,redis_pubsub,rabbitmq")
    ap.add_argument("--sizes", help="100B,10KB,1MB (default: all; --quick: 100B,1MB)")
    ap.add_argument("--fanout-rate", type=float, default=None,
                    help="group_sends per second in fanout-paced (default 100: 10k "
                    "deliveries/s to the group of 100)")
    ap.add_argument("--json", action="store_true", help="one JSON object per measurement")
    ap.add_argument("--out", help="results file stem (default benchmarks/results/"
                    "<date>-<hostname>[-quick])")
    ap.add_argument("--rabbitmq-python", default=None,
                    help="interpreter that runs the channels_rabbitmq workers (it cannot share "
                    "a virtualenv with hybrid_layer: pamqp 3 vs 4); default "
                    "benchmarks/.venv-rabbitmq/bin/python, which `make bench` creates")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")

    mode_name = "quick" if args.quick else "full"
    mode = json.loads(json.dumps(MODES[mode_name]))  # a copy the options may change
    if args.fanout_rate is not None:
        if args.fanout_rate <= 0:
            ap.error("--fanout-rate must be positive")
        mode["fanout-paced"]["rate"] = args.fanout_rate
    scenarios = parse_list(args.scenarios, SCENARIOS, SCENARIO_ALIASES)
    layers = parse_list(args.layers, LAYERS, LAYER_ALIASES)
    sizes = parse_list(args.sizes or ",".join(mode["sizes"]), SIZES, {})
    skipped: dict[str, str] = {}
    if ("redis" in layers or "redis_pubsub" in layers) and not port_open(REDIS):
        for name in ("redis", "redis_pubsub"):
            if name in layers:
                skipped[name] = f"Redis not reachable at {REDIS[0]}:{REDIS[1]}"
    amqp_up = port_open(("127.0.0.1", 5672))
    if "rabbitmq" in layers and not amqp_up:
        skipped["rabbitmq"] = "RabbitMQ not reachable at 127.0.0.1:5672"
    rabbitmq_env: dict[str, Any] = {}
    if "rabbitmq" in layers and "rabbitmq" not in skipped:
        rabbitmq_env, why = probe_rabbitmq_python(args.rabbitmq_python)
        if why:
            skipped["rabbitmq"] = why
    if {"hybrid", "hybrid_spin"} & set(layers) and CROSS & set(scenarios) and not amqp_up:
        skipped["hybrid (xpingpong, xthroughput)"] = (
            "RabbitMQ not reachable at 127.0.0.1:5672: broker mode cannot run")
    notes: list[str] = []
    if "inmemory" in layers:
        notes.append("InMemoryChannelLayer runs `single` only: it cannot cross processes.")
    if args.runs < 3:
        notes.append(f"only {args.runs} run(s): the spread (min-max) says little.")

    plan = []
    for run in range(args.runs):
        for sc in scenarios:
            for size in sizes:
                if sc.startswith("fanout") and size not in FANOUT_SIZES:
                    continue
                if size in BIG and sc not in ("pingpong", "xpingpong"):
                    continue
                for layer in layers:
                    allowed = LAYERS[layer][1]
                    if layer in skipped or (allowed is not None and sc not in allowed):
                        continue
                    if LAYERS[layer][0] == "hybrid" and sc in CROSS and not amqp_up:
                        continue
                    plan.append((layer, sc, size, run))

    machine = bench_report.machine_info()
    started = time.time()
    load_start = os.getloadavg()
    log(f"bench: {len(plan)} measurements ({mode_name}, {args.runs} runs) on "
        f"{machine['hostname']}; load average {load_start[0]:.2f}")
    for name, why in skipped.items():
        log(f"bench: skipping {name}: {why}")
    records: list[dict[str, Any]] = []
    consecutive_errors: dict[str, int] = {}
    try:
        for i, (layer, sc, size, run) in enumerate(plan, 1):
            if layer in skipped:
                continue
            python = rabbitmq_env.get("python_path") if layer == "rabbitmq" else None
            rec = Measurement(layer, sc, size, run, mode, python).execute()
            records.append(rec)
            if args.json:
                print(json.dumps(rec, default=str), flush=True)
            log(f"[{i}/{len(plan)}] " + bench_report.one_line(rec))
            if rec["status"] in ("error", "crashed", "missing"):
                consecutive_errors[layer] = consecutive_errors.get(layer, 0) + 1
                if consecutive_errors[layer] >= 3:
                    skipped[layer] = ("three measurements in a row failed; last: "
                                      + "; ".join(rec["notes"])[:500])
                    log(f"bench: giving up on {layer}: {skipped[layer]}")
            else:
                consecutive_errors[layer] = 0
    except KeyboardInterrupt:
        notes.append("interrupted: partial results")
        log("bench: interrupted; writing partial results")
    finished = time.time()
    commit_end = bench_report.code_state()
    if commit_end != (machine["git_commit"], machine["git_dirty_hybrid_layer"]):
        notes.append(
            f"hybrid_layer changed during the run (commit {machine['git_commit']}"
            f"{' + local edits' if machine['git_dirty_hybrid_layer'] else ''} at the start, "
            f"{commit_end[0]}{' + local edits' if commit_end[1] else ''} at the end): the "
            "runs may mix code versions"
        )
    meta = {
        "mode": mode_name, "runs": args.runs, "scenarios": scenarios, "layers": layers,
        "sizes": sizes, "settings": mode, "skipped": skipped, "notes": notes,
        "started": started, "finished": finished, "elapsed_s": finished - started,
        "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": machine, "layer_labels": {k: v[2] for k, v in LAYERS.items()},
        "retry_sleep_s": RETRY_SLEEP, "fanout_members": FANOUT_MEMBERS * 2,
        "redis": f"{REDIS[0]}:{REDIS[1]}", "amqp": AMQP_URL.replace("guest:guest@", ""),
        "rabbitmq_worker_env": rabbitmq_env, "cross_host_ids": XHOST_IDS,
    }
    summary = bench_report.summarise(records, meta)
    stem = args.out or os.path.join(
        HERE, "results",
        time.strftime("%Y-%m-%d", time.localtime(started)) + "-" + machine["hostname"]
        + ("-quick" if args.quick else ""),
    )
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    md = bench_report.markdown(summary, meta)
    with open(stem + ".md", "w") as f:
        f.write(md)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "summary": summary, "records": records}, f, indent=1,
                  default=str)
    if not args.json:
        print(bench_report.text_table(summary, meta))
    log(f"bench: wrote {stem}.md and {stem}.json in {finished - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
