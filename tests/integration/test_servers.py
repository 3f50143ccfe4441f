"""The layer under real ASGI servers with several worker processes.

Each test starts ``tests.apps.chatapp`` under a real server (gunicorn with uvicorn
workers, with and without ``--preload``, and ``uvicorn --workers``) on a free port, in
its own session and with its own layer prefix; opens real websocket clients until they
sit on at least two different worker processes; checks that a ``group_send`` from a
client on one worker reaches every client on every worker exactly once, and that a
direct ``channel_layer.send`` crosses from each worker to each other; then stops the
server with SIGTERM (SIGKILL of its process group only as a fallback) and checks that
every process exited and that the layer left no names in ``/dev/shm``.

Every failure message ends with the server's output.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn  # noqa: F401 - a test dependency: fail, never skip, when it is missing
import websockets.asyncio.client as websockets_client

from tests.conftest import _ours

REPO = Path(__file__).resolve().parents[2]
APP = "tests.apps.chatapp.asgi:application"
WS_PATH = "/ws/chat/"

WORKERS = 3
MIN_PIDS = 2  # clients must land on at least this many distinct workers
MAX_CLIENTS = 60  # connections kept open at most
SPREAD_TIMEOUT = 15.0  # give up (and fail) if they all land on one worker this long
MIN_CLIENTS = 6
STARTUP_TIMEOUT = 30.0
SCENARIO_TIMEOUT = 45.0
FRAME_TIMEOUT = 10.0
QUIET_PERIOD = 0.5  # after the expected frames: how long to watch for duplicates
STOP_TIMEOUT = 20.0  # SIGTERM -> exit, before SIGKILL
CLEANUP_TIMEOUT = 5.0  # exit -> /dev/shm names gone


class ServerFailure(AssertionError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server subprocess in its own session; its output goes to a temporary file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            prefix=f"hl-{name}-", suffix=".log", delete=False
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_note = ""

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv,
            cwd=REPO,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: we can kill all of it
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self, limit: int = 12000) -> str:
        try:
            text = Path(self.log.name).read_text(errors="replace")
        except OSError as exc:
            return f"<cannot read server output: {exc}>"
        if len(text) > limit:
            text = "...\n" + text[-limit:]
        return text

    def fail(self, message: str) -> ServerFailure:
        cmd = " ".join(self.argv)
        return ServerFailure(
            f"{message}\n--- server: {cmd} (pid {self.pid}) {self.exit_note}, "
            f"output in {self.log.name}\n"
            f"--- server output ---\n{self.output()}\n--- end of server output ---"
        )

    def check_running(self) -> None:
        assert self.proc is not None
        rc = self.proc.poll()
        if rc is not None:
            raise self.fail(f"the server exited early with code {rc}")

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # pragma: no cover - not ours any more
            return False
        return True

    def stop(self) -> list[str]:
        """SIGTERM the server, wait; SIGKILL its process group if needed.

        Returns problems (empty if the server and all its children exited by themselves).
        """
        problems: list[str] = []
        proc = self.proc
        if proc is None:
            return problems
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                problems.append(f"the server did not exit within {STOP_TIMEOUT}s of SIGTERM")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self.exit_note = f"exit code {proc.returncode}"
        # the server's children (workers, resource tracker) must be gone as well
        deadline = time.monotonic() + 5.0
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._group_alive():
            problems.append("processes of the server's group outlived it; SIGKILLed them")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            deadline = time.monotonic() + 5.0
            while self._group_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        self.log.close()
        return problems

    def cleanup_file(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)


@contextlib.contextmanager
def running_server(name: str, argv: list[str], prefix: str, **extra_env: str) -> Iterator[Server]:
    env = dict(os.environ)
    env.update(
        HL_TEST_PREFIX=prefix,
        HL_TEST_HOST_ID="testhost",
        DJANGO_SETTINGS_MODULE="tests.apps.chatapp.settings",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    env.pop("PYTHONWARNINGS", None)
    env.update(extra_env)
    server = Server(name, argv, env)
    server.start()
    ok = False
    try:
        yield server
        ok = True
    finally:
        problems = server.stop()
        if ok and problems:
            raise server.fail("; ".join(problems))


# ------------------------------------------------------------------ websocket clients
class Client:
    def __init__(self, ws: Any, hello: dict[str, Any]) -> None:
        self.ws = ws
        self.pid: int = hello["pid"]
        self.channel: str = hello["channel"]
        self.frames: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        self.read_error: BaseException | None = None

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self.frames.append(json.loads(raw))
                self._changed.set()
        except Exception as exc:
            self.read_error = exc
            self._changed.set()

    async def send(self, **command: Any) -> None:
        await self.ws.send(json.dumps(command))

    def matching(self, pred: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        return [f for f in self.frames if pred(f)]

    async def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], what: str, timeout: float = FRAME_TIMEOUT
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.matching(pred)
            if found:
                return found[0]
            if self.read_error is not None or self._reader.done():
                raise AssertionError(
                    f"client on pid {self.pid} ({self.channel}) lost its connection while "
                    f"waiting for {what}: {self.read_error!r}; frames: {self.frames}"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"client on pid {self.pid} ({self.channel}) got no {what} within "
                    f"{timeout}s; frames it did get: {self.frames}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def command(self, **command: Any) -> dict[str, Any]:
        ref = uuid.uuid4().hex
        await self.send(ref=ref, **command)
        reply = await self.wait_for(
            lambda f: f.get("ref") == ref and f["type"] in ("ack", "error"),
            f"reply to {command}",
        )
        if reply["type"] == "error":
            raise AssertionError(f"the server failed command {command}: {reply['error']}")
        return reply

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


async def open_client(url: str) -> Client:
    ws = await websockets_client.connect(url, open_timeout=FRAME_TIMEOUT, close_timeout=2)
    try:
        hello = json.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT))
    except BaseException:
        await ws.close()
        raise
    assert hello["type"] == "hello", hello
    return Client(ws, hello)


async def wait_until_serving(server: Server, url: str) -> None:
    """Until one websocket handshake completes (a worker is up and the layer works)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    last: BaseException | None = None
    while time.monotonic() < deadline:
        server.check_running()
        try:
            client = await asyncio.wait_for(open_client(url), 5)
        except Exception as exc:  # refused, reset, handshake rejected, timeout...
            last = exc
            await asyncio.sleep(0.2)
            continue
        await client.close()
        return
    raise server.fail(f"the server did not serve {url} within {STARTUP_TIMEOUT}s: {last!r}")


