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

Linux names are bytes: a path holding lone surrogates (what `os.fsdecode` makes of
undecodable bytes, "x\\udcff" for b"x\\xff") works in every protocol method, both ways.
deepagents builds its helper commands (ls, read, write, edit, glob, grep) with
`.encode("utf-8")` on the host and `.decode('utf-8')` in the sandbox, which refuse them:
the methods here run deepagents' own code with their text arguments as `LinuxText` and,
inside `helper_scope`, those helpers' base64 arguments decoded with surrogateescape and
their output read the same way. What still cannot work is an error result the protocol
defines, never an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from deepagents.backends import protocol
from deepagents.backends.protocol import (
    ExecuteResponse,
    FileDownloadResponse,
    FileUploadResponse,
)
from deepagents.backends.sandbox import BaseSandbox

from ..config import Settings
from ..errors import SandboxError
from ..runtime import ExecResult, LocalSandbox, Sandbox, open_sandbox
from ..runtime.client.commands import from_bytes
from ..runtime.client.files import checked_upload, listed, shown_path
from . import adapter
from .adapter import TIMEOUT_EXIT

if TYPE_CHECKING:  # deepagents 0.7's results; Graphton's deepagents 0.4 lacks most of them
    from deepagents.backends.protocol import (
        DeleteResult,
        EditResult,
        GlobResult,
        GrepResult,
        LsResult,
        ReadResult,
        WriteResult,
    )

logger = logging.getLogger(__name__)


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


class LinuxText(str):
    """Text whose `.encode()` turns lone surrogates back into the bytes they stand for
    (deepagents' command builders call `.encode("utf-8")`, which refuses them). A
    surrogate that stands for no byte still raises UnicodeEncodeError."""

    def encode(self, encoding: str = "utf-8", errors: str = "surrogateescape") -> bytes:
        return str.encode(self, encoding, "surrogateescape")


def linux_text(value: str | None) -> str | None:
    """`LinuxText` of an optional argument."""
    return None if value is None else LinuxText(value)


# deepagents' helper scripts read each argument as base64.b64decode('...').decode('utf-8').
HELPER_ARGUMENT = re.compile(r"(base64\.b64decode\('[A-Za-z0-9+/=]*'\))\.decode\('utf-8'\)")
NOT_TEXT = "holds a surrogate that stands for no byte"
R = TypeVar("R")
IN_HELPER: contextvars.ContextVar[bool] = contextvars.ContextVar("in_helper", default=False)


def readable(text: str) -> str:
    """Text read with surrogateescape as a person (or a model's JSON encoder, which
    refuses lone surrogates) reads it: an undecodable byte shows as U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def escaping_arguments(command: str) -> str:
    """A deepagents helper command whose base64 arguments decode with surrogateescape."""
    return HELPER_ARGUMENT.sub(r"\1.decode('utf-8', 'surrogateescape')", command)


@contextlib.contextmanager
def helper_scope() -> Iterator[None]:
    """Commands `execute` runs meanwhile (in this thread or task, and threads it starts
    with asyncio.to_thread) are deepagents' own helpers, never the agent's."""
    token = IN_HELPER.set(True)
    try:
        yield
    finally:
        IN_HELPER.reset(token)


def to_response(
    result: ExecResult, timeout: float, custom: bool, output: str | None = None
) -> ExecuteResponse:
    """An `ExecResult` as deepagents reads it: one output (`output` if given, else
    stdout then stderr), the exit code, `truncated`."""
    if output is None:
        output = result.stdout + result.stderr  # stderr is empty when streams were merged
    exit_code = result.exit_code
    notice: str | None
    if result.timed_out:
        exit_code, notice = TIMEOUT_EXIT, timeout_message(timeout, custom)
    else:
        notice = adapter.ended_notice(result)
    return ExecuteResponse(
        output=adapter.with_notice(output, notice),
        exit_code=exit_code,
        truncated=adapter.truncated(result),
    )


def _entries(items: object) -> list[object]:
    """A batch's entries, or none when it is no list of them (the error says so)."""
    try:
        return listed(items, "the batch")
    except SandboxError:
        return []


