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

import dataclasses
import shlex
from collections.abc import Sequence
from typing import TYPE_CHECKING, Unpack

from ..errors import UsageError
from .channel import Request
from .commands import ExecOptions, ExecResult, make_request
from .guest import protocol

if TYPE_CHECKING:
    from .sandbox import Sandbox


def check_name(name: str) -> str:
    """A session name: 1-64 letters, digits, `.`, `_` or `-`."""
    if not isinstance(name, str) or not protocol.SESSION_NAME.match(name):
        raise UsageError(f"invalid session name {name!r}: use 1-64 letters, digits, . _ -")
    return name


class Session:
    """A named shell session in one sandbox (see the module's docstring)."""

    def __init__(self, sandbox: Sandbox, name: str = "default") -> None:
        self.sandbox = sandbox
        self.name = check_name(name)

    def exec(self, command: str | Sequence[str], **options: Unpack[ExecOptions]) -> ExecResult:
        """`Sandbox.exec` in this session; `cwd` (if given) changes the session's folder."""
        script, request = self.request(command, options)
        return self.sandbox._execute(script, request)[1]

    def request(self, command: str | Sequence[str], options: ExecOptions) -> tuple[str, Request]:
        """The checked request for `command` in this session, and its script (as `exec`
        and the relay send it)."""
        script = command if isinstance(command, str) else shlex.join(command)
        bad = [key for key in options.get("env") or {} if not protocol.ENV_NAME.match(key)]
        if bad:
            raise UsageError(f"a session's env names must be shell variable names: {bad[0]!r}")
        cwd = options.get("cwd")
        request = make_request(self.sandbox.settings, script, self.sandbox._cwd(cwd), options)
        return script, dataclasses.replace(
            request, session=self.name, cwd=request.cwd if cwd else ""
        )

    def close(self) -> bool:
        """Forget the session's state; whether it had any."""
        reply = self.sandbox.agent_call("session_close", {"session": self.name})
        return bool(reply.get("existed"))

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
