"""How a command's output is read and capped, the same way on both sides.

Standard-library Python only (sent into the sandbox after `protocol`): the agent captures
a command's streams with `OutputCapture` and serves its pipes with `Pump`; the host re-caps
what arrives with the same `OutputCapture`, and `LocalSandbox` (the host as the sandbox)
serves its commands' pipes with the same `Pump`.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO

Process = subprocess.Popen[bytes]

READ_CHUNK = 65536
# After the command exits, wait this long for output still in flight; a background
# child that keeps the pipe open must not hold the result back.
EXIT_GRACE_S = 0.2


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
        return b"".join((self.head, marker, self.tail))  # one copy: results reach 64 MiB


class Pump:
    """One command's pipes, exit and deadline, all served by one thread.

    The process's exit wakes the loop through a pidfd; `expire` runs once at the
    deadline, `ended` once when the process has exited; output still in flight after
    the exit gets a short grace.
    """

    def __init__(
        self,
        process: Process,
        *,
        captures: dict[str, OutputCapture],
        live: Callable[[str, bytes], None],
        deadline: float,
        expire: Callable[[], None],
        ended: Callable[[], None],
        extra: dict[str, IO[bytes]] | None = None,
        idle: tuple[float, Callable[[], None]] | None = None,
    ) -> None:
        if process.stdout is None:
            raise ValueError("the command was started without an output pipe")
        self.process, self.captures, self.live = process, captures, live
        self.deadline, self.expire, self.ended = deadline, expire, ended
        # Without a stderr pipe, stderr was merged into stdout (one ordered stream).
        named = [("stdout", process.stdout), ("stderr", process.stderr)]
        named += list((extra or {}).items())  # read like output, never streamed live
        self.streams = tuple(pipe for _name, pipe in named if pipe is not None)
        self.pipes = {pipe.fileno(): name for name, pipe in named if pipe is not None}
        self.exit_fd = exit_watcher(process)
        self.expired = False
        self.grace_until: float | None = None
        # Idle timeout: (seconds without output, what to do once); None when not asked.
        self.idle_s: float | None = idle[0] if idle else None
        self.on_idle: Callable[[], None] | None = idle[1] if idle else None
        self.idled = False
        self.last_output = time.monotonic()

    def run(self) -> None:
        """Serve the process until its pipes close (or the grace after its exit ends)."""
        try:
            while self.pipes and not self._grace_over():
                self._check_exit_and_deadline()
                if self.pipes and not self._grace_over():
                    ready, _, _ = select.select(self._watched(), [], [], self._wait())
                    self._handle(ready)
            while self.process.returncode is None:
                self._check_exit_and_deadline()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=max(0.01, self._wait()))
            if self.grace_until is None:
                self._exited()
        finally:
            for pipe in self.streams:
                pipe.close()
            if self.exit_fd is not None:
                os.close(self.exit_fd)

    def _grace_over(self) -> bool:
        return self.grace_until is not None and time.monotonic() >= self.grace_until

    def _exited(self) -> None:
        self.ended()
        self.grace_until = time.monotonic() + EXIT_GRACE_S

    def _idle_due(self) -> float | None:
        if self.idle_s is None or self.idled:
            return None
        return self.last_output + self.idle_s

    def _check_exit_and_deadline(self) -> None:
        if self.exit_fd is None:  # else its pidfd says when it exits (`_handle` polls then)
            self.process.poll()
        now = time.monotonic()
        idle_due = self._idle_due()
        if self.process.returncode is None and idle_due is not None and now >= idle_due:
            self.idled = True
            if self.on_idle is not None:
                self.on_idle()
        if self.process.returncode is None and not self.expired and now >= self.deadline:
            self.expired = True
            self.expire()
        if self.process.returncode is not None and self.grace_until is None:
            self._exited()

    def _watched(self) -> list[int]:
        watched = list(self.pipes)
        if self.exit_fd is not None and self.process.returncode is None:
            watched.append(self.exit_fd)
        return watched

    def _wait(self) -> float:
        until = self.grace_until or (self.deadline if not self.expired else time.monotonic() + 1)
        idle_due = self._idle_due()
        if self.grace_until is None and idle_due is not None:
            until = min(until, idle_due)
        wait = until - time.monotonic()
        return max(0.0, wait if self.exit_fd is not None else min(wait, 0.05))

    def _handle(self, ready: list[int]) -> None:
        for fd in ready:
            if fd == self.exit_fd:
                self.process.poll()
                continue
            data = os.read(fd, READ_CHUNK)
            if not data:
                del self.pipes[fd]
                continue
            name = self.pipes[fd]
            head = self.captures[name].feed(data)
            if name in ("stdout", "stderr"):
                self.last_output = time.monotonic()
                if head:
                    self.live(name, head)


def feed(pipe: IO[bytes], data: bytes) -> None:
    """Write `data` to a pipe in the background, then close it."""
    threading.Thread(target=feed_pipe, args=(pipe, data), daemon=True).start()


def feed_pipe(pipe: IO[bytes], data: bytes) -> None:
    with contextlib.suppress(OSError, ValueError):  # the reader may exit without reading
        pipe.write(data)
    with contextlib.suppress(OSError, ValueError):
        pipe.close()


def exit_watcher(process: Process) -> int | None:
    """A pidfd that becomes readable when `process` exits, or None where unsupported."""
    try:
        return os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        return None
