"""Two checkouts of hybrid_layer, benchmarked back to back in one run: before and after.

    python benchmarks/ab.py BEFORE_DIR AFTER_DIR [--rounds 3] [--json] [--out STEM]
        [-- bench.py options, default: --quick --runs 1 --layers hybrid
            --scenarios pingpong,throughput,fanout,xpingpong --sizes 100B]

Each round runs ``bench.py`` once from each checkout (its own ``benchmarks/bench.py``,
with ``PYTHONPATH`` set to that checkout, so its workers import that code), alternating
which goes first; the machine is shared and noisy, so the two are always measured
minutes apart at most, never hours. The table gives, per scenario, size, layer and
metric, the median over every run of each checkout (min-max), and after ÷ before.
Latencies (``*_us``) are better lower; rates (``*_per_s``) better higher.

Both checkouts must have the same bench.py options (the harness's command line did not
change in between). A results file ``STEM.md`` (with the machine, the commits and the
command) and ``STEM.json`` (every record) are written; default stem
``benchmarks/results/<date>-<host>-ab``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_report  # noqa: E402

DEFAULT_BENCH = [
    "--quick",
    "--runs",
    "1",
    "--layers",
    "hybrid",
    "--scenarios",
    "pingpong,throughput,fanout,xpingpong",
    "--sizes",
    "100B",
]
METRICS = ("p50_us", "p99_us", "msgs_per_s", "pairs_per_s", "deliveries_per_s")


def commit(checkout: str) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", checkout, "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "(not a git checkout)"
    return out[:100]


def run_bench(checkout: str, bench_args: list[str]) -> list[dict[str, object]]:
    """One bench.py invocation from ``checkout``: its records."""
    with tempfile.TemporaryDirectory(prefix="hl-ab-") as tmp:
        stem = os.path.join(tmp, "r")
        env = {**os.environ, "PYTHONPATH": os.path.abspath(checkout)}
        cmd = [sys.executable, os.path.join(checkout, "benchmarks", "bench.py"), *bench_args]
        cmd += ["--out", stem]
        proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
            raise SystemExit(f"ab: bench.py failed in {checkout} (exit {proc.returncode})")
        with open(stem + ".json") as f:
            return list(json.load(f)["records"])


def load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def machine() -> str:
    m = bench_report.machine_info()  # (the same description bench.py's results give)
    return (
        f"`{m['hostname']}`: {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, "
        f"CPython {m['python']}, kernel {m['kernel']}, RabbitMQ {m['servers']['rabbitmq']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rounds", type=int, default=3, help="bench.py runs per checkout")
    ap.add_argument("--json", action="store_true", help="print every record as JSON too")
    ap.add_argument("--out", default="", help="results file stem")
    args, rest = ap.parse_known_args()
    if rest and rest[0] == "--":
        rest = rest[1:]
    bench_args = rest or DEFAULT_BENCH
    sides = {"before": args.before, "after": args.after}
    records: list[dict[str, object]] = []
    loads: list[str] = []
    started = time.monotonic()
    for rnd in range(args.rounds):
        order = ["before", "after"] if rnd % 2 == 0 else ["after", "before"]
        for side in order:
            loads.append(load())
            print(f"ab: round {rnd + 1}/{args.rounds}: {side} (load {loads[-1]})", flush=True)
            for rec in run_bench(sides[side], bench_args):
                rec = {**rec, "side": side, "round": rnd}
                records.append(rec)
                if args.json:
                    print(json.dumps(rec, default=str), flush=True)
    # (side, scenario, size, layer, metric) -> values
    vals: dict[tuple[str, str, str, str, str], list[float]] = {}
    statuses: dict[tuple[str, str, str, str], list[str]] = {}
    for rec in records:
        # "loss" is a measurement too (fanout-unpaced overflows inboxes by design: the
        # drops are counted); a crashed or stalled run is not
        key4 = (str(rec["side"]), str(rec["scenario"]), str(rec["size"]), str(rec["layer"]))
        statuses.setdefault(key4, []).append(str(rec.get("status")))
        if rec.get("status") not in ("ok", "loss"):
            continue
        m = rec.get("metrics")
        if not isinstance(m, dict):
            continue
        for k in METRICS:
            v = m.get(k)
            if isinstance(v, (int, float)):
                key = (
                    str(rec["side"]),
                    str(rec["scenario"]),
                    str(rec["size"]),
                    str(rec["layer"]),
                    k,
                )
                vals.setdefault(key, []).append(float(v))
    rows = sorted({k[1:] for k in vals})
    lines = [
        "# Before/after, one run (benchmarks/ab.py)",
        "",
        f"Machine {machine()}; load average at each invocation: {', '.join(loads)}.",
        "",
        f"- before: `{args.before}`: {commit(args.before)}",
        f"- after: `{args.after}`: {commit(args.after)}",
        f"- command: `benchmarks/ab.py BEFORE AFTER --rounds {args.rounds} -- "
        f"{' '.join(bench_args)}` (bench.py from each checkout, alternating which goes "
        f"first), {time.monotonic() - started:.0f} s",
        "",
        "| scenario | size | layer | metric | before: median (min-max) | after: median "
        "(min-max) | after ÷ before |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(v: list[float]) -> str:
        if not v:
            return "—"
        return f"{statistics.median(v):.4g} ({min(v):.4g}-{max(v):.4g}), n={len(v)}"

    for sc, size, layer, k in rows:
        b = vals.get(("before", sc, size, layer, k), [])
        a = vals.get(("after", sc, size, layer, k), [])
        ratio = f"{statistics.median(a) / statistics.median(b):.2f}" if a and b else "—"
        lines.append(f"| {sc} | {size} | {layer} | {k} | {cell(b)} | {cell(a)} | {ratio} |")
    lines.append("")
    lines.append("Latencies (`*_us`): lower is better; rates (`*_per_s`): higher is better.")
    odd = {k: v for k, v in statuses.items() if any(x != "ok" for x in v)}
    if odd:
        lines.append("")
        lines.append("Runs whose status was not `ok` (`loss`: counted drops, still measured):")
        for (side, sc, size, layer), v in sorted(odd.items()):
            lines.append(f"- {side} {sc} {size} {layer}: {', '.join(v)}")
    text = "\n".join(lines) + "\n"
    print(text)
    stem = args.out or os.path.join(
        HERE, "results", f"{time.strftime('%Y-%m-%d')}-{platform.node()}-ab"
    )
    with open(stem + ".md", "w") as f:
        f.write(text)
    with open(stem + ".json", "w") as f:
        json.dump({"bench_args": bench_args, "sides": sides, "records": records}, f, default=str)
    print(f"ab: wrote {stem}.md and {stem}.json")


if __name__ == "__main__":
    main()
