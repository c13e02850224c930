"""How commands reach a running sandbox: the agent channel, or plain `docker exec`.

Fast path: `stigmer_sandbox.runtime.agent` runs inside the container as the sandbox
user, started once through one attached `docker exec` whose stdin/stdout carry
JSON lines. A command then costs a fork inside the container and a few
kilobytes on a socket, instead of an exec round trip through the engine
(~50 ms). Many commands can be in flight at once; answers are matched by id.

Threat model: the agent has exactly the rights of the commands it runs (same
user, no capabilities, no new privileges); it adds no way out of the sandbox.
A command can kill or tamper with it, because it lives inside the sandbox's
trust boundary; then it can only misreport the sandbox's own results, which a
sandboxed command can always do by printing. The host trusts nothing it says
about size: every line read is bounded, output is re-capped on the host, and a
dead or misbehaving agent is dropped; the next command falls back to
`docker exec` and a new agent is started, so killing it only costs speed.

Slow path (`DirectRunner`): one `docker exec` per command, the timeout enforced
inside the container with `timeout -s KILL`, leftover processes killed by the
per-command token, OOM read from the cgroup counter before and after.
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import queue
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import engine
from ..errors import SandboxError
from . import agent

AGENT_SOURCE = Path(agent.__file__).read_text(encoding="utf-8")
# The agent's source arrives as the first line on stdin: `ps` shows this, not 10 kB of code.
AGENT_BOOTSTRAP = (
    "# stigmer-sandbox agent\nimport sys, json; exec(json.loads(sys.stdin.buffer.readline()))"
)
FRAME_HEADER = struct.Struct(">BxxxL")
# Slack on top of a command's timeout before the host gives up on the agent.
HOST_TIMEOUT_SLACK_S = 15.0
KILL_BY_TOKEN = (
    'for p in /proc/[0-9]*; do grep -qa "$0" "$p/environ" 2>/dev/null && '
    'kill -9 "${p#/proc/}" 2>/dev/null; done; true'
)
OOM_COUNTER = (
    "cat /sys/fs/cgroup/memory.events /sys/fs/cgroup/memory/memory.oom_control 2>/dev/null"
)

OutputCallback = Callable[[bytes], None]


@dataclass
class Request:
    """One command on its way to the sandbox."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    timeout: float
    limit: int
    stdin: bytes | None = None
    keep_background: bool = False
    on_stdout: OutputCallback | None = None
    on_stderr: OutputCallback | None = None


@dataclass
class RawResult:
    """What came back: bytes per stream (head + marker + tail) and how it ended."""

    exit_code: int
    signal: int | None
    timed_out: bool
    oom_killed: bool
    duration_s: float
    stdout: bytes
    stderr: bytes
    totals: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, bool] = field(default_factory=dict)
    via: str = "agent"


class AgentDied(SandboxError):
    """The agent stopped answering; the command's fate is unknown."""


def _callback(request: Request, stream: str) -> OutputCallback | None:
    return request.on_stdout if stream == "stdout" else request.on_stderr


def take_head(request: Request, answer: dict[str, Any], heads: dict[str, bytearray]) -> None:
    """Keep a live "out" message's bytes (within the head budget) and pass them on."""
    stream = answer["stream"]
    data = base64.b64decode(answer["data"])
    room = request.limit // 2 - len(heads[stream])
    data = data[: max(room, 0)]  # never trust the agent with the host's memory
    heads[stream] += data
    callback = _callback(request, stream)
    if callback and data:
        callback(data)


def raw_result(
    request: Request, answer: dict[str, Any], heads: dict[str, bytearray], via: str
) -> RawResult:
    """The agent's "done" answer plus the heads already received, re-capped on this side."""
    streams: dict[str, bytes] = {}
    totals, truncated = {}, {}
    for name in ("stdout", "stderr"):
        info = answer[name]
        capture = agent.OutputCapture(request.limit)
        capture.head = heads[name]
        tail = base64.b64decode(info["tail"])[-capture.tail_budget :]
        capture.tail = bytearray(tail)
        capture.dropped = max(0, int(info["total"]) - len(heads[name]) - len(tail))
        streams[name] = capture.text()
        totals[name] = int(info["total"])
        truncated[name] = capture.dropped > 0
        callback = _callback(request, name)
        if callback and len(streams[name]) > len(heads[name]):
            callback(streams[name][len(heads[name]) :])
    return RawResult(
        int(answer["exit_code"]),
        answer.get("signal"),
        bool(answer["timed_out"]),
        bool(answer["oom_killed"]),
        float(answer["duration_s"]),
        streams["stdout"],
        streams["stderr"],
        totals,
        truncated,
        via,
    )


