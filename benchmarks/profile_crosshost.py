"""Where hybrid_layer's cross-host time goes (broker mode, two host_ids on one machine).

A diagnostic companion of bench.py's xpingpong / xthroughput, with longer runs::

    python benchmarks/profile_crosshost.py latency 5
        ping (host ha) <-> echo (host hb), 100 B: the round-trip quantiles, then the median
        time of every stage of the path (send -> Link.submit -> host thread _publish ->
        frame queued for aiormq's writer -> socket write -> RabbitMQ -> data_received ->
        aiormq deliver -> Link._on_host_message -> deliver_direct -> receive returns), from
        CLOCK_MONOTONIC stamps taken by wrappers installed in the worker processes
        (one message in flight, so the k-th stamp of every stage is round trip k)
    python benchmarks/profile_crosshost.py throughput 6 100 [RATE]
        2 producers (host ha, producer0 leads it) -> 1 consumer (host hb), payload bytes,
        RATE sends/s per producer (0 or absent: flat out); prints the CPU of every thread
        (and of RabbitMQ's beam.smp) over the run and hybrid_layer's counters
    PYSPY=/path/to/py-spy [PYSPY_GIL=1] [PYSPY_IDLE=1] ... throughput ...
        also records every worker with ``py-spy record --threads --format raw``
        (no stage stamps then) into $XPROF_OUT (default /tmp/xprof/out)
    python benchmarks/profile_crosshost.py agg FILE.raw.txt [TOP] [THREAD]
        inclusive / self percentages per function and thread of a py-spy raw file
    XPROF_NOWAIT=1 / XPROF_SWITCH=0.0005: experiments in the producers (aiormq
        basic_publish(wait=False); sys.setswitchinterval)

The wrappers are monkeypatches inside the spawned workers: no file of hybrid_layer (or
aiormq) is changed. Needs RabbitMQ at 127.0.0.1:5672 (guest/guest); every run uses its
own prefix, and its host queues go with their connections.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

URL = "amqp://guest:guest@127.0.0.1:5672/"
mono = time.monotonic_ns
OUT = os.environ.get("XPROF_OUT", "/tmp/xprof/out")


def instrument(stamps: dict[str, list[int]]) -> None:
    from hybrid_layer.amqp import link as L
    from hybrid_layer.amqp import publisher as P  # (where _emit calls _publish_frame)

    def wrap_sync(cls, name, key):
        orig = getattr(cls, name)

        def w(self, *a, **k):
            stamps.setdefault(key, []).append(mono())
            return orig(self, *a, **k)

        setattr(cls, name, w)

    def wrap_async(cls, name, key):
        orig = getattr(cls, name)

        async def w(self, *a, **k):
            stamps.setdefault(key, []).append(mono())
            return await orig(self, *a, **k)

        setattr(cls, name, w)

    wrap_sync(L.Link, "submit", "submit")
    wrap_sync(L.Link, "_publish", "publish")  # (the kick's callback or the publisher task)
    wrap_sync(L.Link, "_on_host_message", "on_host_msg")  # (inline in aiormq's reader)
    import aiormq.channel as AC

    orig_bp = AC.Channel.basic_publish

    async def bp(self, *a, **k):
        stamps.setdefault("basic_publish", []).append(mono())
        return await orig_bp(self, *a, **k)

    AC.Channel.basic_publish = bp  # only where the link falls back to it
    orig_pf = P._publish_frame

    def pf(*a, **k):
        r = orig_pf(*a, **k)
        stamps.setdefault("frame_queued", []).append(mono())
        return r

    P._publish_frame = pf
    from hybrid_layer.participant import Participant

    wrap_sync(Participant, "deliver_direct", "deliver_direct")
    wrap_sync(Participant, "_on_bell", "on_bell")  # the woken loop's doorbell callback
    from hybrid_layer.shm.doorbell import BellPush

    wrap_sync(BellPush, "ring", "bell_rung")
    wrap_async(AC.Channel, "_on_deliver_frame", "on_deliver_frame")
    orig_w = asyncio.StreamWriter.write

    def w(self, data):
        if b"specific." in data:
            stamps.setdefault("tx_write", []).append(mono())
        return orig_w(self, data)

    asyncio.StreamWriter.write = w
    orig_dr = asyncio.StreamReaderProtocol.data_received

    def dr(self, data):
        if b"specific." in data:
            stamps.setdefault("rx_data", []).append(mono())
        return orig_dr(self, data)

    asyncio.StreamReaderProtocol.data_received = dr


async def wait_up(layer) -> None:
    for _ in range(3000):
        if layer.statistics().broker.get("link") == "up":
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("link not up")


def make_layer(prefix: str, host: str):
    from hybrid_layer import HybridChannelLayer

    return HybridChannelLayer({"host": URL, "host_id": host, "prefix": prefix})


# ------------------------------------------------------------------ latency
def echo_main(prefix, conn, instr):
    stamps: dict[str, list[int]] = {}
    if instr:
        instrument(stamps)

    async def run():
        layer = make_layer(prefix, "hb")
        ch = await layer.new_channel()
        await wait_up(layer)
        conn.send(("ready", ch, os.getpid()))
        peer = conn.recv()
        while True:
            msg = await layer.receive(ch)
            stamps.setdefault("echo_recv", []).append(mono())
            if msg.get("type") == "stop":
                break
            stamps.setdefault("echo_send", []).append(mono())
            await layer.send(peer, msg)
        await layer.close()

    asyncio.run(run())
    conn.send(("stamps", stamps))


def ping_main(prefix, conn, seconds, instr):
    stamps: dict[str, list[int]] = {}
    if instr:
        instrument(stamps)

    async def run():
        layer = make_layer(prefix, "ha")
        ch = await layer.new_channel()
        await wait_up(layer)
        conn.send(("ready", ch, os.getpid()))
        peer = conn.recv()
        conn.recv()  # go
        lat = []
        payload = b"x" * int(os.environ.get("XPROF_SIZE", "100"))
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            t = mono()
            stamps.setdefault("ping_send", []).append(t)
            await layer.send(peer, {"type": "ping", "seq": i, "payload": payload})
            await layer.receive(ch)
            t2 = mono()
            stamps.setdefault("ping_recv", []).append(t2)
            lat.append(t2 - t)
            i += 1
        await layer.send(peer, {"type": "stop"})
        await asyncio.sleep(0.2)
        await layer.close()
        return lat

    lat = asyncio.run(run())
    conn.send(("stamps", stamps, lat))


def pyspy(pids: dict[str, int], seconds: float, tag: str) -> list[subprocess.Popen]:
    exe = os.environ.get("PYSPY")
    if not exe:
        return []
    procs = []
    for name, pid in pids.items():
        for fmt in ("raw",):
            procs.append(subprocess.Popen(
                [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                 "--rate", "400", "--threads", "--format", fmt, "--nonblocking",
                 *(["--idle"] if os.environ.get("PYSPY_IDLE") else []),
                 *(["--gil"] if os.environ.get("PYSPY_GIL") else []),
                 "-o", f"{OUT}/{tag}-{name}.{fmt}.txt"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)  # let py-spy attach
    return procs


def q(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(p * len(v)))]


def latency(seconds: float) -> None:
    instr = not (os.environ.get("PYSPY") or os.environ.get("XPROF_PLAIN"))
    prefix = f"xp{os.getpid()}"
    ctx = mp.get_context("spawn")
    a, a2 = ctx.Pipe()
    b, b2 = ctx.Pipe()
    pe = ctx.Process(target=echo_main, args=(prefix, b2, instr))
    pp = ctx.Process(target=ping_main, args=(prefix, a2, seconds, instr))
    pe.start()
    pp.start()
    _, ech, epid = b.recv()
    _, pch, ppid = a.recv()
    b.send(pch)
    a.send(ech)
    spies = pyspy({"ping": ppid, "echo": epid}, seconds, "lat")
    a.send("go")
    res_a = a.recv()
    res_b = b.recv()
    for s in spies:
        s.wait()
    pp.join()
    pe.join()
    lat = res_a[2]
    us = [x / 1000 for x in lat]
    print(f"round trips {len(us)}: p50 {q(us, .5):.0f}us p90 {q(us, .9):.0f}us "
          f"p99 {q(us, .99):.0f}us")
    if not instr:
        return
    sa, sb = res_a[1], res_b[1]
    # one message in flight: the k-th stamp of each stage belongs to round trip k
    n = len(sa["ping_send"])
    legs = {
        "A main send -> A Link.submit": (sa, "ping_send", sa, "submit"),
        "A submit -> A host-thread _publish": (sa, "submit", sa, "publish"),
        "A _publish -> frame queued for aiormq's writer": (sa, "publish", sa, "frame_queued"),
        "A frame queued -> socket write (aiormq writer task)":
            (sa, "frame_queued", sa, "tx_write"),
        "A socket write -> B data_received (kernel+RabbitMQ)": (sa, "tx_write", sb, "rx_data"),
        "B data_received -> _on_deliver_frame (aiormq reader)":
            (sb, "rx_data", sb, "on_deliver_frame"),
        "B _on_deliver_frame -> _on_host_message (inline)":
            (sb, "on_deliver_frame", sb, "on_host_msg"),
        "B _on_host_message -> deliver_direct": (sb, "on_host_msg", sb, "deliver_direct"),
        "B deliver_direct -> doorbell rung": (sb, "deliver_direct", sb, "bell_rung"),
        "B doorbell rung -> _on_bell (wake-up)": (sb, "bell_rung", sb, "on_bell"),
        "B _on_bell -> echo receive returns": (sb, "on_bell", sb, "echo_recv"),
        "B echo send -> B Link.submit": (sb, "echo_send", sb, "submit"),
        "B submit -> B host-thread _publish": (sb, "submit", sb, "publish"),
        "B _publish -> frame queued": (sb, "publish", sb, "frame_queued"),
        "B frame queued -> socket write": (sb, "frame_queued", sb, "tx_write"),
        "B socket write -> A data_received (kernel+RabbitMQ)": (sb, "tx_write", sa, "rx_data"),
        "A data_received -> _on_deliver_frame": (sa, "rx_data", sa, "on_deliver_frame"),
        "A _on_deliver_frame -> _on_host_message": (sa, "on_deliver_frame", sa, "on_host_msg"),
        "A _on_host_message -> deliver_direct": (sa, "on_host_msg", sa, "deliver_direct"),
        "A deliver_direct -> doorbell rung": (sa, "deliver_direct", sa, "bell_rung"),
        "A doorbell rung -> _on_bell (wake-up)": (sa, "bell_rung", sa, "on_bell"),
        "A _on_bell -> ping receive returns": (sa, "on_bell", sa, "ping_recv"),
    }
    for k, v in {**sa, **{f"B:{k}": v for k, v in sb.items()}}.items():
        print(f"  stamps {k}: {len(v)}")
    print(f"{'leg':<62} {'p50 us':>8} {'p90 us':>8} {'mean us':>8}")
    total = 0.0
    for leg, (s1, k1, s2, k2) in legs.items():
        x, y = s1.get(k1, []), s2.get(k2, [])
        m = min(n, len(x), len(y))
        d = [(y[i] - x[i]) / 1000 for i in range(m)]
        if not d:
            continue
        mean = sum(d) / len(d)
        total += q(d, .5)
        print(f"{leg:<62} {q(d, .5):8.0f} {q(d, .9):8.0f} {mean:8.0f}")
    print(f"{'sum of leg medians':<62} {total:8.0f}")
    with open(f"{OUT}/lat-stamps.json", "w") as f:
        json.dump({"a": sa, "b": sb, "lat": lat}, f)


# ------------------------------------------------------------------ throughput
def producer_main(prefix, conn, seconds, size, rate):
    if os.environ.get("XPROF_SWITCH"):
        sys.setswitchinterval(float(os.environ["XPROF_SWITCH"]))
    if os.environ.get("XPROF_NOWAIT"):  # experiment: basic_publish(wait=False)
        import aiormq.channel as AC

        orig_bp = AC.Channel.basic_publish

        async def bp(self, *a, **k):
            k["wait"] = False
            return await orig_bp(self, *a, **k)

        AC.Channel.basic_publish = bp

    async def run():
        layer = make_layer(prefix, "ha")
        await wait_up(layer)
        conn.send(("ready", None, os.getpid()))
        dest = conn.recv()
        conn.recv()
        body = "x" * size
        sent = 0
        t0 = time.monotonic()
        end = t0 + seconds
        while time.monotonic() < end:
            if rate:
                due = t0 + sent / rate
                d = due - time.monotonic()
                if d > 0:
                    await asyncio.sleep(d)
            await layer.send(dest, {"type": "m", "seq": sent, "payload": body})
            sent += 1
            if sent % 256 == 0:
                await asyncio.sleep(0)
        st = layer.statistics()
        info = {"sent": sent, "leader": st.is_leader, "dropped": dict(st.dropped),
                "broker": {k: v for k, v in st.broker.items() if isinstance(v, int)}}
        await asyncio.sleep(3)  # let the leader publish what it holds
        st = layer.statistics()
        info["dropped_end"] = {k: v for k, v in st.dropped.items() if v}
        info["broker_end"] = {k: v for k, v in st.broker.items() if isinstance(v, int)}
        await layer.close()
        return info

    conn.send(("done", asyncio.run(run())))


def consumer_main(prefix, conn, seconds):
    async def run():
        layer = make_layer(prefix, "hb")
        ch = await layer.new_channel()
        await wait_up(layer)
        conn.send(("ready", ch, os.getpid()))
        conn.recv()
        n = 0
        first = last = 0.0
        while True:
            try:
                await asyncio.wait_for(layer.receive(ch), 3.0)
            except TimeoutError:
                break
            last = time.monotonic()
            if not n:
                first = last
            n += 1
        st = layer.statistics()
        await layer.close()
        return {"received": n, "rate": n / (last - first) if last > first else 0,
                "dropped": {k: v for k, v in st.dropped.items() if v},
                "broker": {k: v for k, v in st.broker.items() if isinstance(v, int)}}

    conn.send(("done", asyncio.run(run())))


def thread_cpu(pid: int) -> dict[str, float]:
    out = {}
    tck = os.sysconf("SC_CLK_TCK")
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            out[f"{comm}:{tid}"] = (int(parts[11]) + int(parts[12])) / tck
    except OSError:
        pass
    return out


def throughput(seconds: float, size: int, rate: float) -> None:
    prefix = f"xt{os.getpid()}"
    ctx = mp.get_context("spawn")
    c, c2 = ctx.Pipe()
    pc = ctx.Process(target=consumer_main, args=(prefix, c2, seconds))
    pc.start()
    _, ch, cpid = c.recv()
    prods = []
    for _ in range(2):
        p, p2 = ctx.Pipe()
        pr = ctx.Process(target=producer_main, args=(prefix, p2, seconds, size, rate))
        pr.start()
        prods.append((pr, p))
        time.sleep(0.3)  # producer0 becomes the leader of host ha
    pids = {"consumer": cpid}
    for i, (_, p) in enumerate(prods):
        _, _, pid = p.recv()
        pids[f"producer{i}"] = pid
        p.send(ch)
    spies = pyspy(pids, seconds, f"tp{size}")
    beam = subprocess.run(["pgrep", "-f", "beam.smp"], capture_output=True, text=True)
    pids_b = {"rabbitmq": int(beam.stdout.split()[0])} if beam.stdout.split() else {}
    cpu0 = {k: thread_cpu(v) for k, v in {**pids, **pids_b}.items()}
    t0 = time.monotonic()
    c.send("go")
    for _, p in prods:
        p.send("go")
    time.sleep(seconds)
    cpu1 = {k: thread_cpu(v) for k, v in {**pids, **pids_b}.items()}
    dt = time.monotonic() - t0
    if pids_b:
        c0, c1 = cpu0["rabbitmq"], cpu1["rabbitmq"]
        tot = sum(c1.values()) - sum(c0.get(t, 0) for t in c1)
        print(f"  CPU rabbitmq (beam.smp) over {dt:.1f}s: {tot / dt * 100:.0f}%")
    for k in pids:
        per = {t: (cpu1[k].get(t, 0) - cpu0[k].get(t, 0)) / dt for t in cpu1[k]}
        busy = {t: f"{v * 100:.0f}%" for t, v in per.items() if v > 0.01}
        print(f"  CPU {k} (pid {pids[k]}) over {dt:.1f}s: {busy}")
    for i, (pr, p) in enumerate(prods):
        print(f"producer{i}:", p.recv()[1])
        pr.join()
    print("consumer:", c.recv()[1])
    pc.join()
    for s in spies:
        s.wait()


def agg(path: str, top: int = 25, thread_filter: str | None = None) -> None:
    """Inclusive and self shares per function, per thread, of a py-spy raw file."""
    import collections
    import re

    incl: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    selfc: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    tot: collections.Counter = collections.Counter()

    def key(f: str) -> str:
        m = re.match(r"(.*) \((.*?):\d+\)$", f)
        return f"{m[1]} ({m[2]})" if m else f

    with open(path) as fh:
        for line in fh:
            line = line.rstrip()
            if not line:
                continue
            stack, n_s = line.rsplit(" ", 1)
            n = int(n_s)
            frames = stack.split(";")
            th = re.sub(r"thread \(\d+\): ", "", frames[0])
            if thread_filter and thread_filter not in th:
                continue
            tot[th] += n
            keys = [key(f) for f in frames[1:]]
            for k in set(keys):
                incl[th][k] += n
            if keys:
                selfc[th][keys[-1]] += n
    for th, t in tot.most_common():
        print(f"=== {th}: {t} samples\n  inclusive:")
        for k, v in incl[th].most_common(top):
            print(f"    {v * 100 / t:5.1f}%  {k}")
        print("  self:")
        for k, v in selfc[th].most_common(12):
            print(f"    {v * 100 / t:5.1f}%  {k}")


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    mode = sys.argv[1]
    if mode == "agg":
        agg(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 25,
            sys.argv[4] if len(sys.argv) > 4 else None)
        sys.exit(0)
    secs = float(sys.argv[2]) if len(sys.argv) > 2 else 5
    if mode == "latency":
        latency(secs)
    else:
        size = int(sys.argv[3]) if len(sys.argv) > 3 else 100
        rate = float(sys.argv[4]) if len(sys.argv) > 4 else 0
        throughput(secs, size, rate)
