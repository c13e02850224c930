"""The tools' answers: `Reply` (text and structured content, or an error result) and
the shaping of a command's result or a background process's state into one."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mcp import types

from ...runtime import ExecResult
from ...runtime.guest import protocol
from .. import adapter
from .schemas import one_line


@dataclass(frozen=True)
class Reply:
    """A tool's answer: the text a model reads and the same facts as structured content."""

    text: str
    data: dict[str, Any] = field(default_factory=dict)
    error: bool = False

    def result(self) -> types.CallToolResult:
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=self.text)],
            structuredContent=self.data or None,
            isError=self.error,
        )


def json_reply(data: dict[str, Any]) -> Reply:
    """A reply whose text is its structured content as JSON."""
    return Reply(json.dumps(data, indent=1, ensure_ascii=False, default=str), data)


def failure_reply(tool: str, message: str) -> Reply:
    """The error result of a call that could not do what was asked (one line)."""
    text = one_line(message if message.startswith(f"{tool}: ") else f"{tool}: {message}")
    return Reply(text, {"error": text}, error=True)


def ending(result: ExecResult, seconds: float | None = None) -> str | None:
    """What a reader must be told about how a command ended, beyond its exit code."""
    if result.timed_out:
        limit = f" after {seconds:g} s" if seconds else ""
        return f"the command timed out{limit}; it and everything it started were killed"
    if result.idle_timed_out:
        return "the command printed nothing for too long (idle timeout) and was ended"
    notice = adapter.ended_notice(result)  # an OOM kill or a lost result
    if notice:
        return notice.removeprefix("Error: ")
    if result.signal:
        return f"the command was ended by signal {result.signal}"
    return None


def truncation_notes(truncated: dict[str, bool], output_bytes: dict[str, int]) -> list[str]:
    """A line per stream that lost bytes to the output limit (head and tail are kept)."""
    return [
        f"{stream}: {output_bytes.get(stream, 0)} bytes printed; only the head and the tail "
        "are kept, the middle was dropped"
        for stream in ("stdout", "stderr")
        if truncated.get(stream)
    ]


def result_fields(result: ExecResult, seconds: float | None = None) -> dict[str, Any]:
    """A command's result as structured content."""
    return {
        "exit_code": result.exit_code,
        "cause": result.cause,
        "signal": result.signal,
        "stdout": result.stdout,
        "stderr": result.stderr + (adapter.start_failure_text(result) or ""),
        "truncated": {name: bool(result.truncated.get(name)) for name in ("stdout", "stderr")},
        "output_bytes": dict(result.output_bytes),
        "duration_s": round(result.duration_s, 3),
        "notice": ending(result, seconds),
    }


def result_text(fields: dict[str, Any]) -> str:
    """A command's result as a model reads it: stdout, stderr, then how it ended."""
    parts = [fields["stdout"].rstrip("\n")] if fields["stdout"] else []
    if fields["stderr"]:
        parts.append("[stderr]\n" + fields["stderr"].rstrip("\n"))
    code = "none" if fields["exit_code"] is None else fields["exit_code"]
    status = f"[exit code {code}, cause {fields['cause']}]"
    notes = [fields["notice"]] if fields.get("notice") else []
    notes += truncation_notes(fields["truncated"], fields["output_bytes"])
    return "\n".join([*parts, status, *(f"[{note}]" for note in notes)])


def command_reply(sandbox: str, result: ExecResult, seconds: float | None = None) -> Reply:
    """A finished command's reply; a lost result (no exit code) is an error result."""
    fields = {"sandbox": sandbox, **result_fields(result, seconds)}
    return Reply(result_text(fields), fields, error=result.exit_code is None)


def process_state(state: dict[str, Any]) -> str:
    """running, killed, or the cause a finished background process ended with."""
    if state.get("running"):
        return "running"
    if state.get("killed"):
        return "killed"
    signal_number = state.get("signal")
    return protocol.exit_cause(
        state.get("exit_code"),
        signal_number if isinstance(signal_number, int) else None,
        bool(state.get("timed_out")),
        state.get("oom_killed") is True,
    )


PROCESS_KEYS = ("id", "command", "running", "exit_code", "started_at", "stdout_bytes")


def process_summary(info: dict[str, Any]) -> dict[str, Any]:
    """A background process as `process_list` shows it."""
    summary = {key: info.get(key) for key in PROCESS_KEYS}
    summary["stderr_bytes"] = info.get("stderr_bytes")
    summary["state"] = process_state(info)
    return summary
