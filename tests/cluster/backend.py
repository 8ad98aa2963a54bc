#!/usr/bin/env python3
"""Upstream of the Docker cluster tests: HTTP and WebSocket echo, stdlib only.

Usage: backend.py --host ADDR [--port 0]

Prints ``LISTENING <port>`` once bound, then serves until SIGTERM.

- ``GET /__stats``: JSON counters: HTTP requests served, WebSocket sessions,
  and the close codes the WebSocket peers (the proxy) sent, by code.
- ``GET`` anything else: 200, ``backend ok <Host> <path>``, keep-alive.
- A WebSocket upgrade on any path: every text or binary message is echoed
  back; pings get pongs; a Close is answered with the same code.
"""

import argparse
import base64
import hashlib
import json
import signal
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

lock = threading.Lock()
stats = {"http": 0, "ws_sessions": 0, "ws_open": 0, "ws_close_codes": {}, "ws_no_close": 0}


def count(key, by=1):
    with lock:
        stats[key] += by


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "charon-test-backend"

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        if self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        if self.path == "/__stats":
            with lock:
                body = json.dumps(stats).encode()
        else:
            count("http")
            body = f"backend ok {self.headers.get('Host', '-')} {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_frame(self, opcode, payload):
        head = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([n])
        elif n < 65536:
            head += bytes([126]) + struct.pack("!H", n)
        else:
            head += bytes([127]) + struct.pack("!Q", n)
        self.wfile.write(head + payload)
        self.wfile.flush()

    def read_exact(self, n):
        data = self.rfile.read(n)
        if len(data) != n:
            raise EOFError
        return data

    def websocket(self):
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        count("ws_sessions")
        count("ws_open")
        closed = False
        try:
            while True:
                b0, b1 = self.read_exact(2)
                opcode = b0 & 0x0F
                n = b1 & 0x7F
                if n == 126:
                    (n,) = struct.unpack("!H", self.read_exact(2))
                elif n == 127:
                    (n,) = struct.unpack("!Q", self.read_exact(8))
                mask = self.read_exact(4) if b1 & 0x80 else None
                payload = self.read_exact(n)
                if mask:
                    payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
                if opcode == 0x8:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                    with lock:
                        codes = stats["ws_close_codes"]
                        codes[str(code)] = codes.get(str(code), 0) + 1
                    closed = True
                    self.send_frame(0x8, payload[:2])
                    break
                if opcode == 0x9:
                    self.send_frame(0xA, payload)
                elif opcode in (0x0, 0x1, 0x2):
                    # Messages here are small and unfragmented: echo frame by frame.
                    self.send_frame(opcode, payload)
        except (EOFError, OSError, ValueError):
            pass
        finally:
            count("ws_open", -1)
            if not closed:
                count("ws_no_close")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"LISTENING {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
