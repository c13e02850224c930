"""In-container command agent: runs the host's commands over one attached exec stream.

This file is sent into the sandbox as source (`python3 -u -c <this file>`) and
must stay standard-library Python 3.11 with no imports from the package. The
host imports `OutputCapture` and `exit_cause` from it too, so both sides cap
output and classify exits the same way.

Protocol: JSON lines. The host writes requests to the agent's stdin:
  {"op": "exec", "id": 7, "argv": [...], "env": {...}, "cwd": "/workspace",
   "timeout": 600, "limit": 1048576, "stdin": "<base64>" | null, "keep_background": false}
  {"op": "ping", "id": 8}
The agent answers on stdout:
  {"id": 7, "type": "out", "stream": "stdout", "data": "<base64>"}   (live, head only)
  {"id": 7, "type": "done", "exit_code": 0, "signal": null, "timed_out": false,
   "oom_killed": false, "duration_s": 0.01,
   "stdout": {"tail": "<base64>", "dropped": 0, "total": 12}, "stderr": {...}}
  (the head of each stream arrived before as "out" messages)
  {"id": 8, "type": "pong"}
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from typing import Any, BinaryIO

Message = dict[str, Any]
Process = subprocess.Popen[bytes]

TOKEN_VAR = "STIGMER_EXEC_TOKEN"
TIMEOUT_EXIT = 124
READ_CHUNK = 65536
KILL_DEADLINE_S = 10.0
# Linux refuses any single argument over 128 KiB (MAX_ARG_STRLEN); stay well below.
MAX_INLINE_ARG = 100_000
# After the command exits, wait this long for output still in flight; a background
# child that keeps the pipe open must not hold the result back.
EXIT_GRACE_S = 0.2
OOM_FILES = ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control")


class OutputCapture:
    """Keeps the first and last `limit // 2` bytes of a stream; counts what it drops."""

    def __init__(self, limit: int) -> None:
        self.head_budget = max(limit, 2) // 2
        self.tail_budget = max(limit, 2) - self.head_budget
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0
        self.dropped = 0

    def feed(self, data: bytes) -> bytes:
        """Take `data`; return the part that belongs to the head (to stream live)."""
        self.total += len(data)
        room = self.head_budget - len(self.head)
        live = data[:room] if room > 0 else b""
        self.head += live
        rest = data[len(live) :]
        if rest:
            self.tail += rest
            excess = len(self.tail) - self.tail_budget
            if excess > 0:
                del self.tail[:excess]
                self.dropped += excess
        return live

    def text(self) -> bytes:
        """Head, a visible marker where bytes were dropped, and tail."""
        marker = b""
        if self.dropped:
            marker = f"\n[... {self.dropped} bytes truncated by stigmer-sandbox ...]\n".encode()
        return bytes(self.head) + marker + bytes(self.tail)


def exit_cause(exit_code: int, signal_number: int | None, timed_out: bool, oom_killed: bool) -> str:
    """Why a command ended: timeout, oom, signal or exit."""
    if timed_out:
        return "timeout"
    if oom_killed:
        return "oom"
    if signal_number:
        return "signal"
    return "exit"


def oom_kills() -> int | None:
    """The container's OOM-kill counter (cgroup v2 or v1), or None."""
    for path in OOM_FILES:
        try:
            with open(path) as handle:
                for line in handle:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except OSError:
            continue
    return None


def processes_with_token(token: str) -> list[int]:
    """Pids of every process whose environment carries `token` (setsid cannot hide them)."""
    marker = f"{TOKEN_VAR}={token}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:
                if marker in handle.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue
    return found


def kill_tree(process: Process, token: str) -> None:
    """Kill the command's process group and everything else it started.

    Each round freezes every marked process (SIGSTOP) before killing them, so
    even a fork bomb stops growing and the rounds converge.
    """
    with contextlib.suppress(OSError):
        os.killpg(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_DEADLINE_S
    while time.monotonic() < deadline:
        pids = processes_with_token(token)
        if not pids:
            return
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)


