"""What the egress tests share: web servers of their own on the host, and a raw probe.

The servers bind 0.0.0.0 and are reached through the engine's bridge gateway, as a server
on a developer's machine would be; tests send traffic only to them (and the registries).
"""

from __future__ import annotations

import http.server
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# A TCP connection made without any proxy: the body's start, or `refused <why>`.
RAW_PROBE = (
    "import socket, sys\n"
    "s = socket.socket(); s.settimeout(4)\n"
    "try:\n"
    "    s.connect((sys.argv[1], int(sys.argv[2]))); s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n"
    "    print(s.recv(200).decode(errors='replace'))\n"
    "except OSError as e:\n"
    "    print('refused', e)\n"
)


class Quiet(http.server.BaseHTTPRequestHandler):
    """Answers every GET with `host-server-<its port>`."""

    def do_GET(self) -> None:
        body = f"host-server-{self.server.server_address[1]}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


@contextmanager
def host_servers(count: int) -> Iterator[list[int]]:
    """`count` web servers on the host (0.0.0.0); their ports."""
    servers = [Server(("0.0.0.0", 0), Quiet) for _ in range(count)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield [server.server_address[1] for server in servers]
    finally:
        for server in servers:
            server.shutdown()
