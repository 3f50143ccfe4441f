"""CONFIG dict -> one frozen, validated :class:`LayerConfig`.

Every problem is a ``ValueError`` raised at construction that names the key, so a typo
in ``CHANNEL_LAYERS`` fails at startup rather than at the first message.

One module on purpose, though over 400 lines: it is one table of keys - each key's
default, check and error text side by side, with the two probes of the host its
defaults need (``default_host_id``, ``shm_dir_problem``) - and split, one key's rules
would be spread over several files.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import os
import re
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .shm.owner import user_text

_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")

MIB = 1024 * 1024
#: under RabbitMQ's default max_message_size (128 MiB up to 3.13; 4.x: 16 MiB, see README)
DEFAULT_MAX_MESSAGE_BYTES = 100 * MIB
MAX_MESSAGE_BYTES_LIMIT = 256 * MIB
DEFAULT_RING_BYTES = 4 * MIB + 64 * 1024
MIN_RING_BYTES = 64 * 1024
PUBLISH_BATCH_MAX = 1024

#: Keys that only mean something with a broker (``host``) configured.
BROKER_KEYS = frozenset(
    {
        "ssl_context",
        "groups_exchange",
        "symmetric_encryption_keys",
        "remote_capacity",
        "publish_batch",
        "heartbeat",
        "connect_timeout",
        "on_disconnect",
        "on_reconnect",
        "host_queue_expires",
        "queue_type",
        "outbound_limit",
        "outbound_limit_bytes",
    }
)
QUEUE_TYPES = ("classic", "quorum")


def default_host_id(shm_dir: str = "/dev/shm") -> str:
    """A short stable id for the processes that share one ``shm_dir`` on one machine.

    What makes processes one host is that they share shared memory, so the id is
    derived from the machine (``/etc/machine-id``; else the kernel's boot id, shared by
    every container on one kernel) and the device of ``shm_dir``: two containers with
    their own ``/dev/shm`` (one tmpfs each) get two ids even from one image with one
    machine-id; a sidecar that shares the pod's ``/dev/shm`` under another hostname
    gets the same id. Not the hostname. Two machines that still come out equal (cloned
    machine-ids and equal device numbers) are told apart by the broker's host claim,
    loudly: set ``host_id`` per host then.
    """
    raw = b""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id", "/proc/sys/kernel/random/boot_id"):
        try:
            with open(path, "rb") as f:
                raw = f.read().strip()
        except OSError:
            continue
        if raw:
            break
    if not raw:
        raw = socket.gethostname().encode()
    try:
        dev = os.stat(shm_dir).st_dev
    except OSError:
        dev = 0
    return "h" + hashlib.sha256(raw + b"|%d" % dev).hexdigest()[:10]


def _open_to_others(st: os.stat_result) -> bool:
    """Other users may create, remove or rename entries in this directory."""
    return bool(st.st_mode & (stat.S_IWOTH | stat.S_IWGRP)) and not st.st_mode & stat.S_ISVTX


def shm_dir_problem(path: str) -> str | None:
    """Why ``path`` is not a safe ``shm_dir``, else None. Shared by the layer's
    constructor (a ``ValueError``) and the Django system check ``hybrid_layer.E002``.

    Safe means no other user can put a file of their choosing (a symlink to
    ``/etc/passwd``, a FIFO of theirs) where this site's lock file and doorbells go, nor
    replace the directory itself: it is owned by this user or root, is not writable by
    others unless sticky (like ``/dev/shm``: then they can add names, never replace
    ours), and no directory above it, nor a symlink on the way, is another user's.
    """
    me = os.geteuid()
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"shm_dir {path!r} cannot be used: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"shm_dir {path!r} is not a directory"
    if _open_to_others(st):
        return (
            f"shm_dir {path!r} is writable by other users without the sticky bit: they "
            "could replace this site's files (chmod +t, or use a directory of its own)"
        )
    if st.st_uid not in (0, me):
        return (
            f"shm_dir {path!r} is owned by {user_text(st.st_uid)}, not by this user or "
            "root: that user could replace this site's files"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        return f"shm_dir {path!r} is not writable by this user ({user_text(me)})"
    # every symlink on the way, and every directory above the real one
    parts = path.strip("/").split("/")
    for k in range(1, len(parts)):
        here = "/" + "/".join(parts[:k])
        lst = os.lstat(here)
        if stat.S_ISLNK(lst.st_mode) and lst.st_uid not in (0, me):
            return (
                f"shm_dir {path!r} goes through the symlink {here!r} owned by "
                f"{user_text(lst.st_uid)}: that user decides where this site's files go"
            )
    if os.path.islink(path) and os.lstat(path).st_uid not in (0, me):
        return (
            f"shm_dir {path!r} is a symlink owned by {user_text(os.lstat(path).st_uid)}: "
            "that user decides where this site's files go (use the real directory)"
        )
    real = os.path.realpath(path)
    up = os.path.dirname(real)
    while True:
        pst = os.stat(up)
        if pst.st_uid not in (0, me) or _open_to_others(pst):
            who = user_text(pst.st_uid)
            why = (
                "writable by other users without the sticky bit"
                if _open_to_others(pst)
                else f"owned by {who}"
            )
            return f"shm_dir {path!r} is inside {up!r}, {why}: they could replace it"
        if up == "/":
            return None
        up = os.path.dirname(up)


@dataclass(frozen=True, slots=True)
class LayerConfig:
    prefix: str = "asgi"
    host_id: str = field(default_factory=default_host_id)
    expiry: float = 60.0
    group_expiry: float = 86400.0
    capacity: int = 100
    channel_capacity: tuple[tuple[re.Pattern[str], int], ...] = ()
    #: a message costs its size in shared memory while in flight (out of the ring past
    #: ring_bytes // 4), plus its encoded copy in the sender and decoded one in the reader
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ring_bytes: int = DEFAULT_RING_BYTES
    max_participants: int = 64
    channel_buckets: int = 4096
    max_groups_per_process: int = 16384
    shm_dir: str = "/dev/shm"
    mode: int = 0o600
    #: what identifies the site (Django project) using this namespace; two sites that
    #: set different values and share a prefix and host are refused (NamespaceMismatch).
    #: Empty: guessed from DJANGO_SETTINGS_MODULE and settings.BASE_DIR (a clash is only
    #: logged as an ERROR and counted: a guess may differ between a site's own processes)
    site: str = ""
    #: µs an idle receive() polls its inbox before sleeping (0 = never; see README)
    receive_spin_us: int = 0
    # ---- broker mode (RabbitMQ); empty ``broker_urls`` = single host
    broker_urls: tuple[str, ...] = ()
    ssl_context: Any = None
    groups_exchange: str = "groups"
    encryption_keys: tuple[bytes, ...] = ()
    remote_capacity: int = 100_000
    publish_batch: int = 128  # messages for one destination per AMQP message (1 = no batches)
    heartbeat: int = 5
    connect_timeout: float = 5.0
    on_disconnect: str | None = None
    on_reconnect: str | None = None
    #: seconds the broker keeps a host's queue (and its bindings) with no consumer
    host_queue_expires: float = 1800.0
    queue_type: str = "classic"  # of the host's queue: "classic" or "quorum" (README)
    #: messages (and bytes) the leader keeps for the broker while its link is not up or
    #: slow; past them send() backs off and raises ChannelFull, group_send drops
    outbound_limit: int = 20_000
    outbound_limit_bytes: int = 64 * MIB

    @property
    def broker(self) -> bool:
        return bool(self.broker_urls)

    @property
    def namespace(self) -> str:
        """Stem of every shared-memory name of this host namespace."""
        return f"hl.{self.prefix}.{self.host_id}"

    def capacity_for(self, channel: str) -> int:
        for pattern, cap in self.channel_capacity:
            if pattern.match(channel):
                return cap
        return self.capacity

    def layout_key(self) -> tuple[int, ...]:
        """The values every process of one namespace must agree on."""
        return (
            self.ring_bytes,
            self.max_participants,
            self.channel_buckets,
            self.max_groups_per_process,
        )


def _number(
    key: str, value: Any, *, minimum: float, integer: bool = False, maximum: float | None = None
) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"CONFIG[{key!r}] must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"CONFIG[{key!r}] must be a finite number, got {value!r}")
    if integer and not isinstance(value, int):
        raise ValueError(f"CONFIG[{key!r}] must be a whole number, got {value!r}")
    if value < minimum:
        raise ValueError(f"CONFIG[{key!r}] must be at least {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"CONFIG[{key!r}] must be at most {maximum}, got {value!r}")
    return value


def _ident(key: str, value: Any) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ValueError(
            f"CONFIG[{key!r}] must be 1-32 characters of letters, digits, '-' or '_', got {value!r}"
        )
    return value


def _capacities(value: Any) -> tuple[tuple[re.Pattern[str], int], ...]:
    key = "channel_capacity"
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ValueError(f"CONFIG[{key!r}] must be a dict of pattern -> capacity")
    out = []
    for item in items:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise ValueError(f"CONFIG[{key!r}] entries must be (pattern, capacity) pairs")
        pattern, cap = item
        if isinstance(pattern, str):
            compiled = re.compile(fnmatch.translate(pattern))
        elif isinstance(pattern, re.Pattern):
            compiled = pattern
        else:
            raise ValueError(
                f"CONFIG[{key!r}] pattern must be a glob string or compiled regex, got {pattern!r}"
            )
        out.append((compiled, _number(f"{key}[{pattern!r}]", cap, minimum=1, integer=True)))
    return tuple(out)


def parse_config(raw: Mapping[str, Any] | None = None, **kwargs: Any) -> LayerConfig:
    """Validate a CONFIG dict (or keyword arguments, as channels passes them)."""
    values: dict[str, Any] = dict(raw or {})
    values.update(kwargs)
    known = (set(LayerConfig.__dataclass_fields__) - {"broker_urls", "encryption_keys"}) | {
        "host",
        "symmetric_encryption_keys",
    }
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown CONFIG key(s) {unknown}; known keys: {sorted(known)}")
    out: dict[str, Any] = {}
    if "prefix" in values:
        out["prefix"] = _ident("prefix", values["prefix"])
    if "host_id" in values:
        out["host_id"] = _ident("host_id", values["host_id"])
    for key in ("expiry", "group_expiry"):
        if key in values:
            out[key] = float(_number(key, values[key], minimum=0.001))
    if "capacity" in values:
        out["capacity"] = _number("capacity", values["capacity"], minimum=1, integer=True)
    if "channel_capacity" in values and values["channel_capacity"] is not None:
        out["channel_capacity"] = _capacities(values["channel_capacity"])
    if "max_message_bytes" in values:
        mmb = _number("max_message_bytes", values["max_message_bytes"], minimum=1024, integer=True)
        if mmb > MAX_MESSAGE_BYTES_LIMIT:
            raise ValueError(f"CONFIG['max_message_bytes'] must be at most 256 MiB, got {mmb}")
        out["max_message_bytes"] = mmb
    # (independent of max_message_bytes: a record over ring_bytes // 4 travels in a
    # shared-memory segment of its own, referenced from the ring - shm.spill)
    if "ring_bytes" in values:
        ring = _number("ring_bytes", values["ring_bytes"], minimum=MIN_RING_BYTES, integer=True)
        out["ring_bytes"] = (ring + 4095) // 4096 * 4096
    if "max_participants" in values:
        out["max_participants"] = _number(
            "max_participants", values["max_participants"], minimum=2, maximum=1024, integer=True
        )
    if "channel_buckets" in values:
        out["channel_buckets"] = _number(
            "channel_buckets", values["channel_buckets"], minimum=16, maximum=1 << 20, integer=True
        )
    if "max_groups_per_process" in values:
        out["max_groups_per_process"] = _number(
            "max_groups_per_process",
            values["max_groups_per_process"],
            minimum=16,
            maximum=1 << 22,
            integer=True,
        )
    if "shm_dir" in values:
        if not isinstance(values["shm_dir"], str) or not values["shm_dir"].startswith("/"):
            raise ValueError(
                f"CONFIG['shm_dir'] must be an absolute path, got {values['shm_dir']!r}"
            )
        out["shm_dir"] = values["shm_dir"].rstrip("/") or "/"
    if "mode" in values:
        mode = values["mode"]
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0o400 <= mode <= 0o777:
            raise ValueError(f"CONFIG['mode'] must be a file mode such as 0o600, got {mode!r}")
        if not mode & 0o600 == 0o600:
            raise ValueError("CONFIG['mode'] must let the owner read and write (0o600 bits)")
        out["mode"] = mode
    if "site" in values:
        site = values["site"]
        if not isinstance(site, str) or not 0 < len(site.encode()) <= 200:
            raise ValueError(
                f"CONFIG['site'] must be a non-empty str of at most 200 bytes naming the "
                f"site (e.g. the project's name), got {site!r}"
            )
        out["site"] = site
    if "receive_spin_us" in values:
        out["receive_spin_us"] = _number(
            "receive_spin_us", values["receive_spin_us"], minimum=0, maximum=10_000, integer=True
        )
    out.update(_broker(values))
    if "host_id" not in out:
        out["host_id"] = default_host_id(out.get("shm_dir", "/dev/shm"))
    return LayerConfig(**out)


def _broker(values: Mapping[str, Any]) -> dict[str, Any]:
    """The broker-mode keys: ``host`` turns it on; the others need it."""
    out: dict[str, Any] = {}
    host = values.get("host")
    if host is None:
        stray = sorted(k for k in BROKER_KEYS & set(values) if values[k] is not None)
        if stray:
            raise ValueError(
                f"CONFIG{stray} only apply with a broker: set CONFIG['host'] to an AMQP URL "
                "(amqp://user:password@host:5672/vhost), or remove them to run single-host"
            )
        return out
    urls = [host] if isinstance(host, str) else host
    if not isinstance(urls, list | tuple) or not urls:
        raise ValueError(
            "CONFIG['host'] must be an AMQP URL or a non-empty list of them (a cluster, "
            f"tried in turn), got {host!r}"
        )
    for url in urls:
        if not isinstance(url, str) or not re.match(r"amqps?://[^/?#]", url):
            raise ValueError(
                f"CONFIG['host'] entries must be amqp:// or amqps:// URLs, got {url!r}"
            )
    out["broker_urls"] = tuple(urls)
    ctx = values.get("ssl_context")
    if ctx is not None:
        import ssl

        if not isinstance(ctx, ssl.SSLContext):
            raise ValueError(
                f"CONFIG['ssl_context'] must be an ssl.SSLContext, got {type(ctx).__name__}"
            )
        out["ssl_context"] = ctx
    if "groups_exchange" in values:
        ex = values["groups_exchange"]
        if not isinstance(ex, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,127}", ex):
            raise ValueError(
                "CONFIG['groups_exchange'] must be 1-127 characters of letters, digits, "
                f"'_', '.', ':' or '-', got {ex!r}"
            )
        out["groups_exchange"] = ex
    keys = values.get("symmetric_encryption_keys")
    if keys is not None:
        if isinstance(keys, str | bytes) or not isinstance(keys, list | tuple) or not keys:
            raise ValueError(
                "CONFIG['symmetric_encryption_keys'] must be a non-empty list of keys "
                "(the first encrypts, all decrypt)"
            )
        enc = []
        for k in keys:
            if isinstance(k, str):
                k = k.encode()
            if not isinstance(k, bytes) or not k:
                raise ValueError(
                    "CONFIG['symmetric_encryption_keys'] entries must be non-empty str or "
                    f"bytes, got {k!r}"
                )
            enc.append(k)
        try:
            import cryptography  # noqa: F401
        except ImportError:
            raise ValueError(
                "CONFIG['symmetric_encryption_keys'] needs the 'cryptography' package: "
                "pip install 'hybrid-layer[crypto]'"
            ) from None
        out["encryption_keys"] = tuple(enc)
    if "remote_capacity" in values:
        out["remote_capacity"] = _number(
            "remote_capacity", values["remote_capacity"], minimum=1, integer=True
        )
    if "publish_batch" in values:
        out["publish_batch"] = _number(
            "publish_batch",
            values["publish_batch"],
            minimum=1,
            maximum=PUBLISH_BATCH_MAX,
            integer=True,
        )
    if "heartbeat" in values:
        out["heartbeat"] = _number(
            "heartbeat", values["heartbeat"], minimum=0, maximum=3600, integer=True
        )
    if "connect_timeout" in values:
        out["connect_timeout"] = float(
            _number("connect_timeout", values["connect_timeout"], minimum=0.1)
        )
    if "host_queue_expires" in values:
        out["host_queue_expires"] = float(
            _number("host_queue_expires", values["host_queue_expires"], minimum=1.0)
        )
    if "queue_type" in values:
        qt = values["queue_type"]
        if qt not in QUEUE_TYPES:
            raise ValueError(f"CONFIG['queue_type'] must be one of {list(QUEUE_TYPES)}, got {qt!r}")
        out["queue_type"] = qt
    if "outbound_limit" in values:
        out["outbound_limit"] = _number(
            "outbound_limit", values["outbound_limit"], minimum=100, integer=True
        )
    if "outbound_limit_bytes" in values:
        out["outbound_limit_bytes"] = _number(
            "outbound_limit_bytes", values["outbound_limit_bytes"], minimum=MIB, integer=True
        )
    for key in ("on_disconnect", "on_reconnect"):
        v = values.get(key)
        if v is not None:
            if not isinstance(v, str) or not v or len(v) > 100:
                raise ValueError(
                    f"CONFIG[{key!r}] must be a message type (a non-empty str such as "
                    f"'broker.{key[3:]}'), got {v!r}"
                )
            out[key] = v
    return out
