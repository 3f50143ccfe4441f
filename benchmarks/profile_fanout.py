"""Where a paced fan-out delivery's latency goes (single host, hybrid_layer only).

    python benchmarks/profile_fanout.py [ROUNDS] [--json]

The shape of bench.py's ``fanout-paced``: one sender process ``group_send``s to a group
of 100 channels, 50 in each of two receiver processes (a task per channel, as a
Channels consumer has), every 10 ms, ``ROUNDS`` times (default 300; the first 20 are
left out as warm-up). Every message carries the sender's ``time.monotonic_ns()`` taken
just before ``group_send``. It prints, as medians over the rounds:

* ``group_send``: how long the sender's call takes (encode, one ring write and one
  doorbell per receiver process);
* per receiver: when its loop's doorbell callback (``Participant._on_bell``) starts and
  ends, relative to the sender's stamp, and how long ``_fan_out`` (one group record
  into 50 channel queues, each receive() waiting on it woken) takes inside it;
* the latency of the k-th of its 50 deliveries (k = 0 the first task to resume);
* the p50 over all deliveries: what bench.py reports as the fan-out p50.

The timing wrappers are installed by monkeypatching inside the spawned receivers; no
file of hybrid_layer is changed. Uses its own shared-memory prefix; every process
closes its layer, so nothing is left in /dev/shm.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any

mono = time.monotonic_ns
MEMBERS = 50  # per receiver process
PERIOD = 0.01  # s between group_sends
WARMUP = 20
KS = (0, 1, 2, 5, 10, 24, 37, 49)


def _med_us(xs: list[int] | list[float]) -> float:
    return statistics.median(xs) / 1000 if xs else float("nan")


def receiver(idx: int, prefix: str, rounds: int, q: Any) -> None:
    from hybrid_layer import HybridChannelLayer
    from hybrid_layer.participant import Participant

    bells_in: list[int] = []
    bells_out: list[int] = []
    fan_ns: list[int] = []
    on_bell, fan_out = Participant._on_bell, Participant._fan_out

    def timed_bell(self: Any, loop: Any) -> None:
        bells_in.append(mono())
        on_bell(self, loop)
        bells_out.append(mono())

    def timed_fan(self: Any, rec: Any, pos: int, loop: Any) -> None:
        t = time.perf_counter_ns()
        fan_out(self, rec, pos, loop)
        fan_ns.append(time.perf_counter_ns() - t)

    Participant._on_bell = timed_bell  # type: ignore[method-assign]
    Participant._fan_out = timed_fan  # type: ignore[method-assign]

    async def run() -> None:
        layer = HybridChannelLayer({"prefix": prefix})
        chans = [await layer.new_channel() for _ in range(MEMBERS)]
        for c in chans:
            await layer.group_add("g", c)
        lat: dict[int, list[int]] = {}
        bell: list[tuple[int, int]] = []  # per round: bell start, end (from the stamp)

        async def pump(c: str) -> None:
            while True:
                m = await layer.receive(c)
                now = mono()
                r = lat.setdefault(m["seq"], [])
                if not r:  # the round's first delivery: which doorbell callback was it
                    i = bisect.bisect_right(bells_in, now) - 1
                    if i >= 0:
                        bell.append((bells_in[i] - m["ts"], bells_out[i] - m["ts"]))
                r.append(now - m["ts"])

        tasks = [asyncio.create_task(pump(c)) for c in chans]
        q.put(("ready", idx))
        deadline = time.monotonic() + 60 + rounds * PERIOD * 2
        while (len(lat) < rounds or len(lat.get(rounds - 1, [])) < MEMBERS) and (
            time.monotonic() < deadline
        ):
            await asyncio.sleep(0.05)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await layer.close()
        q.put(("receiver", idx, lat, bell[WARMUP:], fan_ns[WARMUP:]))

    asyncio.run(run())


def sender(prefix: str, rounds: int, q: Any) -> None:
    from hybrid_layer import HybridChannelLayer

    async def run() -> None:
        layer = HybridChannelLayer({"prefix": prefix})
        await asyncio.sleep(0.3)
        calls = []
        body = b"x" * 100
        for seq in range(rounds):
            await asyncio.sleep(PERIOD)
            t = mono()
            await layer.group_send("g", {"type": "x", "seq": seq, "ts": t, "payload": body})
            calls.append(mono() - t)
        await asyncio.sleep(0.5)
        await layer.close()
        q.put(("sender", calls[WARMUP:]))

    asyncio.run(run())


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--json"]
    rounds = int(args[0]) if args else 300
    prefix = f"pf{os.getpid()}"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=receiver, args=(i, prefix, rounds, q)) for i in range(2)]
    for p in procs:
        p.start()
    for _ in procs:
        q.get(timeout=60)
    s = ctx.Process(target=sender, args=(prefix, rounds, q))
    s.start()
    procs.append(s)
    got: dict[Any, Any] = {}
    try:
        for _ in range(3):
            m = q.get(timeout=120 + rounds * PERIOD * 2)
            got[m[0] if m[0] == "sender" else (m[0], m[1])] = m
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    out: dict[str, Any] = {"rounds": rounds - WARMUP, "group_send_us": _med_us(got["sender"][1])}
    every = []
    for idx in range(2):
        _, _, lat, bell, fan = got[("receiver", idx)]
        byk: list[list[int]] = [[] for _ in range(MEMBERS)]
        for seq, ls in lat.items():
            if seq < WARMUP:
                continue
            every.extend(ls)
            for k, v in enumerate(sorted(ls)):
                byk[k].append(v)
        out[f"receiver{idx}"] = {
            "bell_start_us": _med_us([b[0] for b in bell]),
            "bell_end_us": _med_us([b[1] for b in bell]),
            "fan_out_us": _med_us(fan),
            "kth_delivery_us": {k: _med_us(byk[k]) for k in KS},
        }
    out["p50_us"] = _med_us(every)
    if "--json" in sys.argv:
        print(json.dumps(out))
        return
    print(f"{out['rounds']} rounds; group_send call {out['group_send_us']:.0f} us (median)")
    for idx in range(2):
        r = out[f"receiver{idx}"]
        print(
            f"receiver{idx}: doorbell callback {r['bell_start_us']:.0f} -> "
            f"{r['bell_end_us']:.0f} us after the stamp (fan-out into {MEMBERS} queues "
            f"{r['fan_out_us']:.0f} us of it); k-th delivery: "
            + " ".join(f"{k}:{v:.0f}" for k, v in r["kth_delivery_us"].items())
        )
    print(f"p50 over all deliveries: {out['p50_us']:.0f} us")


if __name__ == "__main__":
    main()
