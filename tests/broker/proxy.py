"""A TCP proxy of our own between a simulated host and RabbitMQ, to fault its link.

It runs an asyncio loop in a background thread of the test process, listens on
127.0.0.1 (ephemeral port) and forwards every connection to the broker (127.0.0.1:5672
by default). The controls, callable from the test's thread:

* ``stall()`` / ``resume()``: a network partition. Connections stay open but no byte
  moves in either direction (what was read before the stall is held back, not sent);
  new connections are accepted but not connected upstream until ``resume()``.
* ``cut()``: reset every client and upstream socket abruptly (RST); new connections
  are accepted and forwarded as usual.
* ``cut_mid_frame()``: the next chunk from the broker to a client is forwarded only up
  to the middle of an AMQP frame, then both sides of that connection are reset
  (``wait_mid_frame_cut()`` waits for it to happen).
* ``refuse()`` / ``accept()``: new connections are reset as soon as they are accepted
  (the broker is unreachable); existing connections are left alone.
* ``close()``: stop listening, reset every connection, stop the thread.

``connections`` is the number of live proxied connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

UPSTREAM = ("127.0.0.1", 5672)
FRAME_HEADER = 7  # type (1), channel (2), size (4); then the payload and 0xCE


class FrameTracker:
    """Where AMQP frames start in the broker-to-client byte stream (which is nothing
    but frames: the client sends the protocol header, the broker only frames)."""

    def __init__(self) -> None:
        self.remaining = 0  # bytes of the current frame still to come (after its header)
        self.header = b""  # a frame header split across chunks

    def feed(self, chunk: bytes) -> list[tuple[int, int | None]]:
        """(offset in ``chunk``, whole frame length or None if its header is cut off)
        of every frame that starts in ``chunk``."""
        starts: list[tuple[int, int | None]] = []
        pos, n = 0, len(chunk)
        while pos < n:
            if self.remaining:
                take = min(self.remaining, n - pos)
                pos += take
                self.remaining -= take
                continue
            if not self.header:
                starts.append((pos, None))
            piece = chunk[pos : pos + FRAME_HEADER - len(self.header)]
            self.header += piece
            pos += len(piece)
            if len(self.header) == FRAME_HEADER:
                (size,) = struct.unpack(">I", self.header[3:7])
                self.remaining = size + 1
                if starts and starts[-1][0] + FRAME_HEADER == pos:
                    starts[-1] = (starts[-1][0], FRAME_HEADER + size + 1)
                self.header = b""
        return starts


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close abruptly: SO_LINGER 0 makes the kernel send an RST, not a FIN."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Conn:
    def __init__(self, proxy: Proxy, reader: asyncio.StreamReader, writer: Any) -> None:
        self.proxy = proxy
        self.c_reader = reader
        self.c_writer: asyncio.StreamWriter = writer
        self.u_reader: asyncio.StreamReader | None = None
        self.u_writer: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False

    async def run(self) -> None:
        px = self.proxy
        try:
            await px._flowing.wait()  # stalled: accepted, not connected upstream
            if self.closed:
                return
            self.u_reader, self.u_writer = await asyncio.open_connection(*px.upstream)
            if self.closed:
                _reset(self.u_writer)
                return
            self.tasks = [
                asyncio.ensure_future(self._pump(self.c_reader, self.u_writer, None)),
                asyncio.ensure_future(self._pump(self.u_reader, self.c_writer, FrameTracker())),
            ]
            await asyncio.wait(self.tasks, return_when=asyncio.FIRST_COMPLETED)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.reset()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        frames: FrameTracker | None,
    ) -> None:
        px = self.proxy
        while True:
            await px._flowing.wait()
            data = await reader.read(65536)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            await px._flowing.wait()  # read just before a stall: hold it back
            if frames is not None:
                starts = frames.feed(data)
                if px._cut_mid_frame_armed and len(data) >= px._cut_min_chunk:
                    cut = _mid_frame(data, starts)
                    if cut is not None:
                        px._cut_mid_frame_armed = False
                        writer.write(data[:cut])
                        with contextlib.suppress(OSError):
                            await writer.drain()
                        px._mid_frame_cuts.append((cut, len(data)))
                        px._mid_frame_done.set()
                        return  # run() resets both sides
            writer.write(data)
            await writer.drain()

    def reset(self) -> None:
        if self.closed:
            return
        self.closed = True
        for t in self.tasks:
            t.cancel()
        _reset(self.c_writer)
        _reset(self.u_writer)
        self.proxy._conns.discard(self)


def _mid_frame(data: bytes, starts: list[tuple[int, int | None]]) -> int | None:
    """An offset in ``data`` strictly inside an AMQP frame (the middle of the first
    frame that starts in it), or None if this chunk is too short to split."""
    if starts:
        off, length = starts[0]
        if length is None:  # its header is cut off by the chunk's end already
            return len(data) if len(data) > off else None
        return min(off + length // 2, len(data))
    return len(data) // 2 if len(data) >= 2 else None  # all of it inside one frame


class Proxy:
    """See the module docstring. Use as a context manager, or call ``close()``."""

    def __init__(self, upstream: tuple[str, int] = UPSTREAM) -> None:
        self.upstream = upstream
        self._conns: set[_Conn] = set()
        self._cut_mid_frame_armed = False
        self._cut_min_chunk = 1
        self._mid_frame_cuts: list[tuple[int, int]] = []
        self._refusing = False
        self._handlers: set[asyncio.Task[None]] = set()
        self.accepted = 0
        self.refused = 0
        self._started = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="test-amqp-proxy", daemon=True)
        self._thread.start()
        if not self._started.wait(5):
            raise RuntimeError("proxy did not start")
        self.port: int = self._server.sockets[0].getsockname()[1]

    # ------------------------------------------------------------------ thread
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._mid_frame_done = asyncio.Event()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._on_client, "127.0.0.1", 0)
        )
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _on_client(self, reader: asyncio.StreamReader, writer: Any) -> None:
        if self._refusing:
            self.refused += 1
            _reset(writer)
            return
        self.accepted += 1
        conn = _Conn(self, reader, writer)
        self._conns.add(conn)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await conn.run()
        finally:
            self._handlers.discard(task)

    def _call(self, fn: Callable[[], T], timeout: float = 5) -> T:
        async def wrap() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrap(), self._loop).result(timeout)

    # ------------------------------------------------------------------ controls
    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def connections(self) -> int:
        return self._call(lambda: len(self._conns))

    def stall(self) -> None:
        self._call(self._flowing.clear)

    def resume(self) -> None:
        self._call(self._flowing.set)

    def cut(self) -> int:
        """Reset every connection; returns how many there were."""

        def do() -> int:
            conns = list(self._conns)
            for c in conns:
                c.reset()
            return len(conns)

        return self._call(do)

    def cut_mid_frame(self, min_chunk: int = 1) -> None:
        """Arm: the next broker-to-client chunk (of at least ``min_chunk`` bytes, say 200
        to let heartbeats through) is forwarded up to the middle of an AMQP frame, then
        both sides of its connection are reset. See ``wait_mid_frame_cut``."""

        def arm() -> None:
            self._mid_frame_done.clear()
            self._cut_min_chunk = min_chunk
            self._cut_mid_frame_armed = True

        self._call(arm)

    def wait_mid_frame_cut(self, timeout: float = 10) -> tuple[int, int]:
        """Until the armed cut happened: (bytes of the chunk forwarded, its length)."""

        async def wait() -> tuple[int, int]:
            await asyncio.wait_for(self._mid_frame_done.wait(), timeout)
            return self._mid_frame_cuts[-1]

        return asyncio.run_coroutine_threadsafe(wait(), self._loop).result(timeout + 1)

    def refuse(self) -> None:
        self._call(lambda: setattr(self, "_refusing", True))

    def accept(self) -> None:
        self._call(lambda: setattr(self, "_refusing", False))

    def close(self) -> None:
        if self._loop.is_closed():
            return

        async def shutdown() -> None:
            self._server.close()
            self._refusing = True
            for c in list(self._conns):
                c.reset()
            self._flowing.set()  # stalled handlers see their connection closed and end
            if self._handlers:
                await asyncio.wait(list(self._handlers), timeout=2)
            await asyncio.wait_for(self._server.wait_closed(), 2)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
