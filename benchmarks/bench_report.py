"""Machine description, medians, ratios and the Markdown / text reports of bench.py."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import statistics
import subprocess
import time
from typing import Any

PACKAGES = ("hybrid-layer", "channels", "channels-redis", "channels-rabbitmq", "asgiref",
            "msgspec", "posix-ipc", "aiormq", "pamqp", "redis", "carehare", "msgpack", "Django")

# scenario -> [(metric, label, higher_is_better, format)]
HEADLINE: dict[str, list[tuple[str, str, bool, str]]] = {
    "single": [("pairs_per_s", "pairs/s", True, "rate")],
    "pingpong": [("p50_us", "p50", False, "us"), ("p90_us", "p90", False, "us"),
                 ("p99_us", "p99", False, "us")],
    "throughput": [("msgs_per_s", "msg/s", True, "rate")],
    "fanout-paced": [("deliveries_per_s", "deliveries/s", True, "rate"),
                     ("p50_us", "p50", False, "us"), ("p99_us", "p99", False, "us")],
    "fanout-unpaced": [("deliveries_per_s", "deliveries/s", True, "rate"),
                       ("p50_us", "p50", False, "us"), ("p99_us", "p99", False, "us")],
    "xpingpong": [("p50_us", "p50", False, "us"), ("p90_us", "p90", False, "us"),
                  ("p99_us", "p99", False, "us")],
    "xthroughput": [("msgs_per_s", "msg/s", True, "rate")],
}
# counted over all runs (sum), shown as "lost/expected"
LOSS = {
    "single": ("lost", "pairs"),
    "pingpong": ("lost", "round_trips"),
    "throughput": ("lost", "sent"),
    "fanout-paced": ("lost", "expected"),
    "fanout-unpaced": ("lost", "expected"),
    "xpingpong": ("lost", "round_trips"),
    "xthroughput": ("lost", "sent"),
}
THROUGHPUT = ("throughput", "xthroughput")  # scenarios with ChannelFull retries
MEMORY = [("rss_max_kb", "RSS max/process", "kb"), ("rss_total_kb", "RSS all processes", "kb"),
          ("shm_bytes", "/dev/shm size", "bytes"),
          ("shm_resident_bytes", "/dev/shm resident", "bytes")]
DASH = "\u2013"  # en dash
SCENARIO_ORDER = ("single", "pingpong", "throughput", "fanout-paced", "fanout-unpaced",
                  "xpingpong", "xthroughput")
SIZE_ORDER = ("100B", "10KB", "1MB")
LAYER_ORDER = ("hybrid", "hybrid_spin", "inmemory", "redis", "redis_pubsub", "rabbitmq")
OURS = ("hybrid", "hybrid_spin")  # compared with every other layer of the same run


# ---------------------------------------------------------------------------- machine
def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))), *args], capture_output=True, text=True, timeout=5)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def code_state() -> tuple[str, bool]:
    """(short commit, hybrid_layer/ has uncommitted changes) of the checkout."""
    dirty = _git("status", "--porcelain", "--", "hybrid_layer")
    return _git("rev-parse", "--short", "HEAD"), bool(dirty)


def machine_info() -> dict[str, Any]:
    cpuinfo = _read("/proc/cpuinfo")
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                  if ln.startswith("model name")), platform.processor() or "unknown")
    mem_kb = next((int(ln.split()[1]) for ln in _read("/proc/meminfo").splitlines()
                   if ln.startswith("MemTotal:")), 0)
    versions = {p: _version(p) for p in PACKAGES}
    servers = {}
    try:
        import redis

        servers["redis"] = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=2).info(
            "server").get("redis_version", "?")
    except Exception as exc:  # informative only
        servers["redis"] = f"unavailable ({type(exc).__name__})"
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "rabbitmq-server"],
                             capture_output=True, text=True, timeout=5)
        servers["rabbitmq"] = out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        servers["rabbitmq"] = "unknown"
    commit, dirty = code_state()
    return {
        "hostname": socket.gethostname(), "cpu_model": model, "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(), "python_impl": platform.python_implementation(),
        "kernel": platform.release(), "os": platform.platform(), "packages": versions,
        "servers": servers, "git_commit": commit, "git_dirty_hybrid_layer": dirty,
    }


# ---------------------------------------------------------------------------- formatting
def fmt(value: Any, kind: str) -> str:
    if value is None:
        return DASH
    if kind == "rate":
        v = float(value)
        if v >= 1e6:
            return f"{v / 1e6:.2f}M"
        if v >= 1e4:
            return f"{v / 1e3:.0f}k"
        if v >= 1e3:
            return f"{v / 1e3:.1f}k"
        return f"{v:.0f}" if v >= 10 else f"{v:.1f}"
    if kind == "us":
        v = float(value)
        if v >= 100_000:
            return f"{v / 1000:.0f}ms"
        if v >= 10_000:
            return f"{v / 1000:.1f}ms"
        if v >= 1000:
            return f"{v / 1000:.2f}ms"
        return f"{v:.0f}µs" if v >= 100 else f"{v:.1f}µs"
    if kind == "kb":
        return f"{float(value) / 1024:.0f}MiB"
    if kind == "bytes":
        v = float(value)
        return f"{v / 1024 / 1024:.1f}MiB" if v else "0"
    if kind == "int":
        return f"{float(value):.0f}"
    if kind == "ratio":
        return f"{float(value):.2f}x"
    return str(value)


def spread(stats: dict[str, Any] | None, kind: str) -> str:
    if not stats:
        return DASH
    med = fmt(stats["median"], kind)
    lo, hi = fmt(stats["min"], kind), fmt(stats["max"], kind)
    if stats["n"] < 2 or lo == hi:
        return med
    return f"{med} ({lo}{DASH}{hi})"


def one_line(rec: dict[str, Any]) -> str:
    m = rec["metrics"]
    parts = [f"{rec['layer']:<12} {rec['scenario']:<14} {rec['size']:<5} run {rec['run']}:"]
    for key, label, _, kind in HEADLINE.get(rec["scenario"], []):
        parts.append(f"{label} {fmt(m.get(key), kind)}")
    loss = LOSS.get(rec["scenario"])
    if loss:
        parts.append(f"lost {m.get(loss[0])}/{m.get(loss[1])}")
    if rec["scenario"] in THROUGHPUT:
        parts.append(f"retries {m.get('retries')}")
    parts.append(f"rss {fmt(m.get('rss_max_kb'), 'kb')}")
    if m.get("shm_bytes"):
        parts.append(f"shm {fmt(m['shm_bytes'], 'bytes')}")
    parts.append(f"[{rec['status']}, {m.get('wall_s', 0):.1f}s]")
    line = " ".join(parts)
    if rec["notes"]:
        line += "\n      notes: " + " | ".join(rec["notes"])[:1000]
    return line


# ---------------------------------------------------------------------------- statistics
def _stats(values: list[float]) -> dict[str, Any] | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "n": len(vals), "values": vals}


def _order(key: tuple[str, str, str]) -> tuple[int, int, int]:
    layer, sc, size = key

    def idx(seq: tuple[str, ...], x: str) -> int:
        return seq.index(x) if x in seq else len(seq)

    return idx(SCENARIO_ORDER, sc), idx(SIZE_ORDER, size), idx(LAYER_ORDER, layer)


def summarise(records: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["layer"], r["scenario"], r["size"]), []).append(r)
    rows = []
    for key in sorted(groups, key=_order):
        layer, sc, size = key
        recs = groups[key]
        metrics = {}
        keys = [k for k, *_ in HEADLINE.get(sc, [])] + [k for k, *_ in MEMORY]
        keys += ["retries", "group_sends_per_s", "max_us", "mean_us", "close_s_max"]
        for k in keys:
            st = _stats([r["metrics"].get(k) for r in recs])
            if st:
                metrics[k] = st
        row: dict[str, Any] = {
            "layer": layer, "scenario": sc, "size": size, "runs": len(recs),
            "statuses": sorted({r["status"] for r in recs}), "metrics": metrics,
            "notes": [f"run {r['run']}: {n}" for r in recs for n in r["notes"]],
        }
        loss = LOSS.get(sc)
        if loss:
            row["lost"] = sum(r["metrics"].get(loss[0]) or 0 for r in recs)
            row["of"] = sum(r["metrics"].get(loss[1]) or 0 for r in recs)
        row["shm_leaked"] = sum(r["metrics"].get("shm_leaked") or 0 for r in recs)
        totals: dict[str, int] = {}
        for r in recs:  # hybrid_layer's own counters, summed over processes and runs
            for n, ls in (r["metrics"].get("layer_stats") or {}).items():
                who = "leader" if ls.get("is_leader") else "non-leader"
                where = n.rstrip("0123456789")
                for what in ("dropped", "raised"):
                    for k, v in (ls.get(what) or {}).items():
                        key = f"{where} ({who}) {what} {k}"
                        totals[key] = totals.get(key, 0) + v
                for k in ("published", "confirmed", "returned", "received"):
                    v = (ls.get("broker") or {}).get(k)
                    if v:
                        key = f"{where} ({who}) broker {k}"
                        totals[key] = totals.get(key, 0) + v
        if totals:
            row["layer_stats_totals"] = totals
        rows.append(row)
    # ratios hybrid / peer, computed run by run, then the median over runs
    ratios = []
    by_run = {(r["layer"], r["scenario"], r["size"], r["run"]): r for r in records}
    present = [lyr for lyr in LAYER_ORDER if any(r["layer"] == lyr for r in records)]
    peers = [lyr for lyr in present if lyr not in OURS]
    for sc in SCENARIO_ORDER:
        for size in SIZE_ORDER:
            for ours, peer in ((o, p) for o in OURS if o in present for p in peers):
                for metric, label, higher, _ in HEADLINE.get(sc, []):
                    per_run = []
                    for run in range(meta["runs"]):
                        h = by_run.get((ours, sc, size, run))
                        p = by_run.get((peer, sc, size, run))
                        if not h or not p:
                            continue
                        hv, pv = h["metrics"].get(metric), p["metrics"].get(metric)
                        if hv is None or not pv:
                            continue
                        per_run.append(hv / pv)
                    st = _stats(per_run)
                    if st:
                        ratios.append({"scenario": sc, "size": size, "layer": ours,
                                       "peer": peer,
                                       "metric": metric, "label": label,
                                       "higher_is_better": higher, **st})
    return {"rows": rows, "ratios": ratios}


# ---------------------------------------------------------------------------- reports
def _table(header: list[str], body: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in body]
    return out


def _scenario_rows(summary: dict[str, Any], sc: str) -> tuple[list[str], list[list[str]]]:
    heads = HEADLINE[sc]
    header = ["size", "layer"] + [label for _, label, _, _ in heads]
    if sc in LOSS:
        header.append("lost / expected (all runs)")
    if sc in THROUGHPUT:
        header.append("ChannelFull retries")
    if sc.startswith("fanout"):
        header.append("group_send/s")
    header.append("status")
    body = []
    for row in summary["rows"]:
        if row["scenario"] != sc:
            continue
        cells = [row["size"], row["layer"]]
        for key, _, _, kind in heads:
            cells.append(spread(row["metrics"].get(key), kind))
        if sc in LOSS:
            cells.append(f"{row.get('lost', 0)} / {row.get('of', 0)}")
        if sc in THROUGHPUT:
            cells.append(spread(row["metrics"].get("retries"), "int"))
        if sc.startswith("fanout"):
            cells.append(spread(row["metrics"].get("group_sends_per_s"), "rate"))
        cells.append(",".join(row["statuses"]))
        body.append(cells)
    return header, body


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    mc = meta["machine"]
    lines = [f"# hybrid_layer benchmark — {mc['hostname']}, "
             f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(meta['started']))}", ""]
    lines += [
        "## Machine", "",
        f"- host: `{mc['hostname']}`; CPU: {mc['cpu_model']}; cores: {mc['cores']}; "
        f"memory: {mc['memory_gib']} GiB",
        f"- Python {mc['python']} ({mc['python_impl']}); kernel {mc['kernel']}; {mc['os']}",
        "- packages: " + ", ".join(f"{k} {v}" for k, v in mc["packages"].items()),
        f"- servers: Redis {mc['servers'].get('redis')} at {meta['redis']}; "
        f"RabbitMQ {mc['servers'].get('rabbitmq')} at {meta['amqp']}",
    ]
    rq = meta.get("rabbitmq_worker_env") or {}
    if rq:
        lines.append(
            f"- channels_rabbitmq workers: `{rq.get('python_path')}` (Python "
            f"{rq.get('python')}; " + ", ".join(f"{k} {v}" for k, v in
                                                 rq.get("packages", {}).items())
            + "), a separate virtualenv: carehare needs pamqp<4, hybrid_layer's aiormq "
            "needs pamqp>=4")
    lines += [
        f"- hybrid_layer commit `{mc['git_commit']}`"
        + (" (hybrid_layer/ has uncommitted changes)" if mc["git_dirty_hybrid_layer"] else ""),
        f"- load average at start {meta['load_avg_start'][0]:.2f}, at end "
        f"{meta['load_avg_end'][0]:.2f} (the machine may be shared: numbers are noisy)",
        "",
        "## Run", "",
        f"- command: `{meta['command']}`",
        f"- mode: {meta['mode']}; runs: {meta['runs']}; elapsed {meta['elapsed_s']:.0f} s",
        f"- scenarios: {', '.join(meta['scenarios'])}; sizes: {', '.join(meta['sizes'])}",
        f"- each cell: **median over the runs (min{DASH}max)**; every measurement in fresh "
        "spawned processes, public channel layer API only, default layer settings "
        "(capacity 100, expiry 60 s) unless noted",
        f"- fan-out group: {meta['fanout_members']} member channels in 2 receiver "
        "processes; paced = fixed group_send rate, unpaced = as fast as the sender can",
        f"- throughput producers sleep {meta['retry_sleep_s'] * 1000:.0f} ms after "
        "ChannelFull and retry the same message",
        "",
    ]
    for name, why in meta["skipped"].items():
        lines.append(f"- **skipped {name}**: {why}")
    for n in meta["notes"]:
        lines.append(f"- note: {n}")
    if meta["skipped"] or meta["notes"]:
        lines.append("")
    lines.append("Layers: " + "; ".join(f"`{k}` = {v}" for k, v in meta["layer_labels"].items()
                                        if k in meta["layers"]))
    lines.append("")
    titles = {
        "single": "single — one process, send + receive on its own channel",
        "pingpong": "pingpong — round trip between two processes (µs, initiator's clock)",
        "throughput": "throughput — 2 producers → 1 consumer (msg/s at the consumer)",
        "fanout-paced": "fanout, paced — group of 100 over 2 receivers, fixed send rate",
        "fanout-unpaced": "fanout, unpaced — group of 100 over 2 receivers, send flat out",
        "xpingpong": "xpingpong — round trip between two hosts (µs, initiator's clock)",
        "xthroughput": "xthroughput — 2 producers on host A → 1 consumer on host B "
                       "(msg/s at the consumer)",
    }
    if any(r["scenario"] in CROSS for r in summary["rows"]):
        ids = meta.get("cross_host_ids") or {}
        lines += ["## Cross-host scenarios", "",
                  CROSS_INTRO.format(a=ids.get("a", "?"), b=ids.get("b", "?")), ""]
        lines += _cross_counters(summary)
    for sc in SCENARIO_ORDER:
        if not any(r["scenario"] == sc for r in summary["rows"]):
            continue
        lines += [f"## {titles[sc]}", ""]
        header, body = _scenario_rows(summary, sc)
        lines += _table(header, body)
        lines.append("")
    if summary["ratios"]:
        lines += [f"## ours ÷ peer (same run, median over runs, min{DASH}max)", "",
                  "Rates: > 1 means hybrid does more per second. Latencies: < 1 means "
                  "hybrid is faster.", ""]
        body = []
        for r in summary["ratios"]:
            body.append([r["scenario"], r["size"], r["label"], r.get("layer", "hybrid"),
                         r["peer"], spread(r, "ratio")])
        lines += _table(["scenario", "size", "metric", "ours", "peer", "ours ÷ peer"], body)
        lines.append("")
    lines += ["## Memory (at the end of each measurement, before close)", "",
              "RSS = VmRSS of each worker process; /dev/shm = sum of the sizes of the "
              "layer's names there (apparent size, and blocks actually resident).", ""]
    body = []
    for row in summary["rows"]:
        body.append([row["scenario"], row["size"], row["layer"]]
                    + [spread(row["metrics"].get(k), kind) for k, _, kind in MEMORY])
    lines += _table(["scenario", "size", "layer"] + [label for _, label, _ in MEMORY], body)
    lines.append("")
    odd = [r for r in summary["rows"] if r["notes"] or r["shm_leaked"]
           or set(r["statuses"]) - {"ok"}]
    lines += ["## Anomalies", ""]
    if not odd:
        lines.append("None: no losses, errors, timeouts or leaked /dev/shm names.")
    for r in odd:
        lines.append(f"- {r['layer']} {r['scenario']} {r['size']} "
                     f"(status {','.join(r['statuses'])}"
                     + (f", {r['shm_leaked']} leaked /dev/shm names" if r["shm_leaked"] else "")
                     + ")" + (": " + " | ".join(r["notes"])[:1500] if r["notes"] else ""))
    lines.append("")
    return "\n".join(lines)


CROSS = ("xpingpong", "xthroughput")
CROSS_INTRO = (
        "`hybrid` runs in broker mode with two `host_id`s on this one machine (host A = "
        "`{a}`: the initiator / both producers; host B = `{b}`: the echo / the consumer), "
        "each with a unique prefix per measurement, so every measured message crosses "
        "RabbitMQ: the sender hands it to its host's leader (itself, or through shared "
        "memory when it is not the leader), the leader publishes it to host B's queue, "
        "host B's leader delivers it through shared memory. Every worker waits for "
        "`statistics().broker[\"link\"] == \"up\"` before it says ready. For "
        "`rabbitmq` (channels_rabbitmq), `redis` and `redis_pubsub` the cross-host path is "
        "simply their normal path: every message goes through the server in pingpong and "
        "throughput already, so these rows are the same workload as those scenarios, "
        "re-measured here so that the ratios compare measurements taken close together."
)


def _cross_counters(summary: dict[str, Any]) -> list[str]:
    """hybrid_layer's own drop counters in xthroughput (where the lost messages went)."""
    out: list[str] = []
    for row in summary["rows"]:
        if row["layer"] not in OURS or row["scenario"] != "xthroughput":
            continue
        per = row.get("layer_stats_totals") or {}
        if not per:
            continue
        out.append(f"- {row['layer']} xthroughput {row['size']}: lost {row.get('lost', 0)} of "
                   f"{row.get('of', 0)} sent over all runs; hybrid_layer's counters over all "
                   "runs: " + "; ".join(f"{k} {v}" for k, v in sorted(per.items())))
    if out:
        out.append("")
    return out


