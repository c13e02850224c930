"""A deepagents sandbox backend: LangChain deep agents run their tools in a local sandbox.

    from deepagents import create_deep_agent
    from stigmer_sandbox.integrations.deepagents import StigmerSandbox

    with StigmerSandbox() as backend:             # an ephemeral, hardened sandbox
        agent = create_deep_agent(model=..., backend=backend)

`StigmerSandbox()` starts a sandbox of its own (removed by `close()` or at the end of the
`with` block) in the mode `execution_mode` / `STIGMER_EXECUTION_MODE` selects (sandbox,
local, or auto); `StigmerSandbox(sandbox)` wraps a `Sandbox` the caller owns and leaves
it running. Needs the `deepagents` extra: `pip install 'stigmer-sandbox[deepagents]'`.

Commands travel over the sandbox's agent channel (over 10x faster than a `docker exec`
per command, see BENCHMARKS.md), stdout and stderr merged in the order they were written.
File transfers are batched: one round trip per batch, as the sandbox user.
"""

from __future__ import annotations

import logging
from typing import Any

from deepagents.backends.protocol import (
    ExecuteResponse,
    FileDownloadResponse,
    FileUploadResponse,
)
from deepagents.backends.sandbox import BaseSandbox

from ..config import Settings
from ..errors import SandboxError
from ..runtime import ExecResult, LocalSandbox, Sandbox, open_sandbox

logger = logging.getLogger(__name__)

TIMEOUT_EXIT = 124


def timeout_message(seconds: float, custom: bool) -> str:
    """deepagents' own wording (its LocalShellBackend), so agents read timeouts alike."""
    shown = f"{seconds:g}"
    if custom:
        return (
            f"Error: Command timed out after {shown} seconds (custom timeout). "
            "The command may be stuck or require more time."
        )
    return (
        f"Error: Command timed out after {shown} seconds. "
        "For long-running commands, re-run using the timeout parameter."
    )


def to_response(result: ExecResult, timeout: float, custom: bool) -> ExecuteResponse:
    """An `ExecResult` as deepagents reads it: one output, the exit code, `truncated`."""
    output = result.stdout + result.stderr  # stderr is empty when the streams were merged
    truncated = any(result.truncated.values())
    notice = None
    exit_code = result.exit_code
    if result.timed_out:
        exit_code, notice = TIMEOUT_EXIT, timeout_message(timeout, custom)
    elif result.oom_killed:
        notice = "Error: the command was killed because the sandbox ran out of memory."
    elif result.exit_code is None:
        notice = f"Error: the command's result was lost: {result.error}"
    if notice:
        output = f"{output.rstrip()}\n\n{notice}" if output.strip() else notice
    return ExecuteResponse(output=output, exit_code=exit_code, truncated=truncated)


class StigmerSandbox(BaseSandbox):
    """deepagents' `BaseSandbox` over a stigmer-sandbox `Sandbox` (or `LocalSandbox`)."""

    # Off: deepagents' capture wrapper writes to /large_tool_results/, a folder at the root
    # that the sandbox user cannot create; the middleware then evicts large output itself.
    enable_capture_offload = False

    def __init__(
        self,
        sandbox: Sandbox | LocalSandbox | None = None,
        *,
        settings: Settings | None = None,
        **sandbox_options: Any,
    ) -> None:
        self._owned = sandbox is None
        if sandbox is None:
            sandbox = open_sandbox(settings, ephemeral=True, **sandbox_options)
            sandbox.up()  # its notes: the mode `auto` chose and why, MCP bootstrap timings
            for note in sandbox.notes:
                level = logging.WARNING if isinstance(sandbox, LocalSandbox) else logging.INFO
                logger.log(level, note)
        self.sandbox = sandbox

    @property
    def id(self) -> str:
        """The sandbox's container name (`local` in local mode)."""
        return self.sandbox.name

    def execute(self, command: str, *, timeout: int | None = None) -> ExecuteResponse:
        """Run a shell command; stdout and stderr combined. Never raises: a failure to run
        is an `Error: ...` output with exit code 1."""
        custom = bool(timeout)
        seconds = float(timeout) if timeout else self.sandbox.settings.timeout
        try:
            result = self.sandbox.exec(command, timeout=seconds, merge_output=True)
        except SandboxError as exc:
            return ExecuteResponse(output=f"Error: {exc}", exit_code=1)
        except Exception as exc:  # the protocol's contract: the agent reads it, never a crash
            logger.exception("execute failed")
            return ExecuteResponse(output=f"Error: {type(exc).__name__}: {exc}", exit_code=1)
        return to_response(result, seconds, custom)

    def upload_files(self, files: list[tuple[str, bytes]]) -> list[FileUploadResponse]:
        """Write files by absolute path as the sandbox user; one round trip per batch."""
        try:
            done = self.sandbox.upload_files(files)
        except SandboxError as exc:  # the sandbox is gone or broken: every file says why
            return [FileUploadResponse(path=path, error=f"error: {exc}") for path, _ in files]
        return [FileUploadResponse(path=item.path, error=item.error) for item in done]

    def download_files(self, paths: list[str]) -> list[FileDownloadResponse]:
        """Read files by absolute path as the sandbox user; one round trip per batch."""
        try:
            done = self.sandbox.download_files(paths)
        except SandboxError as exc:
            return [FileDownloadResponse(path=path, error=f"error: {exc}") for path in paths]
        return [
            FileDownloadResponse(path=item.path, content=item.content, error=item.error)
            for item in done
        ]

    def close(self) -> None:
        """Remove the sandbox if this backend started it; otherwise just disconnect."""
        if self._owned and isinstance(self.sandbox, Sandbox):
            self.sandbox.remove()
        else:
            self.sandbox.close()

    def __enter__(self) -> StigmerSandbox:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
