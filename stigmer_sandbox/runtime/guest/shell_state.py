"""In-container session state: what carries a shell session from one command to the next.

Sent to the sandbox with `agent.py` (this file first; standard library only, no imports
from the package). Each session command is a fresh bash as the sandbox user that first
sources a prelude from a read-only pipe (the saved variables, functions and folder, then
this command's own environment and the save trap) and, when it exits however it exits,
writes its state back through a second pipe. Root keeps the state in the root-only
`/run/stigmer/sessions/`, so any agent (any host process) continues the session.

Everything in a saved state was written by the session's own commands: it is checked
(size, shape, no NUL) and only ever run again as the sandbox user, in that session.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

with contextlib.suppress(ImportError):  # in the sandbox: protocol.py's source runs first
    from .protocol import ENV_NAME, SESSION_NAME

Message = dict[str, Any]

SESSION_DIR = "/run/stigmer/sessions"
STATE_LIMIT = 1 << 20
STATE_BEGIN = b"\0STIGMER-STATE-BEGIN\0"
STATE_END = b"\0STIGMER-STATE-END"
WORKSPACE = "/workspace"
# Bash's own variables: read-only, or meaningless (or harmful: LINENO, RANDOM) to restore.
BASH_OWN = frozenset(
    {
        "EUID",
        "UID",
        "PPID",
        "SHELLOPTS",
        "SHLVL",
        "_",
        "PWD",
        "FUNCNAME",
        "GROUPS",
        "PIPESTATUS",
        "LINENO",
        "RANDOM",
        "SRANDOM",
        "SECONDS",
        "EPOCHREALTIME",
        "EPOCHSECONDS",
        "HISTCMD",
        "OPTIND",
        "OPTERR",
    }
)
BASH_OWN_PREFIXES = ("BASH", "COMP_", "__stigmer_")
# `declare -p` prints one declaration per line (bash 5.2 writes newlines in values as
# $'\n'): a line that is not one of these is not state.
DECLARATION = re.compile(r"declare -[-aAfFgiIlnrtux]+ ([A-Za-z_][A-Za-z0-9_]*)(?:=|\Z)")
# Builtins only, no fork (~0.3 ms): the folder, every variable with its attributes, every
# function, framed so that whatever a command wrote to the pipe before is never taken for
# the state.
SAVE_STATE = """__stigmer_save() {
  { builtin printf '\\0STIGMER-STATE-BEGIN\\0%s\\0' "$PWD"
    builtin declare -p; builtin printf '\\0'; builtin declare -f
    builtin printf '\\0STIGMER-STATE-END'; } >&@FD@ 2>/dev/null
}
builtin trap __stigmer_save EXIT
"""


def shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def parse_state(raw: bytes) -> Message | None:
    """The last complete state record in what a session command wrote, or None. The
    command can write anything to that pipe: only a well-formed record counts, and of its
    variables only well-formed declarations of the session's own."""
    if len(raw) > STATE_LIMIT or not raw.endswith(STATE_END):
        return None
    start = raw.rfind(STATE_BEGIN)
    if start < 0:
        return None
    parts = raw[start + len(STATE_BEGIN) : -len(STATE_END)].split(b"\0")
    if len(parts) != 3 or not parts[0].startswith(b"/"):
        return None
    cwd, variables, functions = (part.decode(errors="surrogateescape") for part in parts)
    return {"cwd": cwd, "variables": own_declarations(variables), "functions": functions}


def own_declarations(text: str) -> str:
    """The `declare -p` lines of variables the session set (not bash's own)."""
    kept = []
    for line in text.splitlines():
        match = DECLARATION.match(line)
        name = match.group(1) if match else ""
        if name and name not in BASH_OWN and not name.startswith(BASH_OWN_PREFIXES):
            kept.append(line)
    return "\n".join(kept)