def _exec_message(request: Request, rid: int) -> dict[str, Any]:
    return {
        "op": "exec",
        "id": rid,
        "argv": request.argv,
        "env": request.env,
        "cwd": request.cwd,
        "timeout": request.timeout,
        "limit": request.limit,
        "stdin": base64.b64encode(request.stdin).decode() if request.stdin is not None else None,
        "keep_background": request.keep_background,
    }


class AgentChannel:
    """One agent process inside one container, shared by concurrent callers."""

    def __init__(self, container_id: str, max_line: int) -> None:
        api = engine.client().api
        with engine.engine_errors():
            exec_id = api.exec_create(
                container_id,
                ["python3", "-I", "-u", "-c", AGENT_BOOTSTRAP],
                stdin=True,
                stdout=True,
                stderr=True,
                tty=False,
            )["Id"]
            self._socket_io = api.exec_start(exec_id, socket=True)
        self._sock: socket.socket = getattr(self._socket_io, "_sock", self._socket_io)
        self._max_line = max_line
        self._ids = itertools.count(1)
        self._write_lock = threading.Lock()
        self._pending: dict[int, queue.Queue[dict[str, Any] | None]] = {}
        self._pending_lock = threading.Lock()
        self.alive = True
        self._sock.sendall(json.dumps(AGENT_SOURCE).encode() + b"\n")
        self._reader = threading.Thread(
            target=self._read_loop, daemon=True, name="stigmer-agent-reader"
        )
        self._reader.start()

    def _send(self, message: dict[str, Any]) -> queue.Queue[dict[str, Any] | None]:
        inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        with self._pending_lock:
            self._pending[message["id"]] = inbox
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        try:
            with self._write_lock:
                self._sock.sendall(data)
        except OSError as exc:
            self.close()
            raise AgentDied(f"the sandbox agent is gone ({exc})") from None
        return inbox

    def ping(self, timeout: float = 10.0) -> None:
        """Round-trip a ping; raises `AgentDied` if there is no answer."""
        rid = next(self._ids)
        inbox = self._send({"op": "ping", "id": rid})
        self._wait(inbox, rid, timeout)

    def _wait(
        self, inbox: queue.Queue[dict[str, Any] | None], rid: int, timeout: float
    ) -> dict[str, Any]:
        try:
            message = inbox.get(timeout=timeout)
        except queue.Empty:
            message = None
        if message is None:
            self._forget(rid)
            raise AgentDied("the sandbox agent stopped answering")
        return message

    def _forget(self, rid: int) -> None:
        with self._pending_lock:
            self._pending.pop(rid, None)

    def run(self, request: Request) -> RawResult:
        """Run one command through the agent, streaming its head to the callbacks."""
        rid = next(self._ids)
        message = _exec_message(request, rid)
        inbox = self._send(message)
        heads = {"stdout": bytearray(), "stderr": bytearray()}
        deadline = time.monotonic() + request.timeout + HOST_TIMEOUT_SLACK_S
        while True:
            answer = self._wait(inbox, rid, max(0.1, deadline - time.monotonic()))
            if answer.get("type") == "out":
                take_head(request, answer, heads)
                continue
            self._forget(rid)
            if answer.get("type") != "done":
                raise AgentDied(f"the sandbox agent failed: {answer.get('message')}")
            return raw_result(request, answer, heads, "agent")

    def _read_loop(self) -> None:
        buffer = bytearray()
        try:
            for data in self._frames():
                buffer += data
                while b"\n" in buffer:
                    line, _, rest = bytes(buffer).partition(b"\n")
                    buffer = bytearray(rest)
                    self._dispatch(json.loads(line))
                if len(buffer) > self._max_line:
                    break  # a line longer than any honest answer: drop the agent
        except (OSError, ValueError):
            pass
        self.close()

    def _frames(self) -> Iterator[bytes]:
        """Payloads of the agent's stdout frames (stderr frames are discarded)."""
        pending = b""
        while True:
            chunk = self._sock.recv(262144)
            if not chunk:
                return
            pending += chunk
            while len(pending) >= FRAME_HEADER.size:
                stream, size = FRAME_HEADER.unpack_from(pending)
                if len(pending) < FRAME_HEADER.size + size:
                    break
                payload = pending[FRAME_HEADER.size : FRAME_HEADER.size + size]
                pending = pending[FRAME_HEADER.size + size :]
                if stream == 1:
                    yield payload

    def _dispatch(self, message: dict[str, Any]) -> None:
        with self._pending_lock:
            inbox = self._pending.get(message.get("id", -1))
        if inbox is not None:
            inbox.put(message)

    def close(self) -> None:
        """Drop the channel; every waiting caller gets `AgentDied`."""
        self.alive = False
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with self._pending_lock:
            waiting, self._pending = list(self._pending.values()), {}
        for inbox in waiting:
            inbox.put(None)


