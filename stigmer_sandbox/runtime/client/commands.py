"""What a command is and what comes back, shared by every kind of sandbox.

One request type, `Request`, built and checked in one place (`Request.build`, and
`Request.background` for a background process) whoever asks: `Sandbox.exec`, a session,
a background process, the warm relay, the framework adapters, a file transfer. Commands
are strings run by bash inside the sandbox, or argument lists; nothing passes through a
host shell. Every result is recorded in the host-side audit trail (`audit_entry`).

Linux paths, arguments and environment values are bytes: text crosses to the sandbox as
UTF-8 with the lone surrogates `os.fsdecode` makes of undecodable bytes turned back into
those bytes (surrogateescape), so a name listed as "x\\udcff" is the file b"x\\xff".
Text no bytes can stand for (a surrogate outside that range) is refused as bad input.
"""

from __future__ import annotations

import base64
import codecs
import posixpath
import shlex
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict

from ... import config, policy
from ...errors import UsageError
from ..guest import protocol

OutputCallback = Callable[[bytes], None]
# A background process's output lives in its record in the sandbox's root-only tmpfs,
# rewritten as it grows: kept smaller than a command's.
MAX_BACKGROUND_OUTPUT = 4 * 1024 * 1024
BACKGROUND_OPTIONS = frozenset({"env", "cwd", "timeout", "output_limit"})


class ExecOptions(TypedDict, total=False):
    """The options every sandbox's `exec` takes, to pass them along as one."""

    timeout: float | None
    env: dict[str, str] | None
    cwd: str | None
    stdin: bytes | str | None
    on_stdout: OutputCallback | None
    on_stderr: OutputCallback | None
    output_limit: int | None
    keep_background: bool
    merge_output: bool
    idle_timeout: float | None


@dataclass(frozen=True)
class Request:
    """One checked command on its way to the sandbox (build it with `Request.build`)."""

    argv: list[str]
    env: dict[str, str]
    cwd: str  # "" in a session: the session's own folder
    timeout: float | None  # None only for a background process: no limit
    limit: int
    stdin: bytes | None = None
    keep_background: bool = False
    merge_output: bool = False
    idle_timeout: float | None = None
    session: str | None = None
    on_stdout: OutputCallback | None = None
    on_stderr: OutputCallback | None = None
    cid: str = ""
    # The command as the caller gave it, for the audit trail and process listings.
    shown: str | list[str] = ""

    @classmethod
    def build(
        cls,
        settings: config.Settings,
        command: str | Sequence[str],
        options: ExecOptions,
        *,
        home: str = policy.WORKSPACE,
        session: str | None = None,
    ) -> Request:
        """A checked request from `exec`'s arguments (relative `cwd` under `home`); in a
        `session`, a string or argv becomes that session's bash script. Bad input is one
        clear UsageError."""
        if session is not None:
            check_session_name(session)
            command = command if isinstance(command, str) else shlex.join(command)
            bad = [key for key in options.get("env") or {} if not protocol.ENV_NAME.match(key)]
            if bad:
                raise UsageError(f"a session's env names must be shell variable names: {bad[0]!r}")
        argv = command_argv(command)
        stdin = options.get("stdin")
        idle = options.get("idle_timeout")
        if idle is not None and not 0 < float(idle) <= config.MAX_TIMEOUT_S:
            raise UsageError(f"idle_timeout must be positive (at most a week), got {float(idle):g}")
        cwd = options.get("cwd")
        return cls(
            argv=argv,
            env=check_env(options.get("env")),
            cwd="" if session is not None and not cwd else working_folder(cwd, home),
            timeout=checked_timeout(options.get("timeout"), settings.timeout),
            limit=checked_limit(
                options.get("output_limit"), settings.output_limit, config.MAX_OUTPUT_LIMIT
            ),
            stdin=to_bytes(stdin, "stdin") if isinstance(stdin, str) else stdin,
            keep_background=bool(options.get("keep_background")),
            merge_output=bool(options.get("merge_output")),
            idle_timeout=float(idle) if idle is not None else None,
            session=session,
            on_stdout=options.get("on_stdout"),
            on_stderr=options.get("on_stderr"),
            cid=uuid.uuid4().hex[:12],
            shown=command if isinstance(command, str) else argv,
        )

    @classmethod
    def background(
        cls, settings: config.Settings, command: str | Sequence[str], options: ExecOptions
    ) -> Request:
        """A checked request for a background process: no timeout unless given, and its
        output kept within MAX_BACKGROUND_OUTPUT."""
        unknown = sorted(set(options) - BACKGROUND_OPTIONS)
        if unknown:
            raise UsageError(f"a background process takes no {unknown[0]!r} option")
        argv = command_argv(command)
        timeout = options.get("timeout")
        default_limit = min(settings.output_limit, MAX_BACKGROUND_OUTPUT)
        return cls(
            argv=argv,
            env=check_env(options.get("env")),
            cwd=working_folder(options.get("cwd"), policy.WORKSPACE),
            timeout=None if timeout is None else checked_timeout(timeout, timeout),
            limit=checked_limit(options.get("output_limit"), default_limit, MAX_BACKGROUND_OUTPUT),
            cid=uuid.uuid4().hex[:12],
            shown=command if isinstance(command, str) else " ".join(argv),
        )

    @property
    def timeout_s(self) -> float:
        """The command's timeout in seconds (every request `build` makes has one)."""
        if self.timeout is None:
            raise UsageError("a background process's request cannot run as a command")
        return self.timeout

    def callback(self, stream: str) -> OutputCallback | None:
        """Where the live bytes of `stream` ("stdout" or "stderr") go, if anywhere."""
        return self.on_stdout if stream == "stdout" else self.on_stderr

    def exec_message(self, rid: int) -> dict[str, Any]:
        """The agent's `exec` request for this command (see `guest.agent`)."""
        stdin = base64.b64encode(self.stdin).decode() if self.stdin is not None else None
        return {
            "op": "exec",
            "id": rid,
            "cid": self.cid,
            "argv": self.argv,
            "env": self.env,
            "cwd": self.cwd,
            "timeout": self.timeout,
            "limit": self.limit,
            "stdin": stdin,
            "keep_background": self.keep_background,
            "merge_output": self.merge_output,
            "idle_timeout": self.idle_timeout,
            "session": self.session,
        }

    def process_fields(self) -> dict[str, Any]:
        """The agent's `proc_start` fields for this background command (see `guest.keeper`)."""
        return {
            "argv": self.argv,
            "command": self.shown,
            "env": self.env,
            "cwd": self.cwd,
            "limit": self.limit,
            "timeout": self.timeout,
        }