class Pump:
    """One command's pipes, exit and deadline, all served by one thread.

    The command's exit wakes the loop through a pidfd; then what it left running is
    ended (unless kept), and output still in flight gets a short grace.
    """

    def __init__(
        self,
        agent: Agent,
        request: Message,
        process: Process,
        token: str,
        captures: dict[str, OutputCapture],
    ) -> None:
        self.agent, self.request, self.process, self.token = agent, request, process, token
        self.captures = captures
        self.deadline = time.monotonic() + float(request.get("timeout") or 3600)
        if process.stdout is None or process.stderr is None:
            raise ValueError("the command was started without output pipes")
        self.streams = (process.stdout, process.stderr)
        self.pipes = {process.stdout.fileno(): "stdout", process.stderr.fileno(): "stderr"}
        self.exit_fd = exit_watcher(process)
        self.timed_out = False
        self.grace_until: float | None = None

    def run(self) -> bool:
        """Serve the command until its pipes close; returns whether it timed out."""
        while self.pipes and not self._grace_over():
            self._check_exit_and_deadline()
            if self.pipes and not self._grace_over():
                ready, _, _ = select.select(self._watched(), [], [], self._wait())
                self._handle(ready)
        self._wait_without_pipes()
        for pipe in self.streams:
            pipe.close()
        if self.exit_fd is not None:
            os.close(self.exit_fd)
        return self.timed_out

    def _grace_over(self) -> bool:
        return self.grace_until is not None and time.monotonic() >= self.grace_until

    def _ended(self) -> None:
        if not self.timed_out and not self.request.get("keep_background"):
            kill_tree(self.process, self.token)  # what the command left running ends with it
        self.grace_until = time.monotonic() + EXIT_GRACE_S

    def _timeout(self) -> None:
        self.timed_out = True
        kill_tree(self.process, self.token)
        self.process.wait()

    def _check_exit_and_deadline(self) -> None:
        if self.exit_fd is None:
            self.process.poll()
        if self.process.returncode is None and time.monotonic() >= self.deadline:
            self._timeout()
        if self.process.returncode is not None and self.grace_until is None:
            self._ended()

    def _watched(self) -> list[int]:
        watched = list(self.pipes)
        if self.exit_fd is not None and self.process.returncode is None:
            watched.append(self.exit_fd)
        return watched

    def _wait(self) -> float:
        wait = (self.grace_until or self.deadline) - time.monotonic()
        return max(0.0, wait if self.exit_fd is not None else min(wait, 0.05))

    def _handle(self, ready: list[int]) -> None:
        for fd in ready:
            if fd == self.exit_fd:
                self.process.wait()
                continue
            data = os.read(fd, READ_CHUNK)
            if not data:
                del self.pipes[fd]
                continue
            name = self.pipes[fd]
            live = self.captures[name].feed(data)
            if live:
                self.agent.send(
                    {
                        "id": self.request["id"],
                        "type": "out",
                        "stream": name,
                        "data": base64.b64encode(live).decode(),
                    }
                )

    def _wait_without_pipes(self) -> None:
        """The command closed both pipes but may still run: wait for it, to the deadline."""
        if self.process.returncode is not None:
            return
        try:
            self.process.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._timeout()
        if self.grace_until is None:
            self._ended()