class DirectRunner:
    """One `docker exec` per command: slower, with nothing running in the sandbox."""

    def __init__(self, container_id: str) -> None:
        self.container_id = container_id

    def _exec(
        self, argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None
    ) -> tuple[int, bytes]:
        api = engine.client().api
        with engine.engine_errors():
            exec_id = api.exec_create(self.container_id, argv, environment=env, workdir=cwd)["Id"]
            output = api.exec_start(exec_id)
            return int(api.exec_inspect(exec_id)["ExitCode"]), output

    def _oom_count(self) -> int | None:
        _code, output = self._exec(["sh", "-c", OOM_COUNTER])
        for line in output.decode(errors="replace").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
        return None

    def run(self, request: Request) -> RawResult:
        """Run one command with its own exec, timeout enforced inside the container."""
        token = uuid.uuid4().hex
        env = {**request.env, agent.TOKEN_VAR: token}
        wrapped = ["timeout", "-s", "KILL", f"{request.timeout:.3f}", *request.argv]
        if request.stdin is not None:
            env["STIGMER_STDIN_B64"] = base64.b64encode(request.stdin).decode()
            wrapped = [
                "bash",
                "-c",
                'printf %s "$STIGMER_STDIN_B64" | base64 -d | "$@"',
                "_",
                *wrapped,
            ]
        before = self._oom_count()
        started = time.monotonic()
        exit_code, captures = self._stream(wrapped, env, request)
        duration = time.monotonic() - started
        timed_out = exit_code == agent.TIMEOUT_EXIT and duration >= request.timeout
        if timed_out or not request.keep_background:
            self._exec(["sh", "-c", KILL_BY_TOKEN, f"{agent.TOKEN_VAR}={token}"])
        after = self._oom_count()
        oom = (
            not timed_out
            and exit_code == 137
            and before is not None
            and after is not None
            and after > before
        )
        return RawResult(
            exit_code,
            None,
            timed_out,
            oom,
            duration,
            captures["stdout"].text(),
            captures["stderr"].text(),
            {k: c.total for k, c in captures.items()},
            {k: c.dropped > 0 for k, c in captures.items()},
            via="exec",
        )

    def _stream(
        self, argv: list[str], env: dict[str, str], request: Request
    ) -> tuple[int, dict[str, agent.OutputCapture]]:
        api = engine.client().api
        captures = {
            "stdout": agent.OutputCapture(request.limit),
            "stderr": agent.OutputCapture(request.limit),
        }
        with engine.engine_errors():
            exec_id = api.exec_create(
                self.container_id, argv, environment=env, workdir=request.cwd
            )["Id"]
            for out, err in api.exec_start(exec_id, stream=True, demux=True):
                for name, data in (("stdout", out), ("stderr", err)):
                    if data:
                        live = captures[name].feed(data)
                        callback = _callback(request, name)
                        if callback and live:
                            callback(live)
            return int(api.exec_inspect(exec_id)["ExitCode"]), captures


class LocalRunner:
    """Runs a command on this host (`STIGMER_EXECUTION_MODE=local`) with the agent's logic:
    the same timeout (whole process tree), output caps and exit causes."""

    def run(self, request: Request) -> RawResult:
        heads = {"stdout": bytearray(), "stderr": bytearray()}

        class _Sink(agent.Agent):
            def send(self, message: dict[str, Any]) -> None:
                take_head(request, message, heads)

        answer = _Sink(io.BytesIO()).execute(_exec_message(request, 1))  # send() overridden
        return raw_result(request, answer, heads, "local")
