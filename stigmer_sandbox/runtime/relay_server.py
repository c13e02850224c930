"""The relay behind `inv run`'s warm path (see `stigmer_sandbox.relay`): one background
process per user and settings that keeps a `Sandbox` and its agent connection open and
runs the commands `inv run` sends over a private unix socket.

    python -m stigmer_sandbox.runtime.relay_server   (the settings as JSON on stdin)

It exits after `relay_idle_s` seconds without a request, or when its sandbox is gone
(checked every few seconds, so `inv sandbox.down` or `inv clean` end it). A client that
disconnects mid-command (Ctrl-C) cancels it.

Protocol: one JSON line per connection, `{"fingerprint", "command", "options", "session"}`.
Any local process of this user can write to the socket, so every field is checked (type
here, ranges where `exec` checks them): a request for other settings is `refused` (the
client takes the slow path), a bad one gets an `error` naming the field and one line in the
relay's log; otherwise `accepted`, the output as `out` lines, then `done` or `error`.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from .. import config, engine, relay
from ..config import Settings, settings_from_dict
from ..errors import SandboxError, UsageError
from .client.commands import ExecOptions, Request
from .sandbox import Sandbox

ALIVE_CHECK_S = 5.0
ACCEPT_POLL_S = 1.0
# A client has this long to send its request line (one that never does must not keep
# a thread, or the relay, alive); the line is at most this long (a command and its
# environment fit in far less: Linux caps one argument at 128 KiB).
REQUEST_WAIT_S = 10.0
MAX_REQUEST_BYTES = 4 * 1024 * 1024
# How long a finished connection is drained of what the client still sends.
DRAIN_S = 1.0
REQUEST_FIELDS = ("fingerprint", "command", "options", "session")
# Signals a user or a supervisor ends a process with: a relay started by a caller that
# ignores or blocks them (a background job of a script, a supervisor) must still obey them.
# All but SIGQUIT (which keeps its default: dump and die) close the relay cleanly.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _seconds(value: object) -> bool:
    """Null, or a number of seconds `exec` takes (JSON allows NaN, Infinity and integers
    too large for a float)."""
    if value is None:
        return True
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and 0 < value <= config.MAX_TIMEOUT_S
    )


def _strings(value: object) -> bool:
    """An object of string values, or null."""
    return value is None or (
        isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    )


def _text(value: object) -> bool:
    """A string without NUL, or null."""
    return value is None or (isinstance(value, str) and "\0" not in value)


SECONDS = f"between 0 and {config.MAX_TIMEOUT_S:g} seconds"
# Which `exec` options a client may set (callbacks are the relay's own), each with the
# check of its JSON value and what that check wants, for the error.
CLIENT_OPTIONS: dict[str, tuple[Callable[[object], bool], str]] = {
    "timeout": (_seconds, SECONDS),
    "idle_timeout": (_seconds, SECONDS),
    "env": (_strings, "null or an object of string values"),
    "cwd": (_text, "null or a string without NUL"),
    "keep_background": (lambda value: isinstance(value, bool), "true or false"),
}


class Refused(Exception):
    """A request this relay does not serve (other settings, closing): nothing ran, the
    client takes the slow path."""


@dataclass(frozen=True)
class ClientRequest:
    """A request whose fields have the types `exec` expects."""

    command: str
    options: ExecOptions
    session: str | None


def read_request(conn: socket.socket) -> bytes:
    """The client's request line (without its newline); UsageError when there is none."""
    conn.settimeout(REQUEST_WAIT_S)
    buffer = bytearray()
    try:
        while b"\n" not in buffer:
            if len(buffer) > MAX_REQUEST_BYTES:
                raise UsageError(f"the request is longer than {MAX_REQUEST_BYTES} bytes")
            data = conn.recv(1 << 16)
            if not data:
                raise UsageError("the connection ended before a whole request line")
            buffer += data
    except TimeoutError:
        raise UsageError(f"no request line within {REQUEST_WAIT_S:g} s") from None
    finally:
        conn.settimeout(None)  # from here on the client may wait as long as its command
    return bytes(buffer.split(b"\n", 1)[0])


def close_gently(conn: socket.socket) -> None:
    """End the answer, then read what the client still sends (bounded) before closing: a
    close with unread bytes resets the connection, and the client would lose the answer
    it has not read yet (an over-long request line did)."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(DRAIN_S)
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline and conn.recv(1 << 16):
            pass


def parse_request(line: bytes, fingerprint: str) -> ClientRequest:
    """A checked request; Refused when it is for other settings, UsageError (naming the
    field) when it is malformed."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser
        raise UsageError("the request is not a JSON line") from None
    if not isinstance(request, dict):
        raise UsageError("the request is not a JSON object")
    if request.get("fingerprint") != fingerprint:
        raise Refused("the request is for other settings")
    unknown = sorted(set(request) - set(REQUEST_FIELDS))
    if unknown:
        raise UsageError(f"unknown request field {unknown[0]!r}")
    command, session = request.get("command"), request.get("session")
    if not isinstance(command, str):
        raise bad_field("command", "a string", command)
    if session is not None and not isinstance(session, str):
        raise bad_field("session", "a string or null", session)
    return ClientRequest(command, check_options(request.get("options")), session)


