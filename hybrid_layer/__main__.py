"""Operator's command line: ``python -m hybrid_layer status [--prefix P] [--host-id H]``.

Reads the host namespace's registry without joining it (no slot is taken, no election
is entered) and prints the live participants, the leader, whose registry it is, and
every counter ``statistics()`` has: per participant and summed over the host.

It also judges the host's health, so that it can serve as a container probe: unhealthy
when the namespace has no live leader, or the leader's RabbitMQ link is down or still
connecting (with ``--broker``: also when no link was ever started). Use it as a
readiness probe; for a liveness probe add ``--liveness``, which ignores the broker
(an outage must not restart containers whose same-host traffic still flows). A
namespace with no live process (names left by processes that were killed) is healthy:
nothing is attached yet, and the next process re-initialises it.

Exit status: 0 healthy, or no such namespace (nothing attached yet: the layer attaches
on first use, so a probe must not fail a worker that has had no traffic); 1 the
segment is not a readable registry of this version; 2 usage error (a bad ``--prefix``
or ``--host-id``); 3 the namespace belongs to another user (shown when readable - as
root - and said so either way); 4 unhealthy (the reasons are printed).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import pwd
import struct
import sys
from typing import Any

import posix_ipc

from .config import LayerConfig, parse_config
from .shm import layout as L
from .shm.locks import LockFile
from .stats import DROP_REASONS, bucket_pending

EXIT_OK = 0
EXIT_UNREADABLE = 1
EXIT_USAGE = 2
EXIT_OTHER_USER = 3
EXIT_UNHEALTHY = 4
SHM_FS = "/dev/shm"  # where Linux keeps POSIX shared memory (for the owner of one we cannot open)


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "?"


def _owner(info: dict[str, Any], uid: int) -> None:
    info["owner_uid"] = uid
    info["owner"] = _user(uid)
    info["yours"] = uid == os.geteuid()


def _slot_pending(cfg: LayerConfig, i: int, channel_buckets: int) -> int:
    """Messages waiting for slot ``i``'s channels (its capacity counters), or -1."""
    try:
        shm = posix_ipc.SharedMemory(f"/{cfg.namespace}.s{i}")
    except posix_ipc.Error:
        return -1
    try:
        size = L.PAGE + 2 * channel_buckets * L.BUCKET.size
        if os.fstat(shm.fd).st_size < size:
            return -1
        m = mmap.mmap(shm.fd, size, prot=mmap.PROT_READ)
    except (OSError, ValueError):
        return -1
    finally:
        shm.close_fd()
    try:
        with memoryview(m) as mv, mv[L.PAGE : size] as raw, raw.cast("I") as bk:
            return bucket_pending(bk)
    finally:
        m.close()


def status(cfg: LayerConfig) -> dict[str, Any]:
    """What ``status`` shows, as a dict (``--json``). ``exists`` False: no registry;
    ``readable`` False: one we may not read (``owner`` says whose) or not a registry."""
    name = f"/{cfg.namespace}.reg"
    info: dict[str, Any] = {"namespace": cfg.namespace, "exists": True, "readable": False}
    try:
        shm = posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError:
        return {"namespace": cfg.namespace, "exists": False, "participants": []}
    except posix_ipc.PermissionsError:
        try:
            _owner(info, os.stat(f"{SHM_FS}{name}").st_uid)
        except OSError:
            info["owner_uid"], info["owner"], info["yours"] = -1, "?", False
        info["error"] = "permission denied"
        return info
    try:
        st = os.fstat(shm.fd)
        _owner(info, st.st_uid)
        if st.st_size < L.registry_size(1):
            info["error"] = f"{st.st_size} bytes: too small for a registry"
            return info
        m = mmap.mmap(shm.fd, st.st_size, prot=mmap.PROT_READ)
    finally:
        shm.close_fd()
    try:
        return _read(cfg, m, st.st_size, info)
    except (struct.error, ValueError, IndexError) as exc:
        info["error"] = f"not a registry this version can read ({exc})"
        return info
    finally:
        m.close()


