"""How commands reach a running sandbox's agent (`direct` is the way without one).

`stigmer_sandbox.runtime.guest.agent` runs inside the container as uid 0 with only
CAP_SETUID, CAP_SETGID and CAP_KILL, started once through one attached `docker exec`
whose stdin/stdout carry JSON lines. A command then costs two small execs inside the
container and a few kilobytes on a socket, instead of an exec round trip through the
engine (~50 ms). Many commands can be in flight at once; answers are matched by id.

Trust: commands run as the sandbox user through the root-owned `stigmer-exec` helper,
so nothing they do reaches this stream (see `agent`). The host still trusts nothing it
reads: every frame is checked for shape and type, lines are bounded, output is re-capped
here, and a stream that breaks the protocol is dropped, its commands reported `lost`.
Liveness is judged by the agent's heartbeat, never by silence: a command may print
nothing for hours. Each command has a hard deadline of its timeout plus a grace,
whatever the container sends.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import itertools
import json
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from ... import policy
from ...errors import SandboxError
from ..backends.base import STDOUT, Backend
from ..backends.docker import DOCKER
from ..guest import AGENT_SOURCES, protocol
from ..guest.capture import OutputCapture
from ..guest.protocol import HOST_GRACE_S
from .commands import RawResult, Request

# No frame at all (the agent beats every second) for this long: the agent is lost.
LIVENESS_S = 10.0


class AgentLost(SandboxError):
    """The agent died, stopped or broke the protocol; results in flight are lost."""


class ProtocolError(ValueError):
    """A frame from the agent that no honest agent sends."""


class CommandOverdue(SandboxError):
    """One request got no answer by its hard deadline while the agent kept beating."""


_FIELD_TYPES: dict[str, dict[str, tuple[type, ...]]] = {
    "out": {"stream": (str,), "data": (str,)},
    "tail": {"stream": (str,), "data": (str,)},
    "done": {
        "exit_code": (int,),
        "signal": (int, type(None)),
        "timed_out": (bool,),
        "oom_killed": (bool,),
        "duration_s": (int, float),
        "error": (str, type(None)),
        "oom_overlap": (list,),
        "stdout": (dict,),
        "stderr": (dict,),
    },
    "pong": {"pid": (int,)},
    "reply": {"data": (dict,)},
    "beat": {},
    "error": {"message": (str,)},
}
_STREAM_FIELDS: dict[str, tuple[type, ...]] = {"tail": (str,), "dropped": (int,), "total": (int,)}


def _check_fields(message: dict[str, Any], wanted: Mapping[str, tuple[type, ...]]) -> None:
    for name, types in wanted.items():
        value = message.get(name)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ProtocolError(f"field {name!r} is {type(value).__name__}")


def check_message(line: bytes | bytearray) -> dict[str, Any]:
    """One line from the agent, parsed and checked for shape; ProtocolError otherwise."""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError) as exc:  # invalid UTF-8 is a ValueError too
        raise ProtocolError(f"not JSON ({type(exc).__name__})") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"not an object but {type(message).__name__}")
    kind = message.get("type")
    if not isinstance(kind, str) or kind not in _FIELD_TYPES:
        raise ProtocolError(f"unknown message type {str(kind)[:40]!r}")
    _check_fields(message, {"id": (int,), **_FIELD_TYPES[kind]})
    if kind in ("out", "tail") and message["stream"] not in ("stdout", "stderr"):
        raise ProtocolError("unknown stream")
    if kind == "done":
        for name in ("stdout", "stderr"):
            _check_fields(message[name], _STREAM_FIELDS)
        if not all(isinstance(item, str) for item in message["oom_overlap"]):
            raise ProtocolError("oom_overlap holds non-strings")
    return message


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("invalid base64") from None


class Received:
    """What arrived for one command before its `done`: live heads and tail pieces, each kept
    within the request's budget whatever the agent sends."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.heads = {"stdout": bytearray(), "stderr": bytearray()}
        self.tails = {"stdout": bytearray(), "stderr": bytearray()}

    def take_head(self, answer: dict[str, Any]) -> None:
        """Keep a live "out" message's bytes (within the head budget) and pass them on."""
        stream = answer["stream"]
        head = self.heads[stream]
        data = _b64(answer["data"])[: max(self.request.limit // 2 - len(head), 0)]
        head += data
        callback = self.request.callback(stream)
        if callback and data:
            callback(data)

    def take_tail(self, answer: dict[str, Any]) -> None:
        """Append a piece of a stream's tail, keeping only the last `tail budget` bytes."""
        tail = self.tails[answer["stream"]]
        tail += _b64(answer["data"])
        budget = self.request.limit - self.request.limit // 2
        if len(tail) > budget:
            del tail[: len(tail) - budget]


def raw_result(request: Request, answer: dict[str, Any], received: Received, via: str) -> RawResult:
    """The agent's "done" answer plus what arrived before it, re-capped on this side."""
    streams: dict[str, bytes] = {}
    totals, truncated = {}, {}
    heads = received.heads
    for name in ("stdout", "stderr"):
        info = answer[name]
        capture = OutputCapture(request.limit)
        capture.head = heads[name]
        received.take_tail({"stream": name, "data": info["tail"]})  # "": sent in pieces
        capture.tail = tail = received.tails[name]
        total = max(int(info["total"]), len(heads[name]) + len(tail))
        capture.dropped = total - len(heads[name]) - len(tail)
        streams[name] = capture.text()
        totals[name] = total
        truncated[name] = capture.dropped > 0
        callback = request.callback(name)
        if callback and len(streams[name]) > len(heads[name]):
            callback(streams[name][len(heads[name]) :])
    return RawResult(
        answer["exit_code"],
        answer["signal"],
        answer["timed_out"],
        answer["oom_killed"],
        float(answer["duration_s"]),
        streams["stdout"],
        streams["stderr"],
        totals,
        truncated,
        via,
        answer["error"],
        list(answer["oom_overlap"]),
        idle_timed_out=answer.get("idle_timed_out") is True,
    )


# One per request: the C-implemented SimpleQueue wakes its waiter faster than Queue.
Inbox = queue.SimpleQueue[dict[str, Any] | None]


class LineSplitter:
    """Cuts a byte stream into lines, reading each byte once (rescanning a growing buffer
    for every read made one 86 MB answer stall the channel for seconds)."""

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytearray]:
        """The lines `data` completes (without their newline); ProtocolError once the
        unfinished line is longer than `max_line`."""
        buffer = self._buffer
        searched = len(buffer)  # holds no newline: never scanned again
        buffer += data
        lines, start = [], 0
        while (end := buffer.find(b"\n", max(start, searched))) >= 0:
            lines.append(buffer[start:end])
            start = end + 1
        del buffer[:start]  # O(1) at the front of a bytearray
        if len(buffer) > self.max_line:
            raise ProtocolError("a line longer than any honest answer")
        return lines


class Deadline:
    """A command's hard deadline on the host, pushed back while its container is paused."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self._was_held = False

    def extend(self, held: bool) -> bool:
        """At expiry: whether to keep waiting. While held, a second at a time; once thawed,
        one grace period for the command's own timeout to fire and its answer to arrive."""
        if held:
            self.at, self._was_held = time.monotonic() + 1.0, True
            return True
        if self._was_held:
            self.at, self._was_held = time.monotonic() + HOST_GRACE_S, False
            return True
        return False


class AgentChannel:
    """One agent process inside one container, shared by concurrent callers."""

    def __init__(
        self,
        container_id: str,
        user: tuple[int, int],
        max_line: int,
        source: str | list[str] = AGENT_SOURCES,
        backend: Backend = DOCKER,
    ) -> None:
        self.container_id = container_id
        self._backend = backend
        self._stream = backend.open_agent(
            container_id,
            [policy.PYTHON, "-I", "-S", "-u", "-c", protocol.BOOTSTRAP, *map(str, user)],
        )
        self._max_line = max_line
        self._ids = itertools.count(1)
        self._write_lock = threading.Lock()
        self._pending: dict[int, Inbox] = {}
        self._pending_lock = threading.Lock()
        self._last_frame = time.monotonic()
        self._frozen = 0
        self._stderr_tail = b""
        self.agent_pid: int | None = None
        self.alive = True
        self.lost_reason = ""
        self._stream.send(json.dumps(source).encode() + b"\n")
        for target, name in ((self._read_loop, "reader"), (self._watchdog, "watchdog")):
            threading.Thread(target=target, daemon=True, name=f"stigmer-agent-{name}").start()

    def _send(self, message: dict[str, Any]) -> Inbox:
        inbox: Inbox = queue.SimpleQueue()
        with self._pending_lock:
            if not self.alive:
                raise AgentLost(self.lost_reason or "the sandbox agent is gone")
            self._pending[message["id"]] = inbox
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        try:
            with self._write_lock:
                self._stream.send(data)
        except OSError as exc:
            self.reset(f"the sandbox agent is gone ({exc})")
        return inbox

    def ping(self, timeout: float = 10.0) -> None:
        """Round-trip a ping (and learn the agent's pid); raises `AgentLost` without one."""
        rid = next(self._ids)
        answer = self._wait(self._send({"op": "ping", "id": rid}), rid, Deadline(timeout))
        if answer["type"] != "pong":
            raise AgentLost(f"the sandbox agent answered a ping with {answer['type']!r}")
        self.agent_pid = answer["pid"]

    def call(self, op: str, fields: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """One request that is not a command (sessions, background processes): its reply's
        data; a request the agent refused raises SandboxError with its reason."""
        rid = next(self._ids)
        inbox = self._send({**fields, "op": op, "id": rid})
        try:  # a slow answer fails this request only: liveness is the watchdog's job
            answer = inbox.get(timeout=timeout)
        except queue.Empty:
            raise SandboxError(
                f"no answer to {op} from the sandbox agent in {timeout:g} s"
            ) from None
        finally:
            self._forget(rid)
        if answer is None:
            raise AgentLost(self.lost_reason or "the sandbox agent is gone")
        if answer["type"] == "error":
            raise SandboxError(answer["message"])
        if answer["type"] != "reply":
            raise AgentLost(f"the sandbox agent answered {op} with {answer['type']!r}")
        return dict(answer["data"])

    def _wait(self, inbox: Inbox, rid: int, deadline: Deadline) -> dict[str, Any]:
        """The next message for `rid`. Time the container spends paused (a fork or snapshot,
        ours or another process's) does not count against the deadline: inside, the
        command's own timeout fires as soon as it thaws."""
        while True:
            try:
                message = inbox.get(timeout=max(0.0, deadline.at - time.monotonic()))
                break
            except queue.Empty:
                if deadline.extend(self._held()):
                    continue
                self._forget(rid)
                if self._beating():  # the agent answers: this request alone is overdue
                    raise CommandOverdue("no answer before the command's hard deadline") from None
                self.reset("no answer from the sandbox agent before the command's hard deadline")
                message = None
                break
        if message is None:
            raise AgentLost(self.lost_reason)
        return message

    def _beating(self) -> bool:
        """Whether the agent's heartbeat (or any frame) arrived recently."""
        return self.alive and time.monotonic() - self._last_frame < 2 * protocol.HEARTBEAT_S + 1

    def _cancel(self, cid: str) -> None:
        """Ask the agent to end a command (its helper kills the tree); the answer is not
        awaited."""
        rid = next(self._ids)
        with contextlib.suppress(AgentLost):
            self._send({"op": "cancel", "id": rid, "cid": cid})
        self._forget(rid)

    def _held(self) -> bool:
        """Whether the container is paused on purpose (then silence is not death)."""
        return self._frozen > 0 or self._backend.is_paused(self.container_id)

    def _forget(self, rid: int) -> None:
        with self._pending_lock:
            self._pending.pop(rid, None)

    def run(self, request: Request) -> RawResult:
        """Run one command through the agent, streaming its head to the callbacks."""
        rid = next(self._ids)
        started = time.monotonic()
        inbox = self._send(request.exec_message(rid))
        received = Received(request)
        deadline = Deadline(request.timeout_s + HOST_GRACE_S)
        try:
            while True:
                answer = self._wait(inbox, rid, deadline)
                if answer["type"] == "out":
                    received.take_head(answer)
                elif answer["type"] == "tail":
                    received.take_tail(answer)
                elif answer["type"] == "done":
                    return raw_result(request, answer, received, "agent")
                elif answer["type"] == "error":
                    return RawResult.start_failure(request, answer["message"], "agent")
        except CommandOverdue as exc:
            self._cancel(request.cid)
            elapsed = time.monotonic() - started
            return RawResult.lost(f"{exc}; it was cancelled", elapsed, "agent")
        except ProtocolError as exc:
            self.reset(f"the sandbox agent broke the protocol ({exc})")
            raise AgentLost(self.lost_reason) from None
        finally:
            self._forget(rid)

    def _read_loop(self) -> None:
        reason = "the sandbox agent exited"
        lines = LineSplitter(self._max_line)
        try:
            for data in self._frames():
                self._last_frame = time.monotonic()
                for line in lines.feed(data):
                    self._dispatch(check_message(line))
        except ProtocolError as exc:
            reason = f"the sandbox agent broke the protocol ({exc})"
        except OSError as exc:
            reason = f"the sandbox agent's stream failed ({exc})"
        tail = self._stderr_tail.decode(errors="replace").strip().splitlines()
        self.reset(reason + (f": {tail[-1][:200]}" if tail else ""))

    def _frames(self) -> Iterator[bytes]:
        """The agent's stdout (the last bytes of stderr are kept)."""
        for stream, payload in self._stream.chunks():
            if stream == STDOUT:
                yield payload
            else:
                self._stderr_tail = (self._stderr_tail + payload)[-4096:]
                self._last_frame = time.monotonic()

    def _dispatch(self, message: dict[str, Any]) -> None:
        with self._pending_lock:
            inbox = self._pending.get(message["id"])
        if inbox is not None:
            inbox.put(message)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """While the container is paused on purpose (fork, snapshot), its silence is not
        death: the watchdog waits, and counts again from when it resumes."""
        with self._pending_lock:
            self._frozen += 1
        try:
            yield
        finally:
            self._last_frame = time.monotonic()
            with self._pending_lock:
                self._frozen -= 1

    def _watchdog(self) -> None:
        while self.alive:
            time.sleep(1.0)
            silent = time.monotonic() - self._last_frame
            if silent > LIVENESS_S and self._held():
                self._last_frame = time.monotonic()  # counts again from the thaw
            elif silent > LIVENESS_S:
                self.reset(f"the sandbox agent stopped answering (no heartbeat for {silent:.0f} s)")

    def reset(self, reason: str) -> None:
        """Drop the channel: waiting callers get `AgentLost`, the agent is killed, and each
        helper it left ends its command's whole tree (they watch their parent)."""
        with self._pending_lock:
            if not self.alive:
                return
            self.alive = False
            self.lost_reason = reason
            waiting, self._pending = list(self._pending.values()), {}
        with contextlib.suppress(OSError):
            self._stream.shutdown()
        for inbox in waiting:
            inbox.put(None)
        if self.agent_pid is not None:
            threading.Thread(target=self._kill_agent, daemon=True).start()

    def _kill_agent(self) -> None:
        kill = f"import os; os.kill({self.agent_pid}, 9)"
        with contextlib.suppress(SandboxError):
            argv = [policy.PYTHON, "-I", "-S", "-c", kill]
            self._backend.run_root(self.container_id, argv, user="0:0")

    def close(self) -> None:
        """Close the channel (the agent ends everything it started)."""
        self.reset("the channel was closed")
