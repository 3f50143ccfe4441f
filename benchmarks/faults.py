"""Fault benchmark: what each cross-host transition costs, counted exactly.

Two simulated hosts (two ``host_id``s, separate spawned processes, the real RabbitMQ
at 127.0.0.1:5672). A sender on host "ha" sends steady traffic to a channel of a
receiver on host "hb" that is NOT its host's leader: direct ``send``s (sender id and
sequence number in each message) and a ``group_send`` every 10th message to a group the
receiver's channel is in. Then one transition happens, and for each scenario this
prints, per kind (direct, group):

* accepted: ``send``/``group_send`` returned without ``ChannelFull``;
* refused: ``ChannelFull`` raised (the sender knows);
* delivered: distinct messages received;
* counted: drops in the layer's statistics on every surviving process (all reasons);
* lost: accepted and never delivered; ``uncounted`` = lost - counted (never negative);
* duplicated, reordered: exact, from (sender, sequence);
* pause: the longest time without a delivery from the fault on (how long traffic
  stopped); for ``cold``, the time from the first send to the first delivery.

Scenarios: ``cold`` (both hosts fresh, two senders start at once, no warm-up, 5 000
messages each), ``kill-recv-leader`` and ``kill-send-leader`` (SIGKILL under 1 000
direct/s + 100 group/s), ``cut-1s`` and ``cut-5s`` (the sending host's link through our
TCP proxy: connections reset and refused for that long). ``node-loss``,
``cluster-restart`` and ``same-host-id`` need RabbitMQ nodes of our own or separate IPC
namespaces and are covered by tests (tests/broker/test_transitions.py); this script says
so instead of measuring them.

    .venv/bin/python benchmarks/faults.py [--scenarios a,b] [--json] [--out PATH]

Traffic goes only to 127.0.0.1; everything started is stopped; queues are deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench_report import machine_info  # noqa: E402

from tests.broker.proxy import Proxy  # noqa: E402
from tests.remote import Remote, wait_until  # noqa: E402

BROKER = "amqp://guest:guest@127.0.0.1:5672/"
RATE = 1000  # direct messages per second (and a group_send every 10th)
SECONDS = 6.0
FAULT_AT = 2.0
NOT_HERE = {
    "node-loss": "needs a RabbitMQ cluster of our own (tests/broker: not in this script)",
    "cluster-restart": "needs a RabbitMQ cluster of our own (tests/broker: not in this script)",
    "same-host-id": "a clash is refused, never shared: test_same_host_id_on_a_second_host_"
    "is_refused_loudly (nothing to count: the second host sends and receives nothing)",
}


class Run:
    """The processes of one scenario, each with a unique prefix; closed at the end."""

    def __init__(self) -> None:
        self.prefix = "f" + uuid.uuid4().hex[:11]
        self.procs: list[Remote] = []
        self.hosts: set[str] = set()

    def proc(self, host_id: str, **over: Any) -> Remote:
        cfg = {
            "prefix": self.prefix,
            "host_id": host_id,
            "host": BROKER,
            "expiry": 30,
            "heartbeat": 2,
            "capacity": 100_000,
            "host_queue_expires": 60,
            **over,
        }
        r = Remote(cfg)
        self.procs.append(r)
        self.hosts.add(host_id)
        return r

    def drops(self) -> int:
        total = 0
        for r in self.procs:
            if r.proc.is_alive():
                d = r.call("stats").dropped
                total += sum(v for k, v in d.items() if k != "flushed")
        return total

    def close(self) -> None:
        for r in self.procs:
            r.close()
        _delete_queues([f"{self.prefix}.{h}" for h in self.hosts])


def _delete_queues(names: list[str]) -> None:
    import asyncio

    import aiormq

    async def run() -> None:
        conn = await aiormq.connect(BROKER)
        try:
            for n in names:
                ch = await conn.channel()
                with contextlib.suppress(Exception):  # (already gone)
                    await ch.queue_delete(n)
        finally:
            await conn.close()

    asyncio.run(run())


def leader_of(rs: list[Remote]) -> Remote:
    return next(r for r in rs if r.call("internals")["is_leader"])


def tally(
    accepted: dict[int, list[int]],
    refused: int,
    got: list[tuple[dict[str, Any], float]],
    counted: int,
    fault_t: float | None,
) -> dict[str, Any]:
    seen: dict[int, list[int]] = {}
    for m, _ in got:
        seen.setdefault(m["s"], []).append(m["n"])
    n_acc = sum(len(v) for v in accepted.values())
    delivered = dup = reorder = lost = 0
    for s, acc in accepted.items():
        g = seen.get(s, [])
        delivered += len(set(g))
        dup += len(g) - len(set(g))
        reorder += sum(1 for a, b in itertools.pairwise(g) if b < a)
        lost += len(set(acc) - set(g))
    flow = None
    if fault_t is not None:  # the longest pause in deliveries from the fault on
        times = sorted(t for _, t in got if t >= fault_t)
        if times:
            flow = round(max(b - a for a, b in itertools.pairwise([fault_t, *times])), 3)
    return {
        "accepted": n_acc,
        "refused": refused,
        "delivered": delivered,
        "counted": counted,
        "lost": lost,
        "uncounted": max(0, lost - counted),
        "duplicated": dup,
        "reordered": reorder,
        "pause_s": flow,
    }


def steady(
    fault: Callable[[Run, dict[str, list[Remote]]], None], *, send_via_proxy: bool = False
) -> dict[str, Any]:
    """hb: a leader and the receiver; ha: a leader and the sender; steady traffic, the
    fault at FAULT_AT s, then SECONDS of traffic in all and a drain."""
    run = Run()
    proxy = Proxy() if send_via_proxy else None
    try:
        hb = [run.proc("hb"), run.proc("hb")]
        hb[0].call("wait_link", 15.0, timeout=20)
        rcv = hb[1]
        over = {"host": proxy.url, "heartbeat": 1} if proxy else {}
        ha = [run.proc("ha", **over), run.proc("ha", **over)]
        ha[0].call("wait_link", 15.0, timeout=20)
        snd = ha[1]
        ch = rcv.call("new_channel")
        rcv.call("group_add", "room", ch)
        rcv.call("collect_timed", ch)
        time.sleep(0.3)
        snd.call("paced", ch, "room", 1, RATE, SECONDS)
        time.sleep(FAULT_AT)
        fault_t = time.time()
        fault(run, {"ha": ha, "hb": hb, "proxy": [proxy] if proxy else []})  # type: ignore[dict-item]
        res = snd.call("paced_result", timeout=SECONDS + 60)
        expected = len(res["accepted"]) + len(res["groups"])
        wait_until(lambda: len(rcv.call("collected", ch)) >= expected, 20, 0.2)
        time.sleep(1.0)
        got = [tuple(x) for x in rcv.call("collected", ch)]
        counted = run.drops()
        direct = tally(
            {1: res["accepted"]}, res["full"], [g for g in got if g[0]["s"] == 1], counted, fault_t
        )
        # the drop counters do not say which kind they were: what the direct messages'
        # losses do not explain is left for the group's
        left = max(0, counted - direct["lost"])
        group = tally({-2: res["groups"]}, 0, [g for g in got if g[0]["s"] == -2], left, None)
        return {"direct": direct, "group": group}
    finally:
        run.close()
        if proxy is not None:
            proxy.close()


def kill_leader(side: str) -> Callable[[Run, dict[str, list[Remote]]], None]:
    def fault(run: Run, hosts: dict[str, list[Remote]]) -> None:
        leader_of(hosts[side]).kill()

    return fault


def cut(seconds: float) -> Callable[[Run, dict[str, list[Remote]]], None]:
    def fault(run: Run, hosts: dict[str, list[Remote]]) -> None:
        (proxy,) = hosts["proxy"]
        proxy.refuse()  # type: ignore[attr-defined]
        proxy.cut()  # type: ignore[attr-defined]
        time.sleep(seconds)
        proxy.accept()  # type: ignore[attr-defined]

    return fault


def cold() -> dict[str, Any]:
    """Both hosts fresh: the receiver's host attaches (its queue may not exist yet),
    then two senders on the other fresh host send 5 000 each at once."""
    n = 5000
    run = Run()
    try:
        hb = [run.proc("hb"), run.proc("hb")]
        hb[0].call("pid")
        ch = hb[1].call("new_channel")
        hb[1].call("collect_timed", ch)
        ha = [run.proc("ha"), run.proc("ha")]
        t0 = time.time()
        for i, r in enumerate(ha):
            r.start_call(
                "send_many", ch, [{"type": "m", "s": i, "n": k, "t": t0} for k in range(n)]
            )
        sent = [r.result(120) for r in ha]
        accepted = {i: list(range(k)) for i, k in enumerate(sent)}
        refused = 2 * n - sum(sent)
        wait_until(lambda: len(hb[1].call("collected", ch)) >= sum(sent), 30, 0.2)
        time.sleep(1.0)
        got = [tuple(x) for x in hb[1].call("collected", ch)]
        out = tally(accepted, refused, got, run.drops(), None)  # type: ignore[arg-type]
        out["pause_s"] = round(min(t for _, t in got) - t0, 3) if got else None
        return {"direct": out}
    finally:
        run.close()


SCENARIOS: dict[str, Callable[[], dict[str, Any]]] = {
    "cold": cold,
    "kill-recv-leader": lambda: steady(kill_leader("hb")),
    "kill-send-leader": lambda: steady(kill_leader("ha")),
    "cut-1s": lambda: steady(cut(1.0), send_via_proxy=True),
    "cut-5s": lambda: steady(cut(5.0), send_via_proxy=True),
}


def table(results: dict[str, Any]) -> str:
    cols = [
        "accepted",
        "refused",
        "delivered",
        "counted",
        "lost",
        "uncounted",
        "duplicated",
        "reordered",
        "pause_s",
    ]
    lines = ["| scenario | kind | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, res in results.items():
        if "skipped" in res:
            lines.append(f"| {name} | — | not measured here: {res['skipped']} |")
            continue
        for kind, row in res.items():
            lines.append(f"| {name} | {kind} | " + " | ".join(str(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", default=",".join([*SCENARIOS, *NOT_HERE]))
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--out", help="write <out>.json and <out>.md (results file)")
    args = ap.parse_args()
    results: dict[str, Any] = {}
    for name in args.scenarios.split(","):
        if name in NOT_HERE:
            results[name] = {"skipped": NOT_HERE[name]}
            continue
        if name not in SCENARIOS:
            ap.error(f"unknown scenario {name!r}; known: {', '.join([*SCENARIOS, *NOT_HERE])}")
        t0 = time.monotonic()
        results[name] = SCENARIOS[name]()
        print(f"{name}: done in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    doc = {
        "machine": machine_info(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "results": results,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(table(results))
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(doc, f, indent=2)
        m = doc["machine"]
        rabbit = m.get("servers", {}).get("rabbitmq", "?")
        head = (
            f"# Fault benchmark, {doc['when']}\n\n"
            f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, "
            f"Python {m['python']}, RabbitMQ {rabbit}, commit {m.get('git_commit', '?')}. "
            "One run per scenario on a shared machine.\n\n"
            f"Command: `.venv/bin/python benchmarks/faults.py --out {args.out}`\n\n"
        )
        with open(args.out + ".md", "w") as f:
            f.write(head + table(results) + "\n")


if __name__ == "__main__":
    main()
