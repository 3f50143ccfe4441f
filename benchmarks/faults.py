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
TCP proxy: connections reset and refused for that long). On a 3-node cluster of our own
(tests/rabbitnodes.py: other ports, data under a temp dir, stopped at the end), with
2 000 groups per host: ``node-loss`` (SIGKILL of the node both leaders are connected
to) and ``cluster-restart`` (every node stopped, then started), each with classic and
with quorum host queues (``-quorum``). ``same-host-id``: a second host with the
receiving host's host_id (its own /dev/shm, ``unshare``: needs root) starts mid-run;
the rows are the first host's traffic, and ``clash_s`` is how long until the second
one reports the clash.

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

from tests import rabbitnodes  # noqa: E402
from tests.broker.proxy import Proxy  # noqa: E402
from tests.remote import Remote, wait_until  # noqa: E402

BROKER = "amqp://guest:guest@127.0.0.1:5672/"
RATE = 1000  # direct messages per second (and a group_send every 10th)
SECONDS = 6.0
FAULT_AT = 2.0
NOT_HERE: dict[str, str] = {}


class Run:
    """The processes of one scenario, each with a unique prefix; closed at the end."""

    def __init__(self, broker: str | list[str] = BROKER) -> None:
        self.prefix = "f" + uuid.uuid4().hex[:11]
        self.procs: list[Remote] = []
        self.hosts: set[str] = set()
        self.broker = broker

    def proc(self, host_id: str, **over: Any) -> Remote:
        cfg = {
            "prefix": self.prefix,
            "host_id": host_id,
            "host": self.broker,
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
        if self.broker == BROKER:  # (a cluster of our own goes as a whole)
            _delete_queues(
                [f"{self.prefix}.{h}{tail}" for h in self.hosts for tail in ("", ".dead")]
            )


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
    fault: Callable[[Run, dict[str, list[Remote]]], None],
    *,
    send_via_proxy: bool = False,
    broker: str | list[str] = BROKER,
    groups: int = 0,
    seconds: float = SECONDS,
    **config: Any,
) -> dict[str, Any]:
    """hb: a leader and the receiver; ha: a leader and the sender; steady traffic, the
    fault at FAULT_AT s, then ``seconds`` of traffic in all and a drain. ``groups``:
    that many more groups on each host (bindings to restore)."""
    run = Run(broker)
    proxy = Proxy() if send_via_proxy else None
    try:
        hb = [run.proc("hb", **config), run.proc("hb", **config)]
        hb[0].call("wait_link", 15.0, timeout=20)
        rcv = hb[1]
        over = {"host": proxy.url, "heartbeat": 1} if proxy else {}
        ha = [run.proc("ha", **config, **over), run.proc("ha", **config, **over)]
        ha[0].call("wait_link", 15.0, timeout=20)
        snd = ha[1]
        ch = rcv.call("new_channel")
        rcv.call("group_add", "room", ch)
        if groups:
            sch = snd.call("new_channel")
            for i in range(groups):
                rcv.call("group_add", f"g{i}", ch)
                snd.call("group_add", f"g{i}", sch)
            wait_until(lambda: hb[0].call("stats").broker["bindings"] >= groups + 1, 30, 0.2)
        rcv.call("collect_timed", ch)
        time.sleep(0.3)
        snd.call("paced", ch, "room", 1, RATE, seconds)
        time.sleep(FAULT_AT)
        fault_t = time.time()
        fault(run, {"ha": ha, "hb": hb, "proxy": [proxy] if proxy else []})  # type: ignore[dict-item]
        res = snd.call("paced_result", timeout=seconds + 60)
        expected = len(res["accepted"]) + len(res["groups"])
        wait_until(lambda: len(rcv.call("collected", ch)) >= expected, 30, 0.2)
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


def on_cluster(what: str, queue_type: str) -> Callable[[], dict[str, Any]]:
    """A 3-node cluster of our own; the leaders connect to its first node (the first
    URL); ``node-loss`` SIGKILLs that node, ``cluster-restart`` stops and starts all."""

    def scenario() -> dict[str, Any]:
        nodes = rabbitnodes.Nodes()
        try:
            members = nodes.cluster(3)

            def fault(run: Run, hosts: dict[str, list[Remote]]) -> None:
                if what == "node-loss":
                    members[0].kill()
                    return
                for n in members:
                    n.stop()
                for n in members:
                    n.start(wait=False)
                for n in members:
                    n.wait()

            return steady(
                fault,
                broker=[n.url for n in members],
                groups=2000,
                seconds=6.0 if what == "node-loss" else 20.0,
                queue_type=queue_type,
                expiry=60,
            )
        finally:
            nodes.stop_all()

    return scenario


def same_host_id() -> dict[str, Any]:
    """A second host with hb's host_id (its own /dev/shm: ``unshare --mount --ipc``, as
    a container would have) starts during the traffic to hb and tries for 10 s."""
    import shutil
    import subprocess
    import textwrap

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return {"skipped": "needs root and unshare(1) for a private /dev/shm"}
    out: dict[str, Any] = {}

    def fault(run: Run, hosts: dict[str, list[Remote]]) -> None:
        cfg = {"prefix": run.prefix, "host_id": "hb", "host": BROKER, "heartbeat": 2}
        script = textwrap.dedent(
            f"""
            import asyncio, json, time
            from hybrid_layer import HybridChannelLayer
            async def main():
                lay = HybridChannelLayer(**{cfg!r})
                await lay.new_channel()
                t0 = time.monotonic()
                clash = None
                while time.monotonic() - t0 < 10:
                    b = lay.statistics().broker
                    if clash is None and "claimed" in b.get("reason", ""):
                        clash = time.monotonic() - t0
                    await asyncio.sleep(0.1)
                print(json.dumps({{"clash_s": clash, "link": b["link"]}}), flush=True)
                await lay.close()
            asyncio.run(main())
            """
        )
        inner = f'mount -t tmpfs -o mode=1777 tmpfs /dev/shm && exec {sys.executable} -c "$0"'
        p = subprocess.run(
            ["unshare", "--mount", "--ipc", "sh", "-c", inner, script],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else "{}"
        out.update(json.loads(last))

    res = steady(fault, seconds=14.0)
    res["direct"]["clash_s"] = round(out["clash_s"], 2) if out.get("clash_s") else None
    res["direct"]["second_link"] = out.get("link")
    return res


SCENARIOS: dict[str, Callable[[], dict[str, Any]]] = {
    "cold": cold,
    "kill-recv-leader": lambda: steady(kill_leader("hb")),
    "kill-send-leader": lambda: steady(kill_leader("ha")),
    "cut-1s": lambda: steady(cut(1.0), send_via_proxy=True),
    "cut-5s": lambda: steady(cut(5.0), send_via_proxy=True),
    "node-loss": on_cluster("node-loss", "classic"),
    "node-loss-quorum": on_cluster("node-loss", "quorum"),
    "cluster-restart": on_cluster("cluster-restart", "classic"),
    "cluster-restart-quorum": on_cluster("cluster-restart", "quorum"),
    "same-host-id": same_host_id,
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
            extra = "".join(
                f" ({k} {v})" for k, v in row.items() if k not in cols and v is not None
            )
            cells = " | ".join(str(row[c]) for c in cols)
            lines.append(f"| {name}{extra} | {kind} | {cells} |")
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
