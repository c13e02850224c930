"""A running sandbox's command path, apart from its lifecycle.

    connection = sandbox.connection
    connection.exec("make test", timeout=600)
    Session(connection, "build").exec("cd src")      # what sandbox.session("build") does

A `Connection` owns the runner (the agent channel, or one `docker exec` per command when
the agent cannot start), where commands start, and the audit record of each one. Sessions,
background processes, file transfers, the package bootstrap and the warm relay are built
on it; none of them sees a `Sandbox`. The lifecycle (create, start, stop, remove, fork)
stays in `runtime.sandbox`, which hands a Connection the one thing it needs from there:
`locate`, the id of the running container (starting it again if it stopped behind our
back).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Unpack

from ... import config, policy
from ...config import Settings
from ...errors import SandboxError, SandboxNotReady
from ..backends.base import Backend
from ..backends.docker import DOCKER
from ..guest import BATCH_SOURCE
from .channel import AgentChannel, AgentLost
from .commands import ExecOptions, ExecResult, RawResult, Request, audit_entry
from .direct import DirectRunner
from .files import SYSTEM_PATH, TRANSFER_TIMEOUT_S
from .history import AuditLog

# After the agent failed to start, commands use docker exec this long before trying again.
AGENT_RETRY_S = 30.0


class Connection:
    """The command path into one sandbox (see the module's docstring). Thread-safe."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        user: tuple[int, int],
        *,
        locate: Callable[[], str],
        use_agent: bool = True,
        backend: Backend = DOCKER,
        lock: threading.RLock | None = None,
        notes: list[str] | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.user = user
        self.audit = AuditLog(settings.path("state_dir") / "audit.jsonl")
        self.notes = notes if notes is not None else []
        self.use_agent = use_agent
        self.retired = False
        self._locate = locate
        self._backend = backend
        # Shared with the lifecycle when it hands one over: `locate` may start the
        # container, which may close or replace the channel.
        self._lock = lock or threading.RLock()
        self._channel: AgentChannel | None = None
        self._agent_failed_at = 0.0

    # -- the runner --------------------------------------------------------------------------

    def open_channel(self, container_id: str) -> AgentChannel:
        """A new agent channel into the container, answered once (not yet adopted)."""
        channel = AgentChannel(
            container_id,
            self.user,
            max_line=2 * config.MAX_OUTPUT_LIMIT + 65536,
            backend=self._backend,
        )
        try:
            channel.ping()
        except BaseException:
            channel.close()
            raise
        return channel

    def adopt(self, channel: AgentChannel) -> None:
        """Use `channel` from now on (one the lifecycle opened while the container started)."""
        with self._lock:
            self.close()
            self._channel = channel

    @property
    def channel(self) -> AgentChannel | None:
        """The agent channel in use, if one is open."""
        return self._channel

    @property
    def connected(self) -> bool:
        """Whether the agent connection is open and its heartbeat alive."""
        channel = self._channel
        return channel is not None and channel.alive

    def runner(self) -> AgentChannel | DirectRunner:
        """The agent channel, opened if need be; docker exec while the agent cannot start."""
        with self._lock:
            if self.retired:
                raise SandboxNotReady(
                    f"sandbox {self.name} was released or removed", "acquire or start a new one"
                )
            if self._channel is not None and self._channel.alive:
                return self._channel
            container_id = self._locate()
            if self._channel is not None and self._channel.alive:  # `locate` started it
                return self._channel
            retry = time.monotonic() - self._agent_failed_at > AGENT_RETRY_S
            if self.use_agent and retry:
                try:
                    self._channel = self.open_channel(container_id)
                    return self._channel
                except SandboxError as exc:
                    self._agent_failed_at = time.monotonic()
                    self.notes.append(f"agent unavailable ({exc.message}); using docker exec")
            return DirectRunner(container_id, self.user)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """While the container is paused on purpose, the agent's silence is not death."""
        channel = self._channel
        with channel.frozen() if channel else contextlib.nullcontext():
            yield

    def close(self) -> None:
        """Drop the agent connection (the agent ends what it started); commands reopen it."""
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None

    def retire(self) -> None:
        """Refuse every later command (the sandbox was released or removed)."""
        with self._lock:
            self.retired = True
            self.close()

    # -- commands ----------------------------------------------------------------------------

    def exec(self, command: str | Sequence[str], **options: Unpack[ExecOptions]) -> ExecResult:
        """Run a command and return its result (never raises on its exit; see `Sandbox.exec`)."""
        return self.execute(Request.build(self.settings, command, options))

    def execute(self, request: Request) -> ExecResult:
        """Run a built request and record it in the audit trail."""
        return self.execute_raw(request)[1]

    def execute_raw(self, request: Request) -> tuple[RawResult, ExecResult]:
        """Run a built request, record it; the raw and the decoded result."""
        started = time.monotonic()
        runner = self.runner()
        try:
            raw = runner.run(request)
        except AgentLost as exc:
            self.close()
            # The reset kills the agent; each helper it left sees its parent die and ends
            # its command's tree (PR_SET_PDEATHSIG), which the next command can check.
            reason = f"{exc.message}; the agent was reset, which ends the command's processes"
            raw = RawResult.lost(reason, time.monotonic() - started, "agent")
        result = ExecResult.from_raw(raw, request.cid, request.session)
        self.audit.record(audit_entry(self.name, request, result))
        return raw, result

    def call(self, op: str, fields: dict[str, Any]) -> dict[str, Any]:
        """A request to the agent that is not a command (sessions, processes, cancel)."""
        runner = self.runner()
        if not isinstance(runner, AgentChannel):
            raise SandboxError(f"{op} needs the sandbox agent, which is unavailable here")
        try:
            return runner.call(op, fields)
        except AgentLost:
            self.close()
            raise

    def cancel(self, cid: str) -> None:
        """End command `cid` if it still runs (its helper kills the tree)."""
        with contextlib.suppress(SandboxError):
            self.call("cancel", {"cid": cid})

    def run_batch(self, argv: list[str], stdin: bytes, output_limit: int) -> RawResult:
        """One file-transfer round trip (`guest.file_batch` as the sandbox user)."""
        command = [policy.PYTHON, "-I", "-S", "-c", BATCH_SOURCE, *argv]
        options: ExecOptions = {"timeout": TRANSFER_TIMEOUT_S, "env": {"PATH": SYSTEM_PATH}}
        options["stdin"], options["output_limit"], options["cwd"] = stdin, output_limit, "/"
        request = Request.build(self.settings, command, options)
        shown = dataclasses.replace(request, shown=f"(file transfer: {argv[0]})")
        return self.execute_raw(shown)[0]