# ------------------------------------------------------------------ the scenario
def by_pid(clients: list[Client]) -> dict[int, list[Client]]:
    out: dict[int, list[Client]] = {}
    for c in clients:
        out.setdefault(c.pid, []).append(c)
    return out


async def connect_across_workers(url: str) -> list[Client]:
    clients: list[Client] = []
    deadline = time.monotonic() + SPREAD_TIMEOUT
    while time.monotonic() < deadline:
        if len(clients) >= MAX_CLIENTS:  # one worker takes them all: the others may
            await clients.pop(0).close()  # still be booting; keep the count bounded
        clients.append(await open_client(url))
        n_pids = len(by_pid(clients))
        enough = n_pids >= MIN_PIDS and len(clients) >= MIN_CLIENTS
        # once there are enough, a few more if the next worker is slow to get its share
        if enough and (n_pids >= WORKERS or len(clients) >= 2 * MIN_CLIENTS):
            break
        if n_pids < MIN_PIDS and len(clients) >= MIN_CLIENTS:
            await asyncio.sleep(0.05)  # give the other workers time to come up
    if len(by_pid(clients)) < MIN_PIDS:
        pids = sorted(by_pid(clients))
        for c in clients:
            await c.close()
        raise AssertionError(
            f"{len(clients)} clients all landed on worker(s) {pids}: cannot test "
            f"cross-process delivery (need {MIN_PIDS} distinct workers)"
        )
    return clients


async def check_group_send(clients: list[Client], sender: Client) -> None:
    text = f"group-from-{sender.pid}-{uuid.uuid4().hex[:8]}"
    await sender.command(cmd="group", text=text)

    def mine(f: dict[str, Any]) -> bool:
        return f["type"] == "message" and f.get("text") == text

    for c in clients:
        f = await c.wait_for(mine, f"the group message {text!r} sent from pid {sender.pid}")
        assert f["via"] == "group", f
        assert f["pid"] == c.pid, f"delivered by worker {f['pid']}, client is on {c.pid}: {f}"
        assert f["channel"] == c.channel, f"delivered to another consumer: {f}"
        assert f["from_pid"] == sender.pid and f["from_channel"] == sender.channel, f
    await asyncio.sleep(QUIET_PERIOD)
    for c in clients:
        got = c.matching(mine)
        assert len(got) == 1, f"client on pid {c.pid} got {len(got)} copies of {text!r}: {got}"


