"""Named shell sessions: the working directory, exported variables, an activated
virtualenv and shell functions carry over from one command to the next.

    shell = sandbox.session("build")
    shell.exec("cd src && python -m venv .venv && source .venv/bin/activate")
    shell.exec("pip --version")        # in src, with the venv active

No prompt scraping: every command is its own bash process whose end the sandbox's agent
sees from the process; the state is restored before it and saved when it exits, by root,
in the sandbox (see `shell_state`), so a second host process or a later
`inv run --session NAME` continues the same session. Heredocs, `set -e`, `exit N`, a
killed command and a timeout all leave the session usable, with its state as of the last
command that finished. A command that replaces the shell (`exec prog`) or installs its
own EXIT trap does not save state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Unpack

from .commands import ExecOptions, ExecResult, Request, check_session_name

if TYPE_CHECKING:
    from .connection import Connection


class Session:
    """A named shell session in one sandbox (see the module's docstring)."""

    def __init__(self, connection: Connection, name: str = "default") -> None:
        self.connection = connection
        self.name = check_session_name(name)

    def exec(self, command: str | Sequence[str], **options: Unpack[ExecOptions]) -> ExecResult:
        """`Sandbox.exec` in this session; `cwd` (if given) changes the session's folder."""
        return self.connection.execute(self.request(command, options))

    def request(self, command: str | Sequence[str], options: ExecOptions) -> Request:
        """The checked request for `command` in this session (as `exec` and the relay send
        it): a string or argv becomes the session's bash script."""
        return Request.build(self.connection.settings, command, options, session=self.name)

    def close(self) -> bool:
        """Forget the session's state; whether it had any."""
        reply = self.connection.call("session_close", {"session": self.name})
        return bool(reply.get("existed"))

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
