"""Background processes: start a server now, query it from later commands, read its
output, wait for it or kill its whole tree, from this or any other host process.

    server = sandbox.start("python -m http.server 8000")
    sandbox.exec("curl -s localhost:8000")            # reaches it
    again = sandbox.process(server.id)                # e.g. from another host process
    print(again.output().stdout)
    again.kill()                                       # the process and its children

Each runs under its own keeper in the sandbox (see `keeper`), so it lives as long as the
sandbox does, not as long as the host process that started it. Output is bounded like a
command's (head and tail kept, a marker where bytes were dropped).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import SandboxError, UsageError
from ..guest.capture import OutputCapture
from .commands import ExecOptions, ExecResult, Request, to_bytes

if TYPE_CHECKING:
    from .connection import Connection

WAIT_POLL_S = 0.02


@dataclass(frozen=True)
class ProcessOutput:
    """What a background process printed so far (head and tail when it printed a lot)."""

    stdout: str
    stderr: str
    stdout_bytes: int
    stderr_bytes: int
    truncated: dict[str, bool]


@dataclass(frozen=True)
class StreamBytes:
    """One stream's bytes as its record keeps them: the first ones (head), the last ones
    (tail) and how many were printed in all; the bytes between were dropped."""

    head: bytes
    tail: bytes
    dropped: int
    total: int

    def since(self, offset: int) -> tuple[bytes, int]:
        """The kept bytes from byte `offset` on, and how many bytes after `offset` were
        dropped before them (0 unless the output outgrew what is kept)."""
        tail_start = self.total - len(self.tail)
        from_head = self.head[offset:]
        gone = max(0, tail_start - max(offset, len(self.head)))
        return from_head + self.tail[max(offset - tail_start, 0) :], gone


def stream_bytes(record: object) -> StreamBytes:
    """A stream's record (base64 head and tail, counts) as bytes."""
    if not isinstance(record, dict):
        return StreamBytes(b"", b"", 0, 0)
    try:
        return StreamBytes(
            head=base64.b64decode(str(record.get("head") or ""), validate=True),
            tail=base64.b64decode(str(record.get("tail") or ""), validate=True),
            dropped=int(record.get("dropped") or 0),
            total=int(record.get("total") or 0),
        )
    except (ValueError, TypeError):
        raise SandboxError("a background process's record is malformed") from None


def stream_text(record: object) -> tuple[bytes, int, bool]:
    """A stream's kept bytes with a marker where bytes were dropped, its total, truncated."""
    kept = stream_bytes(record)
    capture = OutputCapture(2)
    capture.head, capture.tail = bytearray(kept.head), bytearray(kept.tail)
    capture.dropped = kept.dropped
    return capture.text(), kept.total, kept.dropped > 0


class Process:
    """A background process in a sandbox, found by its id."""

    def __init__(self, connection: Connection, process_id: str, command: str = "") -> None:
        self.connection = connection
        self.id = process_id
        self.command = command
        self._recorded_end = False

    def __repr__(self) -> str:
        return f"Process(id={self.id!r}, command={self.command!r})"

    def status(self) -> dict[str, Any]:
        """The keeper's record: command, running, exit code, ... (and the output)."""
        return self.connection.call("proc_status", {"process": self.id})

    @property
    def running(self) -> bool:
        return bool(self.status().get("running"))

    def output(self) -> ProcessOutput:
        """Everything kept of stdout and stderr so far."""
        return self.output_from(self.status())

    def output_bytes_from(self, state: dict[str, Any]) -> dict[str, StreamBytes]:
        """The bytes of stdout and stderr kept in a record `status()` returned, undecoded
        (to follow a stream by byte offset)."""
        return {name: stream_bytes(state.get(name)) for name in ("stdout", "stderr")}

    def output_from(self, state: dict[str, Any]) -> ProcessOutput:
        """The output kept in a record `status()` returned."""
        out, out_total, out_cut = stream_text(state.get("stdout"))
        err, err_total, err_cut = stream_text(state.get("stderr"))
        decoded = (out.decode(errors="replace"), err.decode(errors="replace"))
        return ProcessOutput(*decoded, out_total, err_total, {"stdout": out_cut, "stderr": err_cut})

    def wait(self, timeout: float | None = None) -> ExecResult:
        """Wait for the end (TimeoutError if it is still running after `timeout` s)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.status()
            if not state.get("running"):
                return self._result(state)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"background process {self.id} is still running")
            time.sleep(WAIT_POLL_S)

    def kill(self) -> ExecResult:
        """End the process and everything it started; its final result."""
        return self._result(self.connection.call("proc_kill", {"process": self.id}))

    def write(self, data: bytes | str) -> int:
        """Send bytes to the process's stdin (e.g. an answer to a prompt); bytes taken."""
        payload = to_bytes(data, "the data") if isinstance(data, str) else bytes(data)
        encoded = base64.b64encode(payload).decode()
        reply = self.connection.call("proc_write", {"process": self.id, "data": encoded})
        return int(reply.get("written") or 0)

    def _result(self, state: dict[str, Any]) -> ExecResult:
        output = self.output_from(state)
        signal_number = state.get("signal")
        result = ExecResult(
            exit_code=state.get("exit_code"),
            stdout=output.stdout,
            stderr=output.stderr,
            duration_s=float(state.get("duration_s") or 0.0),
            timed_out=bool(state.get("timed_out")),
            oom_killed=state.get("oom_killed") is True,
            signal=signal_number if isinstance(signal_number, int) else None,
            truncated=output.truncated,
            output_bytes={"stdout": output.stdout_bytes, "stderr": output.stderr_bytes},
            error=state.get("error"),
            command_id=self.id,
        )
        if not self._recorded_end:
            self._recorded_end = True
            self.connection.audit.record(
                {"sandbox": self.connection.name, "process": self.id, "event": "ended"}
                | {"command": state.get("command"), "exit_code": result.exit_code}
                | {"cause": "killed" if state.get("killed") else result.cause}
            )
        return result


def start_process(
    connection: Connection, command: str | Sequence[str], options: ExecOptions
) -> Process:
    """Start `command` in the background (see `Sandbox.start`): env, cwd, timeout (None: no
    limit) and output_limit are the options it takes."""
    request = Request.background(connection.settings, command, options)
    reply = connection.call("proc_start", request.process_fields())
    process = Process(connection, str(reply["id"]), str(request.shown))
    connection.audit.record(
        {"sandbox": connection.name, "process": process.id, "event": "started"}
        | {"command": request.shown}
    )
    return process


def process_listing(connection: Connection) -> list[dict[str, Any]]:
    """Every background process of the sandbox, running or recently ended, oldest first."""
    return list(connection.call("proc_list", {}).get("processes") or [])


def find_process(connection: Connection, process_id: str) -> Process:
    """Reattach to a background process by id (from any host process)."""
    process = Process(connection, process_id)
    try:
        process.command = str(process.status().get("command") or "")
    except SandboxError as exc:
        if "no background process" not in exc.message:
            raise  # the sandbox or its agent failed: say that, not "no such process"
        raise UsageError(f"no background process {process_id!r} in {connection.name}") from exc
    return process