def check_session_name(name: str) -> str:
    """A session name: 1-64 letters, digits, `.`, `_` or `-`."""
    if not isinstance(name, str) or not protocol.SESSION_NAME.match(name):
        raise UsageError(f"invalid session name {name!r}: use 1-64 letters, digits, . _ -")
    return name


def checked_timeout(value: float | None, default: float) -> float:
    """A command's timeout in seconds: positive, at most config.MAX_TIMEOUT_S."""
    timeout = float(value if value is not None else default)
    if not 0 < timeout <= config.MAX_TIMEOUT_S:
        raise UsageError(
            f"timeout must be between 0 and {config.MAX_TIMEOUT_S:g} seconds, got {timeout:g}"
        )
    return timeout


def checked_limit(value: int | None, default: int, maximum: int) -> int:
    """Bytes of output kept per stream: at least 2 (a head and a tail), at most `maximum`."""
    limit = int(value or default)
    if not 2 <= limit <= maximum:
        raise UsageError(f"output_limit must be between 2 and {maximum} bytes, got {limit}")
    return limit


def working_folder(cwd: str | None, home: str) -> str:
    """Where a command starts: `home` by default, a relative `cwd` under it."""
    folder = cwd if not cwd or cwd.startswith("/") else posixpath.join(home, cwd)
    return checked_text(folder or home, "cwd")


@dataclass
class RawResult:
    """What came back: bytes per stream (head + marker + tail) and how it ended.
    `exit_code` is None when the result was lost with the agent."""

    exit_code: int | None
    signal: int | None
    timed_out: bool
    oom_killed: bool
    duration_s: float
    stdout: bytes
    stderr: bytes
    totals: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, bool] = field(default_factory=dict)
    via: str = "agent"
    error: str | None = None
    oom_overlap: list[str] = field(default_factory=list)
    idle_timed_out: bool = False

    @classmethod
    def lost(cls, reason: str, duration_s: float, via: str) -> RawResult:
        """The result of a command whose answer never came: no exit code, the reason."""
        return cls(None, None, False, False, duration_s, b"", b"", via=via, error=reason)

    @classmethod
    def start_failure(cls, request: Request, message: str, via: str) -> RawResult:
        """The result of a command that could not be started (as bash reports it: 126)."""
        text = f"stigmer-sandbox: the command could not start: {message}\n".encode()
        callback = request.callback("stderr")
        if callback:
            callback(text)
        return cls(126, None, False, False, 0.0, b"", text, via=via, error=message)