def text_table(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    out = []
    for sc in SCENARIO_ORDER:
        if not any(r["scenario"] == sc for r in summary["rows"]):
            continue
        header, body = _scenario_rows(summary, sc)
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
        out.append(f"== {sc} (median over {meta['runs']} runs, min{DASH}max)")
        out.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        for b in body:
            out.append("  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)))
        out.append("")
    if summary["ratios"]:
        out.append("== hybrid, hybrid_spin ÷ peer (same run; rates >1 better, latencies <1 better)")
        for r in summary["ratios"]:
            out.append(f"{r['scenario']:<15} {r['size']:<5} {r['label']:<13} "
                       f"{r.get('layer', 'hybrid'):<12} {r['peer']:<13} {spread(r, 'ratio')}")
        out.append("")
    out.append("== memory: RSS max/process, /dev/shm (size / resident)")
    for row in summary["rows"]:
        mm = row["metrics"]
        out.append(f"{row['scenario']:<15} {row['size']:<5} {row['layer']:<13} "
                   f"{spread(mm.get('rss_max_kb'), 'kb'):<22} "
                   f"{spread(mm.get('shm_bytes'), 'bytes')} / "
                   f"{spread(mm.get('shm_resident_bytes'), 'bytes')}")
    for name, why in meta["skipped"].items():
        out.append(f"skipped {name}: {why}")
    return "\n".join(out)