def check_options(given: object) -> ExecOptions:
    """The client's `exec` options, each of the type `exec` expects."""
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise bad_field("options", "an object or null", given)
    for name, value in given.items():
        if name not in CLIENT_OPTIONS:
            raise UsageError(f"unknown option {name!r} in the request")
        check, wanted = CLIENT_OPTIONS[name]
        if not check(value):
            raise bad_field(name, wanted, value)
    return cast(ExecOptions, dict(given))


def bad_field(name: str, wanted: str, value: object) -> UsageError:
    return UsageError(f"{name} must be {wanted}, got {value!r:.60}")


def log(message: str) -> None:
    """One line in the relay's log (its stderr)."""
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} relay: {message}", file=sys.stderr, flush=True)


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
            except OSError:
                pass  # the client went away: nothing to answer
            except Exception as exc:  # a bug: the client gets an answer, the log one line
                log(f"failed: {type(exc).__name__}: {exc}")
                answer(conn, {"type": "error", "message": f"the relay failed: {exc}"})
            finally:
                close_gently(conn)
                with self.lock:
                    self.busy -= 1
                    self.last_request = time.monotonic()

    def _handle(self, conn: socket.socket) -> None:
        try:
            request = parse_request(read_request(conn), self.fingerprint)
            if self.stop.is_set():
                raise Refused("the relay is closing")
        except Refused as exc:
            log(f"refused a request: {exc}")
            answer(conn, {"type": "refused", "reason": str(exc)})
            return
        except UsageError as exc:
            log(f"bad request: {exc.message}")
            answer(conn, error_message(exc))
            return
        relay.send_line(conn, {"type": "accepted"})
        try:
            result = self._run(conn, request)
        except SandboxError as exc:  # e.g. a value `exec` refuses, an invalid session name
            log(f"refused to run: {exc.message}")
            relay.send_line(conn, error_message(exc))
            return
        relay.send_line(conn, {"type": "done", "result": result})

    def _run(self, conn: socket.socket, request: ClientRequest) -> dict[str, Any]:
        command = request.command
        chosen: dict[str, Any] = dict(request.options)
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
        connection = self.sandbox.connection
        built = Request.build(self.settings, command, options, session=request.session)
        finished = threading.Event()
        watcher = threading.Thread(
            target=self._cancel_on_hangup, args=(conn, built.cid, finished), daemon=True
        )
        watcher.start()
        try:
            return connection.execute(built).to_dict()
        finally:
            finished.set()

    def _cancel_on_hangup(self, conn: socket.socket, cid: str, finished: threading.Event) -> None:
        """The client closed its end before the result (Ctrl-C): end the command."""
        with contextlib.suppress(OSError):
            if conn.recv(1) == b"" and not finished.is_set():
                self.sandbox.connection.cancel(cid)


def answer(conn: socket.socket, message: dict[str, Any]) -> None:
    """Send `message` unless the client has gone."""
    with contextlib.suppress(OSError):
        relay.send_line(conn, message)


def error_message(exc: SandboxError) -> dict[str, Any]:
    """The answer for `exc`: what the client raises again, with the same exit code."""
    return {"type": "error", "message": exc.message, "hint": exc.hint, "exit_code": exc.exit_code}


def same_user(conn: socket.socket) -> bool:
    """Whether the process at the other end runs as this user (SO_PEERCRED)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def start_in_background(settings: Settings) -> None:
    """Start a relay for `settings` that outlives this process (a no-op when one runs)."""
    import subprocess

    log_path = settings.path("state_dir") / "relay.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as errors:
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


def obey_stop_signals(server: Relay) -> None:
    """Stop `server` on the signals that end a process, whatever the caller of the process
    that started it did to them (ignored and blocked signals survive fork and exec)."""
    for number in STOP_SIGNALS:
        signal.signal(number, lambda _number, _frame: server.stop.set())
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (*STOP_SIGNALS, signal.SIGQUIT))


def main() -> None:
    settings = settings_from_dict(json.loads(sys.stdin.read()), "relay")
    server = Relay(settings)
    obey_stop_signals(server)
    server.serve()


if __name__ == "__main__":
    main()