@dataclass(frozen=True)
class ExecResult:
    """A command's faithful result. `exit_code` is None when the result was lost (the
    agent died or stopped answering); `error` then says what happened."""

    exit_code: int | None
    stdout: str
    stderr: str
    duration_s: float
    timed_out: bool = False
    oom_killed: bool = False
    signal: int | None = None
    truncated: dict[str, bool] = field(default_factory=dict)
    output_bytes: dict[str, int] = field(default_factory=dict)
    via: str = "agent"
    error: str | None = None
    command_id: str = ""
    # Other commands that ran at the same time as an OOM kill this one saw.
    oom_overlap: tuple[str, ...] = ()
    # Ended because it printed nothing for `idle_timeout` seconds (exit code 124).
    idle_timed_out: bool = False
    session: str | None = None

    @property
    def cause(self) -> str:
        """Why it ended: `exit`, `timeout`, `idle`, `oom`, `signal` or `lost`."""
        return protocol.exit_cause(
            self.exit_code, self.signal, self.timed_out, self.oom_killed, self.idle_timed_out
        )

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.cause == "exit"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with `cause`."""
        return {**asdict(self), "cause": self.cause}

    @classmethod
    def from_raw(cls, raw: RawResult, command_id: str, session: str | None = None) -> ExecResult:
        return cls(
            exit_code=raw.exit_code,
            stdout=readable_output(raw.stdout),
            stderr=readable_output(raw.stderr),
            duration_s=raw.duration_s,
            timed_out=raw.timed_out,
            oom_killed=raw.oom_killed,
            signal=raw.signal,
            truncated=raw.truncated,
            output_bytes=raw.totals,
            via=raw.via,
            error=raw.error,
            command_id=command_id,
            oom_overlap=tuple(raw.oom_overlap),
            idle_timed_out=raw.idle_timed_out,
            session=session,
        )


# Output is decoded this much at a time: one call on 64 MiB holds the GIL for ~50 ms, and
# four such results finishing together kept a concurrent small command waiting behind them.
DECODE_PIECE = 1 << 20


def readable_output(data: bytes) -> str:
    """A stream's bytes as text (invalid UTF-8 as U+FFFD), decoded piece by piece."""
    if len(data) <= DECODE_PIECE:
        return data.decode(errors="replace")
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    view = memoryview(data)
    pieces = [
        decoder.decode(view[at : at + DECODE_PIECE]) for at in range(0, len(data), DECODE_PIECE)
    ]
    pieces.append(decoder.decode(b"", final=True))
    return "".join(pieces)


def to_bytes(text: str, what: str = "text") -> bytes:
    """Text as the bytes Linux sees: UTF-8, with `os.fsdecode`'s lone surrogates back to
    the bytes they stand for; a UsageError naming `what` for one that stands for none."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        shown = repr(text)[:80]
        raise UsageError(f"{what} holds a surrogate that stands for no byte: {shown}") from None


def from_bytes(data: bytes) -> str:
    """Bytes from Linux as text that `to_bytes` turns back into the same bytes."""
    return data.decode("utf-8", "surrogateescape")


def checked_text(text: str, what: str) -> str:
    """`text` if it can reach the sandbox intact (no NUL, bytes for every character)."""
    if "\0" in text:
        raise UsageError(f"{what} cannot contain NUL bytes")
    to_bytes(text, what)
    return text


def command_argv(command: str | Sequence[str]) -> list[str]:
    """A command as an argument list: strings run through bash inside the sandbox."""
    if isinstance(command, str):
        if not command.strip():
            raise UsageError("empty command")
        argv = ["/bin/bash", "-c", command]
    else:
        argv = [str(part) for part in command]
        if not argv or not argv[0]:
            raise UsageError("empty command")
    return [checked_text(part, "a command") for part in argv]


def check_env(env: dict[str, str] | None) -> dict[str, str]:
    """Environment for a command: names without `=`/NUL, values without NUL."""
    checked = {}
    for key, value in (env or {}).items():
        if not key or "=" in key or "\0" in key or "\0" in str(value):
            raise UsageError(f"invalid environment variable {key!r}")
        name = checked_text(str(key), "an environment variable's name")
        checked[name] = checked_text(str(value), f"environment variable {key!r}")
    return checked


def audit_entry(sandbox: str, request: Request, result: ExecResult) -> dict[str, Any]:
    """What the audit trail keeps of one command."""
    return {
        "sandbox": sandbox,
        "id": result.command_id,
        "command": request.shown,
        "cwd": request.cwd,
        "exit_code": result.exit_code,
        "cause": result.cause,
        "duration_s": round(result.duration_s, 4),
        # When it ended (seconds since the epoch): the egress audit names the command by it.
        "ended_at": round(time.time(), 3),
        "timed_out": result.timed_out,
        "oom_killed": result.oom_killed,
        "session": result.session,
        "oom_overlap": list(result.oom_overlap),
        "output_bytes": result.output_bytes,
        "error": result.error,
        "via": result.via,
    }
