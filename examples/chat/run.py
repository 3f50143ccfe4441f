"""Start the chat example: uvicorn with several worker processes on the single-host
default, then print the URL. Ctrl-C (or SIGTERM) stops it; the workers close the layer.

    python examples/chat/run.py [--workers 3] [--port 8000] [--broker amqp://...]

Open the URL in two or more browser windows: each page shows which worker served its
WebSocket, and every message goes to every page, whichever worker it came from.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--prefix", default=None, help="the layer's namespace (default chatexample)")
    ap.add_argument("--broker", default=None, help="a RabbitMQ URL: broker mode")
    ap.add_argument("--host-id", default=None, help="this host's id in broker mode")
    args = ap.parse_args()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), str(HERE.parent.parent), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    if args.prefix:
        env["HYBRID_CHAT_PREFIX"] = args.prefix
    if args.broker:
        env["HYBRID_CHAT_BROKER"] = args.broker
    if args.host_id:
        env["HYBRID_CHAT_HOST_ID"] = args.host_id
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "chatsite.asgi:application",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        str(args.workers),
        "--log-level",
        "warning",
    ]
    server = subprocess.Popen(cmd, cwd=HERE, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with socket.create_connection((args.host, args.port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    if server.poll() is not None:
        print("the server did not start (is uvicorn[standard] installed?)", file=sys.stderr)
        return 1
    url = f"http://{args.host}:{args.port}/chat/lobby/"
    print(f"chat example: {args.workers} uvicorn workers on hybrid_layer; open {url}", flush=True)

    def stop(*_: object) -> None:
        server.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    try:
        return server.wait()
    except KeyboardInterrupt:
        stop()
        return server.wait(30)


if __name__ == "__main__":
    sys.exit(main())
