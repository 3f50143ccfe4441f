"""RabbitMQ nodes of the tests' own: a cluster of them, a node with a TLS listener.

Each node has its own name (``hlt<port>@localhost``), AMQP port, distribution port,
config, data and log directories under a temporary directory, and runs as the user
running the tests (``/usr/lib/rabbitmq/bin/rabbitmq-server``, not the service wrapper).
They share an Erlang cookie of their own (``HOME`` is the temporary directory), so the
broker on 5672 is never touched. Everything is stopped, and its directories removed,
by :meth:`Nodes.stop_all` (the fixtures call it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BIN = Path("/usr/lib/rabbitmq/bin")
FIRST_PORT = 5701


def available() -> str | None:
    """None if nodes can be started here, else why not."""
    if not (BIN / "rabbitmq-server").exists():
        return f"{BIN / 'rabbitmq-server'} is missing (apt-get install rabbitmq-server)"
    if shutil.which("openssl") is None:
        return "openssl is missing (apt-get install openssl)"
    return None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Node:
    def __init__(self, nodes: Nodes, port: int, tls_port: int | None = None) -> None:
        self.nodes = nodes
        self.port = port
        self.tls_port = tls_port
        self.name = f"hlt{port}@localhost"
        self.dir = nodes.base / f"n{port}"
        self.dir.mkdir()
        (self.dir / "enabled_plugins").write_text("[].\n")
        conf = [
            f"listeners.tcp.1 = 127.0.0.1:{port}",
            "loopback_users = none",
            # a node that lost its peers keeps serving what it can (a test kills nodes)
            "cluster_partition_handling = ignore",
        ]
        if tls_port is not None:
            ca = nodes.tls_dir
            conf += [
                f"listeners.ssl.1 = 127.0.0.1:{tls_port}",
                f"ssl_options.cacertfile = {ca / 'ca.pem'}",
                f"ssl_options.certfile = {ca / 'server.pem'}",
                f"ssl_options.keyfile = {ca / 'server.key'}",
                "ssl_options.verify = verify_none",
                "ssl_options.fail_if_no_peer_cert = false",
            ]
        (self.dir / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        self.pid: int | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def tls_url(self) -> str:
        return f"amqps://guest:guest@localhost:{self.tls_port}/"

    def env(self) -> dict[str, str]:
        d = self.dir
        return {
            **os.environ,
            "HOME": str(self.nodes.base),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.port + 20000),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(d / "pid"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
        }

    def _cli(self, tool: str, *args: str, timeout: float, check: bool) -> str:
        p = subprocess.run(
            [str(BIN / tool), "-n", self.name, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and p.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} on {self.name}: {p.stderr or p.stdout}")
        return p.stdout

    def ctl(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        return self._cli("rabbitmqctl", *args, timeout=timeout, check=check)

    def queues_cli(self, *args: str, timeout: float = 60) -> str:
        """``rabbitmq-queues`` against this node (quorum queue membership)."""
        return self._cli("rabbitmq-queues", *args, timeout=timeout, check=False)

    def start(self, wait: bool = True) -> None:
        pidfile = self.dir / "pid"
        pidfile.unlink(missing_ok=True)
        subprocess.run(
            [str(BIN / "rabbitmq-server"), "-detached"],
            env=self.env(),
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not pidfile.exists():
            time.sleep(0.05)
        text = pidfile.read_text().strip() if pidfile.exists() else ""
        self.pid = int(text) if text.isdigit() else None
        if wait:
            self.wait()

    def wait(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _listening(self.port) and (self.tls_port is None or _listening(self.tls_port)):
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"{self.name} did not listen on {self.port} in {timeout}s: see {self.dir}/log"
        )

    def running(self) -> bool:
        if self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _find_pid(self) -> int | None:
        """The node's VM, when ``start`` could not read its pid in time (a busy machine
        writes the pid file late): its pid file now, else the process whose environment
        names this node's own data directory (so only a node we started is found)."""
        pidfile = self.dir / "pid"
        text = pidfile.read_text().strip() if pidfile.exists() else ""
        if text.isdigit():
            return int(text)
        mark = f"RABBITMQ_MNESIA_BASE={self.dir / 'mnesia'}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if mark in env and b"beam" in cmd:
                return int(entry.name)
        return None

    def kill(self) -> None:
        """SIGKILL the node's VM (a node lost: its sockets close at once)."""
        if self.pid is None:
            self.pid = self._find_pid()
        if self.pid is not None and self.running():
            os.kill(self.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.05)
        self.pid = None

    def stop(self) -> None:
        """A clean stop (``rabbitmqctl stop``), else a SIGKILL."""
        if self.pid is None:
            self.pid = self._find_pid()
        if not self.running():
            self.pid = None
            return
        with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
            self.ctl("stop", timeout=60)
        deadline = time.monotonic() + 30
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.kill()


class Nodes:
    """The nodes of one test module, in a temporary directory of their own."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="hl-rabbit-"))
        self.tls_dir = self.base / "tls"
        self.nodes: list[Node] = []

    def _ports(self) -> int:
        port = FIRST_PORT
        used = {n.port for n in self.nodes} | {n.tls_port for n in self.nodes}
        while port in used or not all(_port_free(p) for p in (port, port + 20000, port + 100)):
            port += 1
        return port

    def node(self, tls: bool = False) -> Node:
        port = self._ports()
        if tls and not (self.tls_dir / "ca.pem").exists():
            make_certs(self.tls_dir)
        n = Node(self, port, tls_port=port + 100 if tls else None)
        self.nodes.append(n)
        return n

    def cluster(self, size: int = 3) -> list[Node]:
        """``size`` nodes joined into one cluster (the first is the seed)."""
        members = [self.node() for _ in range(size)]
        for n in members:
            n.start(wait=False)
        for n in members:
            n.wait()
        seed = members[0]
        for n in members[1:]:
            n.ctl("stop_app")
            n.ctl("join_cluster", seed.name)
            n.ctl("start_app")
        for n in members:
            n.ctl("await_startup", "--timeout", "60")
        return members

    def stop_all(self) -> None:
        for n in self.nodes:
            n.kill()
        shutil.rmtree(self.base, ignore_errors=True)


def make_certs(d: Path, cn: str = "localhost") -> None:
    """A CA and a server certificate for ``cn`` signed by it (openssl), and a second,
    unrelated CA (``other-ca.pem``) for the wrong-CA case."""
    d.mkdir(parents=True, exist_ok=True)

    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    for ca in ("ca", "other-ca"):
        ossl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.pem",
            "-subj",
            f"/CN=hybrid_layer test {ca}",
        )
    ossl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        f"/CN={cn}",
    )
    (d / "san.ext").write_text(f"subjectAltName=DNS:{cn},IP:127.0.0.1\n")
    ossl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    )
    for f in d.iterdir():
        f.chmod(0o644)
