"""The command methods every sandbox offers, built on its `Connection`.

Mixed into `Sandbox` (the lifecycle), so that the methods an agent runner calls to run
commands, sessions, background processes and file transfers live with the client they
use, not with the code that creates and removes containers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self, Unpack

from .commands import ExecOptions, ExecResult, RawResult
from .connection import Connection
from .files import FileTransfers
from .processes import Process, find_process, process_listing, start_process
from .sessions import Session


class CommandMethods(FileTransfers):
    """The command methods of a sandbox, all built on its `connection` (mixed into
    `Sandbox`): exec, sessions, background processes and file transfers."""

    connection: Connection

    def connect(self) -> Self:
        """Open the agent connection now, so the first command does not pay for it."""
        self.connection.runner()
        return self

    @property
    def connected(self) -> bool:
        """Whether the agent connection is open and its heartbeat alive."""
        return self.connection.connected

    def exec(self, command: str | Sequence[str], **options: Unpack[ExecOptions]) -> ExecResult:
        """Run a command in the sandbox and return its result (never raises on its exit).

        Options: timeout (s), env, cwd (relative to /workspace), stdin, on_stdout /
        on_stderr callbacks (the head of each stream, live), output_limit (bytes kept per
        stream, head and tail), keep_background, merge_output (stderr into stdout, in the
        order written), idle_timeout. Everything the command started ends with it unless
        `keep_background` is set, e.g. for a server used by later commands.
        """
        return self.connection.exec(command, **options)

    def session(self, name: str = "default") -> Session:
        """A named shell session: cwd, exports and functions carry over (see `sessions`)."""
        return Session(self.connection, name)

    def start(self, command: str | Sequence[str], **options: Unpack[ExecOptions]) -> Process:
        """Start a command in the background; it runs until it ends, is killed, or the
        sandbox goes (see `processes`). Options: env, cwd, timeout (None: no limit) and
        output_limit."""
        return start_process(self.connection, command, options)

    def processes(self) -> list[dict[str, Any]]:
        """Every background process, running or recently ended, oldest first."""
        return process_listing(self.connection)

    def process(self, process_id: str) -> Process:
        """Reattach to a background process by id, from any host process."""
        return find_process(self.connection, process_id)

    def _run_batch(self, argv: list[str], stdin: bytes, output_limit: int) -> RawResult:
        return self.connection.run_batch(argv, stdin, output_limit)