class Agent:
    """Reads requests from stdin, runs each in its own thread, writes answers to stdout."""

    def __init__(self, output: BinaryIO) -> None:
        self.output = output
        self.lock = threading.Lock()
        self.active: dict[str, Process] = {}

    def send(self, message: Message) -> None:
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        with self.lock, contextlib.suppress(OSError, ValueError):  # the host may be gone
            self.output.write(data)
            self.output.flush()

    def serve(self, requests: Iterable[bytes]) -> None:
        for line in requests:
            if not line.strip():
                continue
            try:
                request = json.loads(line)
                request["id"]
            except (ValueError, TypeError, KeyError):
                continue  # not a request; the host never sends these
            if request.get("op") == "ping":
                self.send({"id": request["id"], "type": "pong", "pid": os.getpid()})
            elif request.get("op") == "exec":
                try:
                    threading.Thread(target=self.run, args=(request,), daemon=True).start()
                except RuntimeError as exc:  # the sandbox's process limit is reached
                    self.send({"id": request["id"], "type": "error", "message": str(exc)})
        # The host is gone (closed our stdin, or was killed): nothing it started may linger.
        for token, process in list(self.active.items()):
            kill_tree(process, token)

    def run(self, request: Message) -> None:
        try:
            self.send(self.execute(request))
        except Exception as exc:
            self.send({"id": request["id"], "type": "error", "message": repr(exc)})

    def execute(self, request: Message) -> Message:
        rid = request["id"]
        token = f"{os.getpid()}.{rid}.{time.monotonic_ns()}"
        env = dict(os.environ)
        env.update(request.get("env") or {})
        env[TOKEN_VAR] = token
        cwd = request.get("cwd") or "/workspace"
        if not os.path.isdir(cwd):
            return failed(rid, 2, f"cd: {cwd}: No such directory\n")
        argv, script = inline_long_script(request["argv"])
        try:
            return self._spawn_and_wait(request, argv, env, cwd, token)
        finally:
            if script:
                os.unlink(script)

    def _spawn_and_wait(
        self, request: Message, argv: list[str], env: dict[str, str], cwd: str, token: str
    ) -> Message:
        rid = request["id"]
        limit = int(request.get("limit") or 1048576)
        stdin = request.get("stdin")
        before = oom_kills()
        started = time.monotonic()
        try:
            process = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                start_new_session=True,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except FileNotFoundError:
            return failed(rid, 127, f"{argv[0]}: command not found\n")
        except PermissionError:
            return failed(rid, 126, f"{argv[0]}: permission denied\n")
        self.active[token] = process
        prefer_as_oom_victim(process.pid)
        if stdin is not None:
            threading.Thread(
                target=feed_stdin, args=(process, base64.b64decode(stdin)), daemon=True
            ).start()
        captures = {"stdout": OutputCapture(limit), "stderr": OutputCapture(limit)}
        timed_out = Pump(self, request, process, token, captures).run()
        returncode = process.returncode
        duration = time.monotonic() - started
        self.active.pop(token, None)
        after = oom_kills()
        signal_number = -returncode if returncode < 0 else None
        oom = (
            not timed_out
            and before is not None
            and after is not None
            and after > before
            and signal_number == signal.SIGKILL
        )
        exit_code = (
            TIMEOUT_EXIT if timed_out else (128 + signal_number if signal_number else returncode)
        )
        return {
            "id": rid,
            "type": "done",
            "exit_code": exit_code,
            "signal": signal_number,
            "timed_out": timed_out,
            "oom_killed": oom,
            "duration_s": duration,
            **{name: summary(capture) for name, capture in captures.items()},
        }


def inline_long_script(argv: list[str]) -> tuple[list[str], str | None]:
    """`bash -c SCRIPT` with a script too long for one argument: run it from a file."""
    if len(argv) < 3 or argv[:2] != ["bash", "-c"] or len(argv[2].encode()) <= MAX_INLINE_ARG:
        return argv, None
    descriptor, path = tempfile.mkstemp(prefix="stigmer-command-", suffix=".sh")
    with os.fdopen(descriptor, "w") as handle:
        handle.write(argv[2])
    return ["bash", path, *argv[3:]], path


def summary(capture: OutputCapture) -> Message:
    return {
        "tail": base64.b64encode(bytes(capture.tail)).decode(),
        "dropped": capture.dropped,
        "total": capture.total,
    }


def failed(rid: Any, exit_code: int, message: str) -> Message:
    """The answer for a command that could not start (as bash would report it)."""
    data = message.encode()
    empty = {"tail": "", "dropped": 0, "total": 0}
    err = {"tail": base64.b64encode(data).decode(), "dropped": 0, "total": len(data)}
    return {
        "id": rid,
        "type": "done",
        "exit_code": exit_code,
        "signal": None,
        "timed_out": False,
        "oom_killed": False,
        "duration_s": 0.0,
        "stdout": empty,
        "stderr": err,
    }


def feed_stdin(process: Process, data: bytes) -> None:
    if process.stdin is None:
        return
    try:
        process.stdin.write(data)
        process.stdin.close()
    except OSError:
        pass


def exit_watcher(process: Process) -> int | None:
    """A pidfd that becomes readable when `process` exits, or None where unsupported."""
    try:
        return os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        return None


def prefer_as_oom_victim(pid: int) -> None:
    """Make the command, not the agent, the OOM killer's first choice."""
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as handle:
            handle.write("1000")
    except OSError:
        pass


def main() -> None:
    Agent(sys.stdout.buffer).serve(sys.stdin.buffer)


if __name__ == "__main__":
    main()
