#!/usr/bin/env python3
"""WebSocket echo backend for Charon's tests (Python `websockets`).

Usage:
    ws_backend.py [--host 127.0.0.1] [--port 0] [--max-size BYTES|none]
                  [--no-compression] [--deflate-level 0-9]
                  [--ping-interval SECONDS] [--workers N]

Once listening it prints one line on stdout, ``LISTENING <port>``, and flushes.
It then serves until SIGTERM or SIGINT (exit status 0).

Behaviour of every connection:
  * permessage-deflate is negotiated with websockets' default parameters
    unless --no-compression is given (--deflate-level only changes the zlib
    level the server compresses with);
  * the subprotocol ``chat`` is selected when the client offers it; any other
    offer gets no subprotocol (the handshake still succeeds);
  * every message is echoed back whole, with its type (text stays text, binary
    stays binary);
  * the text message ``headers?`` is answered (instead of echoed) with a JSON
    text message::

        {"headers": {"Host": "...", ...},   # request headers, names as received
         "extensions": "permessage-deflate; ...",  # negotiated, "" if none
         "subprotocol": "chat" | null,
         "path": "/the/request/path?query"}

    A header repeated under exactly the same name has its values joined with
    ", ".

The server never pings on its own (ping_interval is off by default) so that it
does not disturb idle-tunnel tests or the Autobahn cases. Messages may be up to
64 MiB by default, in any number of fragments (the Autobahn 9.x cases send
16 MiB messages and 4 MiB ones in 64-byte fragments).

--workers N forks N-1 more processes that accept on the same listening socket
(the Autobahn run uses it so that the Python server is not the bottleneck on a
multi-core machine). SIGTERM to the printed process stops them all; the others
also stop by themselves if it dies.
"""

from __future__ import annotations

import os

# websockets >= 16 fails a message made of more than 4096 fragments with 1009
# "too many fragments"; the Autobahn 9.3.x/9.4.x cases send up to 65536.
# max_size still bounds the memory a message may take. Read at import time.
os.environ.setdefault("WEBSOCKETS_MAX_FRAGMENTS", str(1 << 22))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

from websockets.asyncio.server import ServerConnection, serve  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.extensions.permessage_deflate import (  # noqa: E402
    ServerPerMessageDeflateFactory,
)

SUBPROTOCOL = "chat"
DEFAULT_MAX_SIZE = 64 * 1024 * 1024


def select_subprotocol(_conn: ServerConnection, offered: list[str]) -> str | None:
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


def describe(conn: ServerConnection) -> str:
    headers: dict[str, str] = {}
    for name, value in conn.request.headers.raw_items():
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    extensions = ""
    if conn.response is not None:
        extensions = conn.response.headers.get("Sec-WebSocket-Extensions", "")
    return json.dumps(
        {
            "headers": headers,
            "extensions": extensions,
            "subprotocol": conn.subprotocol,
            "path": conn.request.path,
        }
    )


async def handler(conn: ServerConnection) -> None:
    try:
        async for message in conn:
            if message == "headers?":
                await conn.send(describe(conn))
            else:
                await conn.send(message)
    except ConnectionClosed:
        pass


def parse_size(text: str) -> int | None:
    return None if text.lower() in ("none", "0", "unlimited") else int(text)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="WebSocket echo backend")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--max-size",
        type=parse_size,
        default=DEFAULT_MAX_SIZE,
        help="largest message accepted, in bytes, or 'none' (default 64 MiB)",
    )
    parser.add_argument("--no-compression", action="store_true")
    parser.add_argument(
        "--deflate-level",
        type=int,
        choices=range(0, 10),
        default=None,
        metavar="0-9",
        help="zlib level the server compresses with (default: zlib's default, 6)",
    )
    parser.add_argument(
        "--ping-interval", type=float, default=None, help="default: never ping"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="processes sharing the socket"
    )
    return parser.parse_args()


async def serve_until_signal(args: argparse.Namespace, sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))

    extensions = None
    if not args.no_compression:
        # websockets' own defaults (see enable_server_permessage_deflate),
        # with the zlib level made adjustable.
        compress_settings: dict[str, int] = {"memLevel": 5}
        if args.deflate_level is not None:
            compress_settings["level"] = args.deflate_level
        extensions = [
            ServerPerMessageDeflateFactory(
                server_max_window_bits=12,
                client_max_window_bits=12,
                compress_settings=compress_settings,
            )
        ]

    server = await serve(
        handler,
        sock=sock,
        compression=None,
        extensions=extensions,
        select_subprotocol=select_subprotocol,
        max_size=args.max_size,
        max_queue=None,
        ping_interval=args.ping_interval,
        ping_timeout=None if args.ping_interval is None else 20,
        close_timeout=2,
    )
    await stop
    server.close()
    try:
        await asyncio.wait_for(server.wait_closed(), timeout=3)
    except asyncio.TimeoutError:
        pass


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent exits."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


def main() -> None:
    args = parse_args()
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.create_server((args.host, args.port), family=family, backlog=1024)
    sock.setblocking(False)
    parent = os.getpid()
    print(f"LISTENING {sock.getsockname()[1]}", flush=True)

    children: list[int] = []
    for _ in range(max(1, args.workers) - 1):
        pid = os.fork()
        if pid == 0:
            die_with_parent()
            if os.getppid() != parent:
                os._exit(0)
            try:
                asyncio.run(serve_until_signal(args, sock))
            finally:
                os._exit(0)
        children.append(pid)

    try:
        asyncio.run(serve_until_signal(args, sock))
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


if __name__ == "__main__":
    # Only real problems reach stderr; peers misbehaving on purpose
    # (Autobahn) are not worth a log line each.
    logging.basicConfig(level=logging.CRITICAL, stream=sys.stderr)
    main()