def _read(cfg: LayerConfig, m: mmap.mmap, size: int, info: dict[str, Any]) -> dict[str, Any]:
    hdr = L.REG_HEADER.unpack_from(m, 0)
    magic, version, ring_bytes, max_p, channel_buckets = hdr[:5]
    if magic != L.MAGIC or version != L.VERSION:
        info["error"] = (
            f"not a registry of this version (magic {magic:#x}, version {version}; "
            f"this hybrid_layer reads version {L.VERSION})"
        )
        return info
    if L.registry_size(max_p) > size:
        info["error"] = f"registry says {max_p} slots but has only {size} bytes"
        return info
    leader_slot, _gen, leader_pid = L.LEADER_FIELDS.unpack_from(m, L.H_LEADER)
    lock_path = f"{L.SHM_FS}/{cfg.namespace}.reg"  # the locks are on the registry's own file
    try:
        lf: LockFile | None = LockFile(lock_path, cfg.mode) if os.path.exists(lock_path) else None
    except OSError:
        lf = None
    parts = []
    totals = dict.fromkeys(L.STATS_FIELDS, 0)
    pending_total = 0
    try:
        for i in range(max_p):
            state, gen, pid, started = L.REG_SLOT.unpack_from(m, L.reg_slot_offset(i))
            if state != L.SLOT_LIVE:
                continue
            alive = lf.held_by_other(L.SLOT_LOCK_BASE + i) if lf else False
            stats = L.REG_STATS.unpack_from(m, L.reg_slot_offset(i) + L.REG_STATS_OFFSET)
            counts = dict(zip(L.STATS_FIELDS, stats, strict=True))
            for k, v in counts.items():
                totals[k] += v
            pending = _slot_pending(cfg, i, channel_buckets)
            pending_total += max(pending, 0)
            parts.append(
                {
                    "slot": i,
                    "gen": gen,
                    "pid": pid,
                    "alive": alive,
                    "started": started,
                    "leader": i == leader_slot,
                    "pending": pending,
                    **counts,
                }
            )
    finally:
        if lf:
            lf.close()
    link = L.LINK_NONE
    syncs = 0
    reason = 0
    if 0 <= leader_slot < max_p:
        base = L.reg_slot_offset(leader_slot) + L.REG_LINK_OFFSET
        link = L.U64.unpack_from(m, base + 8 * L.LQ_STATE)[0]
        syncs = L.U64.unpack_from(m, base + 8 * L.LQ_SYNCS)[0]
        reason = L.U64.unpack_from(m, base + 8 * L.LQ_REASON)[0]
    info["link_reason"] = L.REASONS.get(reason, f"reason {reason}")
    info["leader_alive"] = any(p["leader"] and p["alive"] for p in parts)
    info.update(
        {
            "readable": True,
            "link": {L.LINK_UP: "up", L.LINK_DOWN: "down", L.LINK_CONNECTING: "connecting"}.get(
                link, "none (single host, or no leader)"
            ),
            "binding_syncs": syncs,
            "site": bytes(m[L.H_SITE_LABEL : L.H_SITE_LABEL + L.H_SITE_LABEL_LEN])
            .split(b"\0", 1)[0]
            .decode("utf-8", "replace"),
            "max_participants": max_p,
            "ring_bytes": ring_bytes,
            "leader_pid": leader_pid,
            "leader_epoch": L.U64.unpack_from(m, L.H_LEADER_EPOCH)[0],
            "pending": pending_total,
            "totals": totals,
            "participants": parts,
        }
    )
    return info


def _counters(c: dict[str, Any], *, all_: bool) -> list[str]:
    """The counters as text lines: sends, raised, dropped by reason, broker."""

    def fmt(label: str, keys: list[tuple[str, str]]) -> str | None:
        shown = [f"{name} {c[k]}" for name, k in keys if all_ or c[k]]
        return f"{label}: {', '.join(shown)}" if shown else None

    lines = [
        fmt(
            "messages",
            [
                ("sent", "sent"),
                ("received", "received"),
                ("group_sends", "group_sends"),
                ("group_copies", "group_copies"),
            ],
        ),
        fmt("raised", [("full", "raised_full"), ("too_large", "raised_too_large")]),
        fmt("dropped", [(r, "dropped_" + r) for r in DROP_REASONS]),
        fmt(
            "broker", [(k[len("broker_") :], k) for k in L.STATS_FIELDS if k.startswith("broker_")]
        ),
    ]
    return [x for x in lines if x is not None]


