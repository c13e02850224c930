"""The relay behind `inv run`'s warm path (see `stigmer_sandbox.relay`): one background
process per user and settings that keeps a `Sandbox` and its agent connection open and
runs the commands `inv run` sends over a private unix socket.

    python -m stigmer_sandbox.runtime.relay_server   (the settings as JSON on stdin)

It exits after `relay_idle_s` seconds without a request, when its sandbox is gone
(checked every few seconds, so `inv sandbox.down` or `inv clean` end it), or when a client
with other settings asks. A client that disconnects mid-command (Ctrl-C) cancels it.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import socket
import struct
import sys
import threading
import time
from typing import Any, cast

from .. import engine, relay
from ..config import Settings, settings_from_dict
from ..errors import SandboxError
from .commands import ExecOptions, make_request
from .sandbox import Sandbox

ALIVE_CHECK_S = 5.0
ACCEPT_POLL_S = 1.0
# Which `exec` options a client may set (callbacks are the relay's own).
CLIENT_OPTIONS = ("timeout", "idle_timeout", "env", "cwd", "keep_background")


class Relay:
    """Serves one sandbox on one socket until it is idle or its sandbox is gone."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sandbox = Sandbox(settings)
        self.path = relay.socket_path(settings)
        self.fingerprint = relay.fingerprint(settings)
        self.last_request = time.monotonic()
        self.busy = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def serve(self) -> None:
        server = self._listen()
        if server is None:
            return
        next_check = 0.0
        with server:
            while not self.stop.is_set():
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + ALIVE_CHECK_S
                    if not self._worth_keeping():
                        break
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=self._serve_client, args=(conn,), daemon=True).start()
        with contextlib.suppress(OSError):
            self.path.unlink()
        self.sandbox.close()

    def _listen(self) -> socket.socket | None:
        """The listening socket, or None when another relay already serves these settings."""
        if not relay.private_folder(self.path.parent, create=True):
            raise SandboxError(f"{self.path.parent} is not a private folder of this user")
        lock = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until this process ends
        except BlockingIOError:
            os.close(lock)
            return None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            server.bind(str(self.path))
        finally:
            os.umask(old_umask)
        server.listen(64)
        server.settimeout(ACCEPT_POLL_S)
        return server

    def _worth_keeping(self) -> bool:
        with self.lock:
            idle = self.busy == 0 and time.monotonic() - self.last_request
        if idle and idle > self.settings.relay_idle_s:
            return False
        try:
            container = engine.find_container(self.sandbox.name)
        except SandboxError:
            return False
        return container is not None and container.status == "running"

    def _serve_client(self, conn: socket.socket) -> None:
        with conn:
            if not same_user(conn):
                return
            with self.lock:
                self.busy += 1
                self.last_request = time.monotonic()
            try:
                self._handle(conn)
            except (OSError, ValueError):
                pass  # the client went away or sent garbage: nothing to answer
            finally:
                with self.lock:
                    self.busy -= 1
                    self.last_request = time.monotonic()

    def _handle(self, conn: socket.socket) -> None:
        request = next(relay.read_lines(conn), None)
        if not isinstance(request, dict) or request.get("fingerprint") != self.fingerprint:
            return  # not a client of these settings: it takes the slow path
        if self.stop.is_set():
            return  # closing: the client takes the slow path, nothing ran
        relay.send_line(conn, {"type": "accepted"})
        try:
            result = self._run(conn, request)
        except SandboxError as exc:
            relay.send_line(conn, {"type": "error", "message": exc.message, "hint": exc.hint})
            return
        relay.send_line(conn, {"type": "done", "result": result})

    def _run(self, conn: socket.socket, request: dict[str, Any]) -> dict[str, Any]:
        command = str(request.get("command") or "")
        given = request.get("options") or {}
        chosen: dict[str, Any] = {k: given[k] for k in CLIENT_OPTIONS if k in given}
        send_lock = threading.Lock()

        def forward(stream: str) -> relay.Callback:
            def send(data: bytes) -> None:
                message = {"type": "out", "stream": stream, "data": base64.b64encode(data).decode()}
                # A client gone (Ctrl-C) must not cost the command its result or audit entry.
                with send_lock, contextlib.suppress(OSError):
                    relay.send_line(conn, message)

            return send

        chosen.update(on_stdout=forward("stdout"), on_stderr=forward("stderr"))
        options = cast(ExecOptions, chosen)
        session = request.get("session")
        if session:
            command, built = self.sandbox.session(str(session)).request(command, options)
        else:
            built = make_request(
                self.settings, command, self.sandbox._cwd(options.get("cwd")), options
            )
        finished = threading.Event()
        watcher = threading.Thread(
            target=self._cancel_on_hangup, args=(conn, built.cid, finished), daemon=True
        )
        watcher.start()
        try:
            return self.sandbox._execute(command, built)[1].to_dict()
        finally:
            finished.set()

    def _cancel_on_hangup(self, conn: socket.socket, cid: str, finished: threading.Event) -> None:
        """The client closed its end before the result (Ctrl-C): end the command."""
        with contextlib.suppress(OSError):
            if conn.recv(1) == b"" and not finished.is_set():
                with contextlib.suppress(SandboxError):
                    self.sandbox.agent_call("cancel", {"cid": cid})


def same_user(conn: socket.socket) -> bool:
    """Whether the process at the other end runs as this user (SO_PEERCRED)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def start_in_background(settings: Settings) -> None:
    """Start a relay for `settings` that outlives this process (a no-op when one runs)."""
    import subprocess

    log = settings.path("state_dir") / "relay.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as errors:
        # -I and cwd /: never import from the folder `inv` ran in (it may be the workspace,
        # which sandbox commands write).
        process = subprocess.Popen(
            [sys.executable, "-I", "-m", __name__],
            cwd="/",
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            start_new_session=True,
            close_fds=True,
        )
    if process.stdin is not None:
        process.stdin.write(json.dumps(settings.as_dict(), default=str).encode())
        process.stdin.close()


def main() -> None:
    settings = settings_from_dict(json.loads(sys.stdin.read()), "relay")
    Relay(settings).serve()


if __name__ == "__main__":
    main()
