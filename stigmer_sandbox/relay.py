"""A warm path for `inv run`: a per-user relay process keeps the sandbox's agent
connection open, so a command-line `inv run` costs one local socket round trip instead of
importing the docker SDK, checking the container and attaching a new agent each time.

The relay (`runtime.relay_server`) is started in the background by the first `inv run`
that takes the slow path, and exits after `relay_idle_s` seconds without a request or
when its sandbox goes away (`inv sandbox.down`, `inv clean`). Its socket is named after a
fingerprint of the settings, so other settings (another image, limits, ...) reach another
relay, never one that would run the command in the wrong sandbox. `relay_idle_s: 0` turns
it off.

Safety: the socket lives in a folder only this user can enter (0700, checked before each
connection), the relay checks the connecting process's uid (SO_PEERCRED), and the relay
runs as this user: nothing another local user can connect to, and nothing this user
could not do without it. This module is standard library only: it is imported before
anything heavy.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import SandboxError, UsageError

if TYPE_CHECKING:  # the warm path imports this module before anything heavy
    from pathlib import Path

    from .config import Settings

# Unix socket paths must fit in sun_path (108 bytes on Linux).
MAX_SOCKET_PATH = 100
CONNECT_TIMEOUT_S = 1.0
# Past the command's own timeout, how long the client waits for the relay's answer.
ANSWER_GRACE_S = 15.0

Callback = Callable[[bytes], None]


# The engine a relay talks to comes from these (the relay inherits the first client's).
ENGINE_VARIABLES = ("DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_CERT_PATH", "DOCKER_TLS_VERIFY")


def env_pairs(pairs: list[str]) -> dict[str, str]:
    """`--env KEY=VALUE` flags as a mapping; one UsageError for a pair without `=` or key."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--env must be KEY=VALUE, got {pair!r}")
        parsed[key] = value
    return parsed


def fingerprint(settings: Settings) -> str:
    """Identity of what a relay serves: the settings (the sandbox it would create or
    reuse) and the engine it reaches."""
    engine = {name: os.environ.get(name) for name in ENGINE_VARIABLES}
    text = json.dumps([settings.as_dict(), engine], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def socket_path(settings: Settings) -> Path:
    """Where the relay for these settings listens: the state folder, or a private folder
    in the system's temporary folder when that path would be too long for a socket."""
    import tempfile
    from pathlib import Path

    name = f"{fingerprint(settings)}.sock"
    folder = settings.path("state_dir") / "relay"
    if len(str(folder / name)) > MAX_SOCKET_PATH:
        folder = Path(tempfile.gettempdir()) / f"stigmer-sandbox-{os.getuid()}"
    return folder / name


def private_folder(folder: Path, create: bool = False) -> bool:
    """Whether `folder` is this user's and closed to everyone else (made so if `create`)."""
    if create:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        info = folder.lstat()
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.getuid()
        and not info.st_mode & (stat.S_IRWXG | stat.S_IRWXO)
    )


def read_lines(sock: socket.socket) -> Any:
    """JSON lines from a socket, until it closes."""
    buffer = b""
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield json.loads(line)


def send_line(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message, separators=(",", ":")).encode() + b"\n")


def run(
    settings: Settings,
    request: dict[str, Any],
    on_stdout: Callback | None = None,
    on_stderr: Callback | None = None,
) -> dict[str, Any] | None:
    """Run `request` (command, options, session) through the relay: the result's dict
    (`ExecResult.to_dict()`), or None when no relay took it (take the slow path: nothing
    ran). A relay that refuses the request raises SandboxError with its reason."""
    path = socket_path(settings)
    if not path.exists() or not private_folder(path.parent):
        return None
    timeout = request.get("options", {}).get("timeout") or settings.timeout
    return run_at(
        str(path), fingerprint(settings), timeout, request, on_stdout=on_stdout, on_stderr=on_stderr
    )


def run_at(
    path: str,
    fingerprint: str,
    timeout: float,
    request: dict[str, Any],
    *,
    on_stdout: Callback | None = None,
    on_stderr: Callback | None = None,
) -> dict[str, Any] | None:
    """`run` on the relay listening at `path` whose settings have `fingerprint`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        try:
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(path)
            sock.settimeout(float(timeout) + ANSWER_GRACE_S)
            send_line(sock, {**request, "fingerprint": fingerprint})
        except (OSError, ValueError):
            return None
        return Answer(on_stdout, on_stderr).read(sock)


class Answer:
    """The relay's answer to one request, read line by line."""

    def __init__(self, on_stdout: Callback | None, on_stderr: Callback | None) -> None:
        self.callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        self.accepted = False  # from then on the command may run: a broken line is lost

    def read(self, sock: socket.socket) -> dict[str, Any] | None:
        try:
            for message in read_lines(sock):
                if message.get("type") == "refused":
                    return None  # another relay's settings, or it is closing: nothing ran
                result = self._take(message)
                if result is not None:
                    return result
        except (OSError, ValueError) as exc:
            return _lost(f"the relay connection broke ({exc})") if self.accepted else None
        return _lost("the relay closed the connection before the result") if self.accepted else None

    def _take(self, message: dict[str, Any]) -> dict[str, Any] | None:
        kind = message.get("type")
        if kind == "accepted":
            self.accepted = True
        elif kind == "out":
            callback = self.callbacks.get(str(message.get("stream")))
            if callback:
                callback(base64.b64decode(message["data"]))
        elif kind == "done":
            return {**message["result"], "relay": True}
        elif kind == "error":
            raise relayed_error(message)
        return None


def relayed_error(message: dict[str, Any]) -> SandboxError:
    """The relay's error answer as the error the slow path raises (message, hint, exit code)."""
    error = SandboxError(str(message.get("message")), message.get("hint"))
    code = message.get("exit_code")
    if isinstance(code, int) and not isinstance(code, bool):
        error.exit_code = code
    return error


def _lost(reason: str) -> dict[str, Any]:
    """A result that never came back: the relay's agent ends the command's processes."""
    return {"exit_code": None, "stdout": "", "stderr": "", "cause": "lost", "error": reason}
