"""Operator's command line: ``python -m hybrid_layer status [--prefix P] [--host-id H]``.

Reads the host namespace's registry without joining it (no slot is taken, no election
is entered) and prints the live participants, the leader and the mirrored counters.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
from typing import Any

import posix_ipc

from .config import parse_config
from .shm import layout as L
from .shm.locks import LockFile


def status(prefix: str, host_id: str | None) -> dict[str, Any]:
    raw: dict[str, Any] = {"prefix": prefix}
    if host_id:
        raw["host_id"] = host_id
    cfg = parse_config(raw)
    name = f"/{cfg.namespace}.reg"
    try:
        shm = posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError:
        return {"namespace": cfg.namespace, "exists": False, "participants": []}
    try:
        size = os.fstat(shm.fd).st_size
        m = mmap.mmap(shm.fd, size, prot=mmap.PROT_READ)
    finally:
        shm.close_fd()
    try:
        hdr = L.REG_HEADER.unpack_from(m, 0)
        max_p = hdr[3]
        leader_slot, _gen, leader_pid = L.LEADER_FIELDS.unpack_from(m, L.H_LEADER)
        lock_path = f"{L.SHM_FS}{name}"  # the locks are on the registry's own file
        lf = LockFile(lock_path, cfg.mode) if os.path.exists(lock_path) else None
        parts = []
        for i in range(max_p):
            state, gen, pid, started = L.REG_SLOT.unpack_from(m, L.reg_slot_offset(i))
            if state != L.SLOT_LIVE:
                continue
            alive = lf.held_by_other(L.SLOT_LOCK_BASE + i) if lf else False
            stats = L.REG_STATS.unpack_from(m, L.reg_slot_offset(i) + L.REG_STATS_OFFSET)
            parts.append(
                {
                    "slot": i,
                    "gen": gen,
                    "pid": pid,
                    "alive": alive,
                    "started": started,
                    "leader": i == leader_slot,
                    **dict(zip(L.STATS_FIELDS, stats, strict=True)),
                }
            )
        if lf:
            lf.close()
        link = L.LINK_NONE
        syncs = 0
        if leader_slot >= 0:
            base = L.reg_slot_offset(leader_slot) + L.REG_LINK_OFFSET
            link = L.U64.unpack_from(m, base + 8 * L.LQ_STATE)[0]
            syncs = L.U64.unpack_from(m, base + 8 * L.LQ_SYNCS)[0]
        return {
            "link": {L.LINK_UP: "up", L.LINK_DOWN: "down", L.LINK_CONNECTING: "connecting"}.get(
                link, "none (single host, or no leader)"
            ),
            "binding_syncs": syncs,
            "namespace": cfg.namespace,
            "site": bytes(m[L.H_SITE_LABEL : L.H_SITE_LABEL + L.H_SITE_LABEL_LEN])
            .split(b"\0", 1)[0]
            .decode("utf-8", "replace"),
            "exists": True,
            "max_participants": max_p,
            "ring_bytes": hdr[2],
            "leader_pid": leader_pid,
            "leader_epoch": L.U64.unpack_from(m, L.H_LEADER_EPOCH)[0],
            "participants": parts,
        }
    finally:
        m.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hybrid_layer")
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("status", help="show a host namespace: participants, leader, counters")
    st.add_argument("--prefix", default="asgi")
    st.add_argument("--host-id", default=None)
    st.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    info = status(args.prefix, args.host_id)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    if not info["exists"]:
        print(f"{info['namespace']}: no shared memory (no process attached)")
        return 0
    print(
        f"{info['namespace']}: leader pid {info['leader_pid']} (epoch {info['leader_epoch']}),"
        f" {len(info['participants'])} participant(s), ring {info['ring_bytes']} bytes,"
        f" RabbitMQ link {info['link']}" + (f", site {info['site']!r}" if info["site"] else "")
    )
    for p in info["participants"]:
        dropped = {k[8:]: v for k, v in p.items() if k.startswith("dropped_") and v}
        print(
            f"  slot {p['slot']:3d} pid {p['pid']:7d} {'LEADER ' if p['leader'] else ''}"
            f"{'' if p['alive'] else '(dead, not yet reclaimed) '}"
            f"sent {p['sent']} received {p['received']} dropped {dropped or 0}"
            + (
                f" broker published {p['broker_published']} confirmed {p['broker_confirmed']}"
                f" received {p['broker_received']} reconnects {p['broker_reconnects']}"
                if p["broker_published"] or p["broker_received"] or p["broker_reconnects"]
                else ""
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
