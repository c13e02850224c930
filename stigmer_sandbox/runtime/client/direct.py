"""Commands without the agent: one `docker exec` of the helper per command.

Slower (an engine round trip each, ~50 ms), for a sandbox whose agent cannot start. The
same helper gives the same timeout, tree kill and exit meanings; the exit status is read
from the exec, and an OOM kill from the container's counter before and after.
"""

from __future__ import annotations

import base64
import threading
import time
from typing import Any

from ... import engine, policy
from ...errors import SandboxError
from ..backends.docker import DOCKER
from ..guest import protocol
from ..guest.capture import OutputCapture
from ..guest.protocol import HOST_GRACE_S
from .commands import RawResult, Request

OOM_COUNTER = (
    "cat /sys/fs/cgroup/memory.events /sys/fs/cgroup/memory/memory.oom_control 2>/dev/null"
)


def run_exec(container_id: str, argv: list[str], **options: Any) -> tuple[int, bytes]:
    """One `docker exec`, waited for: exit status and output."""
    return DOCKER.run_root(container_id, argv, **options)


class DirectRunner:
    """One `docker exec` of the helper per command: slower, no agent in the sandbox."""

    def __init__(self, container_id: str, user: tuple[int, int]) -> None:
        self.container_id = container_id
        self.user = user

    def _oom_count(self) -> int | None:
        argv = ["/bin/sh", "-c", OOM_COUNTER]  # as root: root's PATH, not the sandbox user's
        _code, output = run_exec(self.container_id, argv, environment={"PATH": policy.ROOT_PATH})
        for line in output.decode(errors="replace").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
        return None

    def _argv(self, request: Request) -> tuple[list[str], dict[str, str]]:
        env = dict(request.env)
        argv = request.argv
        if request.stdin is not None:
            env["STIGMER_STDIN_B64"] = base64.b64encode(request.stdin).decode()
            feed = 'printf %s "$STIGMER_STDIN_B64" | base64 -d | "$@"'
            argv = ["/bin/bash", "-c", feed, "_", *argv]
        uid, gid = self.user
        options = ["--uid", str(uid), "--gid", str(gid), "--timeout", repr(request.timeout_s)]
        options += ["--kill-grace", repr(protocol.KILL_GRACE_S), "--cwd", request.cwd]
        options += ["--keep-background"] if request.keep_background else []
        return [protocol.EXEC_HELPER, *options, "--", *argv], env

    def run(self, request: Request) -> RawResult:
        """Run one command with its own exec; the helper enforces timeout and tree kill."""
        if request.session:
            return RawResult.start_failure(request, "sessions need the sandbox agent", "exec")
        argv, env = self._argv(request)
        captures = {name: OutputCapture(request.limit) for name in ("stdout", "stderr")}
        before = self._oom_count()
        started = time.monotonic()
        outcome: dict[str, Any] = {}
        worker = threading.Thread(
            target=self._stream, args=(argv, env, request, captures, outcome), daemon=True
        )
        worker.start()
        worker.join(request.timeout_s + HOST_GRACE_S)
        duration = time.monotonic() - started
        if worker.is_alive() or "error" in outcome:
            error = outcome.get("error") or "no result from docker exec before the hard deadline"
            return RawResult(None, None, False, False, duration, b"", b"", via="exec", error=error)
        code = outcome["exit_code"]
        timed_out = code == protocol.TIMEOUT_EXIT and duration >= request.timeout_s
        oom = protocol.oom_grew(before, self._oom_count())
        signal_number = code - 128 if 128 < code < 160 and not timed_out else None
        return RawResult(
            code,
            signal_number,
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
        self,
        argv: list[str],
        env: dict[str, str],
        request: Request,
        captures: dict[str, OutputCapture],
        outcome: dict[str, Any],
    ) -> None:
        api = engine.client().api
        try:
            with engine.engine_errors():
                exec_id = api.exec_create(self.container_id, argv, environment=env, user="0:0")
                for out, err in api.exec_start(exec_id["Id"], stream=True, demux=True):
                    for name, data in (("stdout", out), ("stderr", err)):
                        # Docker keeps the order the frames were written in across streams.
                        kept = "stdout" if request.merge_output else name
                        head = captures[kept].feed(data) if data else b""
                        callback = request.callback(kept)
                        if callback and head:
                            callback(head)
                outcome["exit_code"] = int(api.exec_inspect(exec_id["Id"])["ExitCode"])
        except SandboxError as exc:
            outcome["error"] = exc.message