def prelude(state: Message | None, request: Message, fd: int) -> str:
    """What a session command sources before the caller's script: the folder, the saved
    variables and functions, this command's env, then the save trap writing to `fd`."""
    asked = request.get("cwd")
    if asked:  # a folder the caller asked for: nothing runs anywhere else
        quoted = shell_quote(str(asked))
        lines = [f"builtin cd -- {quoted} || builtin exit 126"]
    else:  # the session's own folder: if it is gone, say so and go on in the workspace
        quoted = shell_quote(str((state or {}).get("cwd") or WORKSPACE))
        lines = [
            f"builtin cd -- {quoted} 2>/dev/null || {{ builtin printf 'stigmer-sandbox: the "
            f"session folder %s is gone; continuing in {WORKSPACE}\\n' {quoted} >&2; "
            f"builtin cd {WORKSPACE}; }}"
        ]
    if state:
        lines += [str(state.get("variables") or ""), str(state.get("functions") or "")]
    for key, value in (request.get("env") or {}).items():
        if not ENV_NAME.match(str(key)):
            raise ValueError(f"invalid variable name for a session: {str(key)[:60]!r}")
        lines.append(f"builtin export {key}={shell_quote(str(value))}")
    lines.append(SAVE_STATE.replace("@FD@", str(fd)))
    return "\n".join(lines) + "\n"


class SessionState:
    """A named session's saved state and its lock (one command at a time per session)."""

    def __init__(
        self, name: str, timeout: float, cancelled: Callable[[], bool] = lambda: False
    ) -> None:
        if not SESSION_NAME.match(name):
            raise ValueError(f"invalid session name {name!r}")
        self.name, self.timeout, self.cancelled = name, timeout, cancelled
        self.path = os.path.join(SESSION_DIR, name + ".json")
        self.lock_fd = -1

    def __enter__(self) -> SessionState:
        os.makedirs(SESSION_DIR, mode=0o700, exist_ok=True)
        self.lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if self.cancelled():
                    os.close(self.lock_fd)
                    raise RuntimeError("cancelled while waiting for its session") from None
                if time.monotonic() >= deadline:
                    os.close(self.lock_fd)
                    raise TimeoutError(f"session {self.name} stayed busy") from None
                time.sleep(0.005)

    def __exit__(self, *_exc: object) -> None:
        os.close(self.lock_fd)  # releases the lock

    def load(self) -> Message | None:
        try:
            with open(self.path, encoding="utf-8", errors="surrogateescape") as handle:
                state = json.load(handle)
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) else None

    def command(
        self, request: Message, base_env: dict[str, str], state_fd: int, prelude_fd: int
    ) -> tuple[list[str], dict[str, str], str]:
        """bash -c: source the prelude (all on the script's first line, so the caller's
        script keeps its line numbers), then the caller's script; its environment (the
        base one for a new session; a saved state restores its own); and the prelude."""
        argv = list(request["argv"])
        if len(argv) < 3 or argv[:2] != ["/bin/bash", "-c"]:
            raise ValueError("a session runs shell command strings")
        state = self.load()
        text = prelude(state, request, state_fd)
        script = f"builtin source /dev/fd/{prelude_fd}; exec {prelude_fd}<&-; {argv[2]}"
        return ["/bin/bash", "-c", script, *argv[3:]], {} if state else dict(base_env), text

    def save(self, raw: bytes | None) -> None:
        """Keep the state the command wrote, if it wrote one; a state that cannot be kept
        (a full tmpfs) leaves the previous one, never changing the command's result."""
        state = parse_state(raw) if raw else None
        if state is None:
            return
        temporary = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(temporary, "w", encoding="utf-8", errors="surrogateescape") as handle:
                json.dump(state, handle)
            os.replace(temporary, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary)

    @staticmethod
    def close(name: str) -> bool:
        """Forget a session's state; whether there was one."""
        if not SESSION_NAME.match(name):
            raise ValueError(f"invalid session name {name!r}")
        path = os.path.join(SESSION_DIR, name + ".json")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + ".lock")
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True