def problems(info: dict[str, Any], broker: bool = False, liveness: bool = False) -> list[str]:
    """Why the host is unhealthy (empty: healthy), from what ``status`` read.

    A namespace with no live process at all (every one was SIGKILLed: its names stay
    until the next attach re-initialises them) is not unhealthy: nothing is attached
    yet, as after a fresh start. ``liveness``: only what a restart of this container
    could cure (a leader that is gone and not replaced), not the broker's state: a
    broker outage must not restart every container of a site whose same-host traffic
    still flows.
    """
    if not info.get("exists") or not info.get("readable"):
        return []
    if not any(p["alive"] for p in info["participants"]):
        info["stale"] = True  # (shown; re-initialised by the next process to attach)
        return []
    out = []
    if info["leader_pid"] <= 0 or not info.get("leader_alive"):
        out.append(
            "no live leader (an election under way)"
            if info["leader_pid"] <= 0
            else f"the leader (pid {info['leader_pid']}) is gone and not yet replaced"
        )
    if liveness:
        return out
    link = info["link"]
    if link in ("down", "connecting"):
        why = info.get("link_reason") or "not connected yet"
        out.append(f"the RabbitMQ link is {link}: {why}")
    elif broker and link != "up":
        out.append("no RabbitMQ link yet (a new leader is starting it, or `host` is not set)")
    return out


def render(info: dict[str, Any]) -> str:
    ns = info["namespace"]
    if not info["exists"]:
        return f"{ns}: no shared memory (no process attached)"
    out = []
    me = os.geteuid()
    if not info.get("yours", True):
        out.append(
            f"NOTE: {ns} belongs to uid {info['owner_uid']} ({info['owner']}), not to you "
            f"(uid {me}, {_user(me)}): it is another user's site (or a squatter's), not yours"
        )
    if not info["readable"]:
        if info.get("error") == "permission denied":
            out.append(
                f"{ns}: cannot read it (permission denied): run this as uid "
                f"{info['owner_uid']} ({info['owner']}), e.g. sudo -u {info['owner']} ..."
            )
        else:
            out.append(f"{ns}: {info.get('error', 'unreadable')}")
        return "\n".join(out)
    out.append(
        f"{ns}: owner uid {info['owner_uid']} ({info['owner']}), leader pid "
        f"{info['leader_pid']} (epoch {info['leader_epoch']}), "
        f"{len(info['participants'])} participant(s), ring {info['ring_bytes']} bytes,"
        f" RabbitMQ link {info['link']}"
        + (f" ({info['link_reason']})" if info["link"] in ("down", "connecting") else "")
        + (f", site {info['site']!r}" if info["site"] else "")
    )
    bad = info.get("problems", [])
    if info.get("stale"):
        out.append(
            "  health: ok - no live process: names left by processes that did not close "
            "(re-initialised by the next one to attach)"
        )
    else:
        out.append("  health: " + ("UNHEALTHY: " + "; ".join(bad) if bad else "ok"))
    out.append(f"  host: pending {info['pending']}")
    out.extend("    " + x for x in _counters(info["totals"], all_=True))
    for p in info["participants"]:
        out.append(
            f"  slot {p['slot']:3d} pid {p['pid']:7d} {'LEADER ' if p['leader'] else ''}"
            f"{'' if p['alive'] else '(dead, not yet reclaimed) '}pending {p['pending']}"
        )
        out.extend("    " + x for x in _counters(p, all_=False))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m hybrid_layer",
        epilog="exit status: 0 healthy (or no such namespace), 1 not a readable registry, "
        "2 usage error, 3 the namespace belongs to another user, 4 unhealthy",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("status", help="show a host namespace: participants, leader, counters")
    st.add_argument("--prefix", default="asgi")
    st.add_argument("--host-id", default=None)
    st.add_argument("--json", action="store_true")
    st.add_argument(
        "--broker",
        action="store_true",
        help="the host runs in broker mode: no RabbitMQ link at all is unhealthy too",
    )
    st.add_argument(
        "--liveness",
        action="store_true",
        help="judge only what a restart could cure (the leader), not the broker link: "
        "for a liveness probe (use the default for readiness)",
    )
    args = ap.parse_args(argv)
    raw: dict[str, Any] = {}
    for flag, key, value in (
        ("--prefix", "prefix", args.prefix),
        ("--host-id", "host_id", args.host_id),
    ):
        if value is None:
            continue
        try:
            parse_config({key: value})
        except ValueError as exc:
            st.error(f"argument {flag}: {value!r} is not usable: {exc}")  # exits 2
        raw[key] = value
    info = status(parse_config(raw))
    info["problems"] = problems(info, args.broker, args.liveness)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(render(info))
    if not info["exists"]:
        return EXIT_OK
    if not info.get("yours", True):
        return EXIT_OTHER_USER
    if not info["readable"]:
        return EXIT_UNREADABLE
    return EXIT_UNHEALTHY if info["problems"] else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
