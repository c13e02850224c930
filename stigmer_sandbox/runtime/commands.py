"""What a command is and what comes back, shared by every kind of sandbox.

Commands are strings run by bash inside the sandbox, or argument lists; nothing passes
through a host shell. Every result is recorded in the host-side audit trail.

Linux paths, arguments and environment values are bytes: text crosses to the sandbox as
UTF-8 with the lone surrogates `os.fsdecode` makes of undecodable bytes turned back into
those bytes (surrogateescape), so a name listed as "x\\udcff" is the file b"x\\xff".
Text no bytes can stand for (a surrogate outside that range) is refused as bad input.
"""

from __future__ import annotations

import codecs
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict

from .. import config
from ..errors import UsageError
from .channel import OutputCallback, RawResult, Request
from .guest import protocol


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


def lost(request: Request, reason: str, duration_s: float, via: str) -> RawResult:
    """The result of a command whose agent was lost: no exit code, the reason."""
    return RawResult(None, None, False, False, duration_s, b"", b"", via=via, error=reason)


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


def make_request(
    settings: config.Settings, command: str | Sequence[str], cwd: str, options: ExecOptions
) -> Request:
    """A checked request from `exec`'s arguments; bad input is one clear UsageError."""
    timeout = options.get("timeout")
    timeout = float(timeout if timeout is not None else settings.timeout)
    if not 0 < timeout <= config.MAX_TIMEOUT_S:
        raise UsageError(
            f"timeout must be between 0 and {config.MAX_TIMEOUT_S:g} seconds, got {timeout:g}"
        )
    limit = int(options.get("output_limit") or settings.output_limit)
    if not 2 <= limit <= config.MAX_OUTPUT_LIMIT:
        raise UsageError(
            f"output_limit must be between 2 and {config.MAX_OUTPUT_LIMIT} bytes, got {limit}"
        )
    stdin = options.get("stdin")
    idle = options.get("idle_timeout")
    if idle is not None and not 0 < float(idle) <= config.MAX_TIMEOUT_S:
        raise UsageError(f"idle_timeout must be positive (at most a week), got {float(idle):g}")
    return Request(
        argv=command_argv(command),
        env=check_env(options.get("env")),
        cwd=checked_text(cwd, "cwd"),
        timeout=timeout,
        limit=limit,
        stdin=to_bytes(stdin, "stdin") if isinstance(stdin, str) else stdin,
        keep_background=bool(options.get("keep_background")),
        merge_output=bool(options.get("merge_output")),
        idle_timeout=float(idle) if idle is not None else None,
        on_stdout=options.get("on_stdout"),
        on_stderr=options.get("on_stderr"),
        cid=uuid.uuid4().hex[:12],
    )


def audit_entry(
    sandbox: str, command: str | Sequence[str], request: Request, result: ExecResult
) -> dict[str, Any]:
    """What the audit trail keeps of one command."""
    return {
        "sandbox": sandbox,
        "id": result.command_id,
        "command": command if isinstance(command, str) else request.argv,
        "cwd": request.cwd,
        "exit_code": result.exit_code,
        "cause": result.cause,
        "duration_s": round(result.duration_s, 4),
        "timed_out": result.timed_out,
        "oom_killed": result.oom_killed,
        "session": result.session,
        "oom_overlap": list(result.oom_overlap),
        "output_bytes": result.output_bytes,
        "error": result.error,
        "via": result.via,
    }