def _failure(exc: Exception) -> str:
    """A whole batch's failure as each file's error (a bug is logged, never raised)."""
    if isinstance(exc, SandboxError):
        return f"error: {exc}"
    logger.exception("file transfer failed")
    return f"error: {type(exc).__name__}: {exc}"


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
        is an `Error: ...` output with exit code 1. (A deepagents helper's command and
        output keep undecodable bytes as surrogates; see the module docstring.)"""
        seconds, custom = adapter.command_timeout(timeout, self.sandbox.settings)
        helper = IN_HELPER.get()
        output = bytearray()
        try:
            result = self.sandbox.exec(
                escaping_arguments(command) if helper else command,
                timeout=seconds,
                merge_output=True,
                on_stdout=output.extend if helper else None,
            )
        except SandboxError as exc:
            return ExecuteResponse(output=f"Error: {exc}", exit_code=1)
        except Exception as exc:  # the protocol's contract: the agent reads it, never a crash
            logger.exception("execute failed")
            return ExecuteResponse(output=f"Error: {type(exc).__name__}: {exc}", exit_code=1)
        return to_response(result, seconds, custom, from_bytes(bytes(output)) if helper else None)

    # deepagents' own file tools, keeping undecodable names (see the module docstring)

    def _helper(self, method: Callable[..., R], error: R, *args: Any, **kwargs: Any) -> R:
        try:
            for text in (*args, *kwargs.values()):  # checked before anything runs
                if isinstance(text, LinuxText):
                    text.encode()
            with helper_scope():
                return method(*args, **kwargs)
        except UnicodeEncodeError:  # a surrogate that stands for no byte names nothing
            return error

    def ls(self, path: str) -> LsResult:
        return self._helper(
            super().ls, protocol.LsResult(error=f"Path '{path}': {NOT_TEXT}"), LinuxText(path)
        )

    async def als(self, path: str) -> LsResult:
        return await asyncio.to_thread(self.ls, path)

    def read(self, file_path: str, offset: int = 0, limit: int = 2000) -> ReadResult:
        error = protocol.ReadResult(error=f"File '{file_path}': {NOT_TEXT}")
        return self._helper(super().read, error, LinuxText(file_path), offset, limit)

    async def aread(self, file_path: str, offset: int = 0, limit: int = 2000) -> ReadResult:
        return await asyncio.to_thread(self.read, file_path, offset, limit)

    def write(self, file_path: str, content: str) -> WriteResult:
        error = protocol.WriteResult(error=f"Failed to write file '{file_path}': {NOT_TEXT}")
        return self._helper(super().write, error, LinuxText(file_path), LinuxText(content))

    async def awrite(self, file_path: str, content: str) -> WriteResult:
        return await asyncio.to_thread(self.write, file_path, content)

    def edit(
        self, file_path: str, old_string: str, new_string: str, replace_all: bool = False
    ) -> EditResult:
        error = protocol.EditResult(error=f"Error editing file '{file_path}': {NOT_TEXT}")
        texts = [LinuxText(text) for text in (file_path, old_string, new_string)]
        return self._helper(super().edit, error, *texts, replace_all=replace_all)

    async def aedit(
        self, file_path: str, old_string: str, new_string: str, replace_all: bool = False
    ) -> EditResult:
        return await asyncio.to_thread(self.edit, file_path, old_string, new_string, replace_all)

    def delete(self, file_path: str) -> DeleteResult:
        error = protocol.DeleteResult(error=f"Error deleting file '{file_path}': {NOT_TEXT}")
        return self._helper(super().delete, error, LinuxText(file_path))

    def glob(self, pattern: str, path: str | None = None) -> GlobResult:
        error = protocol.GlobResult(error=f"Path '{path or '/'}': {NOT_TEXT}")
        return self._helper(super().glob, error, LinuxText(pattern), linux_text(path))

    async def aglob(self, pattern: str, path: str | None = None) -> GlobResult:
        return await asyncio.to_thread(self.glob, pattern, path)

    def grep(
        self,
        pattern: str,
        path: str | None = None,
        glob: str | None = None,
        *,
        max_count: int | None = None,
    ) -> GrepResult:
        error = protocol.GrepResult(error=f"Path '{path or '.'}': {NOT_TEXT}")
        texts = (LinuxText(pattern), linux_text(path), linux_text(glob))
        found = self._helper(super().grep, error, *texts, max_count=max_count)
        for match in found.matches or []:  # paths round trip; a line is only read
            match["text"] = readable(match["text"])
        return found

    async def agrep(
        self,
        pattern: str,
        path: str | None = None,
        glob: str | None = None,
        *,
        max_count: int | None = None,
    ) -> GrepResult:
        return await asyncio.to_thread(self.grep, pattern, path, glob, max_count=max_count)

    def upload_files(self, files: list[tuple[str, bytes]]) -> list[FileUploadResponse]:
        """Write files by absolute path as the sandbox user; one round trip per batch."""
        try:
            done = self.sandbox.upload_files(files)
        except Exception as exc:  # the sandbox is gone or broken: every file says why
            reason = _failure(exc)
            paths = [checked_upload(entry).path for entry in _entries(files)]
            return [FileUploadResponse(path=path, error=reason) for path in paths]
        return [FileUploadResponse(path=item.path, error=item.error) for item in done]

    def download_files(self, paths: list[str]) -> list[FileDownloadResponse]:
        """Read files by absolute path as the sandbox user; one round trip per batch."""
        try:
            done = self.sandbox.download_files(paths)
        except Exception as exc:
            reason = _failure(exc)
            shown = [shown_path(path) for path in _entries(paths)]
            return [FileDownloadResponse(path=path, error=reason) for path in shown]
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