async def check_direct_send(clients: list[Client], src: Client, dst: Client) -> None:
    text = f"direct-{src.pid}-to-{dst.pid}-{uuid.uuid4().hex[:8]}"
    await src.command(cmd="direct", to=dst.channel, text=text)

    def mine(f: dict[str, Any]) -> bool:
        return f["type"] == "message" and f.get("text") == text

    f = await dst.wait_for(mine, f"the direct message {text!r} from pid {src.pid}")
    assert f["via"] == "direct", f
    assert f["pid"] == dst.pid and f["channel"] == dst.channel, f
    assert f["from_pid"] == src.pid and f["from_channel"] == src.channel, f
    await asyncio.sleep(QUIET_PERIOD)
    assert len(dst.matching(mine)) == 1, f"duplicates of {text!r}: {dst.matching(mine)}"
    others = [(c.pid, c.channel) for c in clients if c is not dst and c.matching(mine)]
    assert not others, f"the direct message {text!r} also reached {others}"


async def scenario(server: Server, port: int) -> dict[str, Any]:
    url = f"ws://127.0.0.1:{port}{WS_PATH}"
    await wait_until_serving(server, url)
    clients = await connect_across_workers(url)
    try:
        groups = by_pid(clients)
        pids = sorted(groups)
        # a group_send from a client on every worker reaches everybody, once
        for pid in pids:
            await check_group_send(clients, groups[pid][0])
        # a direct send from every worker to every other worker
        for a in pids:
            for b in pids:
                if a != b:
                    await check_direct_send(clients, groups[a][0], groups[b][-1])
        # and to a consumer on the same worker, for good measure
        same = next((g for g in groups.values() if len(g) >= 2), None)
        if same is not None:
            await check_direct_send(clients, same[0], same[1])
        # every worker is a participant of the one host namespace
        stats = (await clients[0].command(cmd="stats"))["stats"]
        assert stats["participants"] >= len(pids), stats
        for c in clients:
            assert c.read_error is None, f"client on {c.pid}: {c.read_error!r}"
        return {"clients": len(clients), "pids": pids, "stats": stats}
    finally:
        for c in clients:
            await c.close()


def wait_for_no_names(prefix: str, timeout: float = CLEANUP_TIMEOUT) -> list[str]:
    deadline = time.monotonic() + timeout
    left = _ours(prefix)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = _ours(prefix)
    return left


def run_server_test(name: str, argv: list[str], prefix: str, **extra_env: str) -> None:
    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in argv]
    with running_server(name, argv, prefix, **extra_env) as server:
        try:
            asyncio.run(asyncio.wait_for(scenario(server, port), SCENARIO_TIMEOUT))
        except ServerFailure:
            raise
        except Exception as exc:
            raise server.fail(f"{type(exc).__name__}: {exc}") from exc
    # stopped cleanly (running_server raises otherwise): the last process out must have
    # removed the namespace's shared-memory names
    left = wait_for_no_names(prefix)
    if left:
        raise server.fail(
            f"every server process exited after SIGTERM ({server.exit_note}), but "
            f"{len(left)} shared-memory names of prefix {prefix!r} are still in /dev/shm "
            f"{CLEANUP_TIMEOUT}s later: {left}\n(hint: after a graceful shutdown uvicorn "
            "re-raises SIGTERM with the default handler, so its workers die by the signal: "
            "atexit handlers do not run there, the ASGI lifespan shutdown does)"
        )
    output = server.output()
    if "Traceback" in output:
        raise server.fail("the server logged a traceback")
    server.cleanup_file()


GUNICORN = [
    sys.executable,
    "-m",
    "gunicorn",
    "-k",
    "uvicorn_worker.UvicornWorker",
    "-w",
    str(WORKERS),
    "-b",
    "127.0.0.1:{port}",
    "--graceful-timeout",
    "10",
    "--no-control-socket",
    APP,
]
UVICORN = [
    sys.executable,
    "-m",
    "uvicorn",
    APP,
    "--workers",
    str(WORKERS),
    "--host",
    "127.0.0.1",
    "--port",
    "{port}",
    "--timeout-graceful-shutdown",
    "10",
]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_gunicorn_uvicorn_workers(ns_prefix: str) -> None:
    run_server_test("gunicorn", GUNICORN, ns_prefix)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_gunicorn_uvicorn_workers_preload(ns_prefix: str) -> None:
    argv = [*GUNICORN[:-1], "--preload", APP]
    run_server_test("gunicorn-preload", argv, ns_prefix)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_gunicorn_preload_layer_attached_in_master(ns_prefix: str) -> None:
    """The master uses the layer before forking: every worker must re-attach on its own."""
    argv = [*GUNICORN[:-1], "--preload", APP]
    run_server_test("gunicorn-preload-attached", argv, ns_prefix, HL_TEST_ATTACH_AT_IMPORT="1")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_uvicorn_workers(ns_prefix: str) -> None:
    run_server_test("uvicorn", UVICORN, ns_prefix)
