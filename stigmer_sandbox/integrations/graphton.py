"""A Graphton backend: Stigmer's Graphton agents run their tools in a local sandbox.

    from stigmer_sandbox.integrations.graphton import StigmerGraphtonBackend

    with StigmerGraphtonBackend() as backend:      # an ephemeral, hardened sandbox
        backend.execute("pytest -q", timeout=300)  # ExecutionResult(exit_code, stdout, stderr)

Graphton 1.0.4 (Stigmer's agent framework, on deepagents 0.4) calls its backends
through a duck-typed interface of its own, not deepagents' protocol: `execute`
(returning `graphton.core.backends.types.ExecutionResult`), the coroutine
`execute_streaming(command, timeout, on_chunk)`, `read`, `write`, `delete`,
`list_files` and `is_directory`, all with paths relative to the workspace (an absolute
path is read inside the workspace, as Graphton's filesystem and Daytona backends do).
This class implements that interface over a stigmer-sandbox `Sandbox` or `LocalSandbox`.

`StigmerGraphtonBackend()` starts a sandbox of its own in the mode `execution_mode` /
`STIGMER_EXECUTION_MODE` selects (sandbox, local, or auto), removed by `close()`;
`StigmerGraphtonBackend(sandbox)` wraps one the caller owns and leaves it running.
`from_sandbox_config` builds one from a Graphton `sandbox_config` dict (see
docs/agent-runner.md for the agent runner's side). Needs the `graphton` extra:
`pip install 'stigmer-sandbox[graphton]'` (it pins deepagents 0.4, so it cannot share
an environment with the `deepagents` extra).

Output is stdout and stderr merged in the order written, returned as `stdout` (as
Graphton's Daytona backend returns it); nothing here raises on a command's outcome.
Linux names are bytes: a name with undecodable bytes is listed, read and written as text
holding lone surrogates ("x\\udcff" for b"x\\xff", as `os.fsdecode` gives).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import posixpath
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from deepagents.backends.protocol import FileDownloadResponse, FileUploadResponse

# Graphton pins deepagents 0.4, so it is never installed next to the dev extra's 0.7 (which
# mypy checks against): its types are unknown to mypy here.
from graphton.core.backends import (  # type: ignore[import-not-found]
    ExecutionResult,
    FilesystemBackend,
    GitIgnoreFilter,
)

from .. import policy
from ..config import Settings, load_settings
from ..errors import SandboxError
from ..runtime import ExecResult, LocalSandbox, Sandbox, open_sandbox
from ..runtime.client.commands import from_bytes, to_bytes
from ..runtime.client.files import SYSTEM_PATH, FileTransfer
from .deepagents import StigmerSandbox, to_response

logger = logging.getLogger(__name__)

# The `type` a Graphton sandbox_config carries for this backend.
SANDBOX_TYPE = "stigmer-sandbox"
# Graphton's execute tool and FilesystemBackend default to 120 s; another value is the
# model's own choice (deepagents' "custom timeout" wording).
DEFAULT_TIMEOUT_S = 120
FILE_OP_TIMEOUT_S = 60.0
# A line longer than this is passed on in pieces (asyncio's own line reader, which
# Graphton's FilesystemBackend streams with, fails past 64 KiB).
MAX_LINE_CHARS = 64 * 1024
# FilesystemBackend hides these from listings so tree walks skip generated folders.
SKIPPED_NAMES: frozenset[str] = FilesystemBackend._SKIP_DIR_NAMES
ERRORS: dict[str, tuple[type[OSError] | type[ValueError], str]] = {
    "file_not_found": (FileNotFoundError, "File not found"),
    "permission_denied": (PermissionError, "Permission denied"),
    "is_directory": (IsADirectoryError, "Is a directory"),
    "invalid_path": (ValueError, "Invalid path"),
}
# File operations take the path as $1 and never go through the sandbox user's PATH.
IS_DIR = '[ -d "$1" ]'
DELETE_FILE = (
    '[ -e "$1" ] || [ -L "$1" ] || exit 2; { [ -d "$1" ] && ! [ -L "$1" ]; } && exit 3; '
    'rm -f -- "$1"'
)
# The workspace's .gitignore ($2) comes first, up to a NUL, so listings follow its edits
# without another round trip.
LIST_DIR = (
    '[ -e "$1" ] || exit 0; [ -d "$1" ] || exit 20; ! [ -f "$2" ] || cat -- "$2"; '
    "printf '\\0'; for e in \"$1\"/*; do "
    '[ -e "$e" ] || [ -L "$e" ] || continue; if [ -d "$e" ]; then t=d; else t=f; fi; '
    'printf \'%s %s\\0\' "$t" "${e##*/}"; done'
)


class LineStream:
    """Decodes output chunks and passes on whole lines (Graphton's `on_chunk` contract),
    the last partial line when the command ends."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def feed(self, data: bytes) -> None:
        self._pending += self._decoder.decode(data)
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._emit(line + "\n")
        while len(self._pending) > MAX_LINE_CHARS:
            self._emit(self._pending[:MAX_LINE_CHARS])
            self._pending = self._pending[MAX_LINE_CHARS:]

    def close(self) -> None:
        rest = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        if rest:
            self._emit(rest)


@contextlib.contextmanager
def _os_errors() -> Iterator[None]:
    """A sandbox that cannot be reached, as the OSError Graphton's adapter catches."""
    try:
        yield
    except SandboxError as exc:
        raise OSError(str(exc)) from exc


def _file_error(path: str, error: str) -> Exception:
    """A transfer's error code as the exception Graphton's tools and adapter expect."""
    kind, text = ERRORS.get(error, (OSError, "Cannot access"))
    detail = "" if error in ERRORS else f": {error}"
    return kind(f"{text}: '{path}'{detail}")


class StigmerGraphtonBackend:
    """Graphton 1.0.4's backend interface over a stigmer-sandbox `Sandbox` (or
    `LocalSandbox`)."""

    def __init__(
        self,
        sandbox: Sandbox | LocalSandbox | None = None,
        *,
        env_vars: Mapping[str, str] | None = None,
        settings: Settings | None = None,
        **sandbox_options: Any,
    ) -> None:
        # The deepagents backend owns the lifecycle (ephemeral or wrapped, close()) and the
        # batched transfers deepagents' protocol asks of Graphton's adapter.
        self._deepagents = StigmerSandbox(sandbox, settings=settings, **sandbox_options)
        self.sandbox = self._deepagents.sandbox
        self.env_vars = dict(env_vars or {})
        if isinstance(self.sandbox, LocalSandbox):
            self.root_dir = str(self.sandbox.workspace)
            aliases = [self.root_dir]
        else:
            self.root_dir = policy.WORKSPACE
            aliases = [self.root_dir, str(self.sandbox.settings.path("workspace"))]
        # An agent told the host's workspace path may use it; it means the same folder.
        self._aliases = sorted(set(aliases), key=len, reverse=True)

    @property
    def id(self) -> str:
        """The sandbox's container name (`local` in local mode)."""
        return self.sandbox.name

    # -- commands ------------------------------------------------------------------------

    def execute(
        self, command: str, timeout: int = DEFAULT_TIMEOUT_S, **kwargs: Any
    ) -> ExecutionResult:
        """Run a shell command in the workspace: an `ExecutionResult` whose stdout holds
        stdout and stderr in the order written. Never raises: a timeout is exit code 124,
        a failure to run exit code 1 with the reason in stderr. (`kwargs`: reserved by
        Graphton.)"""
        return self._run(command, timeout, None)

    async def execute_streaming(
        self,
        command: str,
        timeout: int = DEFAULT_TIMEOUT_S,
        on_chunk: Callable[[str], None] | None = None,
    ) -> ExecutionResult:
        """`execute`, passing each line of output to `on_chunk` on the event loop as the
        command prints it; the loop stays free while the command runs."""
        if on_chunk is None:
            return await asyncio.to_thread(self._run, command, timeout, None)
        loop = asyncio.get_running_loop()

        def emit(text: str) -> None:
            # call_soon_threadsafe keeps the order and runs `on_chunk` in the tool's
            # context, so Graphton's dispatch_custom_event finds its run.
            with contextlib.suppress(RuntimeError):  # the loop closed while it ran
                loop.call_soon_threadsafe(on_chunk, text)

        return await asyncio.to_thread(self._run, command, timeout, LineStream(emit))

    def _run(self, command: str, timeout: int | None, lines: LineStream | None) -> ExecutionResult:
        seconds = float(timeout) if timeout and timeout > 0 else float(DEFAULT_TIMEOUT_S)
        try:
            result = self.sandbox.exec(
                command,
                timeout=seconds,
                env=self.env_vars,
                merge_output=True,
                on_stdout=lines.feed if lines else None,
            )
        except SandboxError as exc:
            return ExecutionResult(exit_code=1, stdout="", stderr=f"Error: {exc}")
        except Exception as exc:  # Graphton's contract: the agent reads it, never a crash
            logger.exception("execute failed")
            return ExecutionResult(exit_code=1, stdout="", stderr=f"Error: {exc!r}")
        finally:
            if lines:
                lines.close()
        response = to_response(result, seconds, seconds != DEFAULT_TIMEOUT_S)
        # A lost result has no exit code; Graphton's own normaliser would read None as 0.
        code = 1 if response.exit_code is None else response.exit_code
        return ExecutionResult(exit_code=code, stdout=response.output, stderr="")

    # -- files ---------------------------------------------------------------------------

    def resolve(self, path: str) -> str:
        """The absolute sandbox path of an agent's path. Like Graphton's own backends, every
        path lies in the workspace (`/bin/skills` is `<workspace>/bin/skills`); raises
        ValueError for one that leaves it."""
        relative = path
        for alias in self._aliases:
            if path == alias or path.startswith(alias + "/"):
                relative = path[len(alias) :]
                break
        full = posixpath.normpath(posixpath.join(self.root_dir, relative.lstrip("/")))
        if full != self.root_dir and not full.startswith(self.root_dir + "/"):
            raise ValueError(f"Path '{path}' resolves outside the workspace '{self.root_dir}'")
        return full

    def read(self, path: str) -> str:
        """A file's text, or a listing when `path` is a directory (as FilesystemBackend).
        Raises FileNotFoundError, PermissionError, ValueError (outside the workspace, not
        UTF-8) or OSError."""
        item = self._download(self.resolve(path))
        if item.error == "is_directory":
            return self._listing(path)
        if item.error or item.content is None:
            raise _file_error(path, item.error or "no content")
        try:
            return item.content.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"'{path}' is not UTF-8 text") from None

    def _listing(self, path: str) -> str:
        names = sorted(self._entries(path), key=lambda e: (not e[1], e[0]))
        body = "\n".join(f"  {name}/" if is_dir else f"  {name}" for name, is_dir in names)
        return f"[Directory: {path}]\n\n{body or '  (empty)'}"

    def write(self, path: str, content: str) -> None:
        """Create or overwrite a file (parent folders too) as the sandbox user."""
        with _os_errors():
            data = to_bytes(content, f"the content of '{path}'")
            item = self.sandbox.upload_files([(self.resolve(path), data)])[0]
        if item.error:
            raise _file_error(path, item.error)

    def delete(self, path: str) -> str:
        """Delete one file (never a directory: Graphton leaves that to `execute`)."""
        code = self._file_op(DELETE_FILE, path).exit_code
        if code == 2:
            raise FileNotFoundError(f"File not found: '{path}'")
        if code == 3:
            raise IsADirectoryError(
                f"Cannot delete '{path}': is a directory, not a file. "
                "Use the execute tool with 'rm -rf' for directory removal."
            )
        if code != 0:
            raise OSError(f"Cannot delete '{path}' (exit code {code})")
        return f"Deleted '{path}'"

    def is_directory(self, path: str) -> bool:
        """Whether `path` is a directory in the workspace; False on any error."""
        try:
            return self._file_op(IS_DIR, path).exit_code == 0
        except (OSError, ValueError):
            return False

    def list_files(self, path: str = ".") -> list[str]:
        """Names in a directory, without hidden entries, the folders FilesystemBackend
        skips, or what the workspace's .gitignore ignores; [] when nothing is there.
        Raises NotADirectoryError for a file."""
        return [name for name, _is_dir in self._entries(path)]

    def _entries(self, path: str) -> list[tuple[str, bool]]:
        output = bytearray()  # names are bytes: read so that undecodable ones round trip
        gitignore_path = posixpath.join(self.root_dir, ".gitignore")
        done = self._file_op(LIST_DIR, path, gitignore_path, output=output)
        if done.exit_code == 20:
            raise NotADirectoryError(f"Path '{path}' is a file, not a directory")
        if done.exit_code != 0:
            raise OSError(f"Cannot list '{path}': {done.stdout.strip()[:200]}")
        ignore_text, _, listing = from_bytes(bytes(output)).partition("\0")
        gitignore = GitIgnoreFilter.from_content(ignore_text) if ignore_text else None
        base = posixpath.relpath(self.resolve(path), self.root_dir)
        entries = []
        for item in filter(None, listing.split("\0")):
            kind, _, name = item.partition(" ")
            relative = name if base == "." else f"{base}/{name}"
            if name in SKIPPED_NAMES or (
                gitignore and gitignore.is_ignored(relative, is_dir=kind == "d")
            ):
                continue
            entries.append((name, kind == "d"))
        return entries

    def _file_op(
        self, script: str, path: str, *args: str, output: bytearray | None = None
    ) -> ExecResult:
        """Run a file operation's script as the sandbox user with root-owned tools only
        (the sandbox user owns the first folder of its own PATH); its stdout's bytes go
        to `output` too."""
        argv = ["/bin/sh", "-c", script, "sh", self.resolve(path), *args]
        with _os_errors():
            return self.sandbox.exec(
                argv,
                timeout=FILE_OP_TIMEOUT_S,
                env={"PATH": SYSTEM_PATH},
                on_stdout=output.extend if output is not None else None,
            )

    def _download(self, path: str) -> FileTransfer:
        with _os_errors():
            return self.sandbox.download_files([path])[0]

    # -- deepagents' protocol, through Graphton's DeepAgentsBackendAdapter ------------------

    def upload_files(self, files: list[tuple[str, bytes]]) -> list[FileUploadResponse]:
        """Batched writes by absolute sandbox path (deepagents' protocol)."""
        return self._deepagents.upload_files(files)

    def download_files(self, paths: list[str]) -> list[FileDownloadResponse]:
        """Batched reads by absolute sandbox path (deepagents' protocol)."""
        return self._deepagents.download_files(paths)

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Remove the sandbox if this backend started it; otherwise just disconnect."""
        self._deepagents.close()

    def __enter__(self) -> StigmerGraphtonBackend:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def from_sandbox_config(
    config: Mapping[str, Any], *, settings: Settings | None = None, **sandbox_options: Any
) -> StigmerGraphtonBackend:
    """A backend from a Graphton `sandbox_config` of type `stigmer-sandbox`.

    Keys: `root_dir` (host folder mounted at /workspace; the workspace in local mode),
    `env_vars`, `execution_mode` and `image` (else STIGMER_EXECUTION_MODE and
    STIGMER_SANDBOX_IMAGE), and `sandbox_name`: the sandbox of that name is used (and
    created if missing) and left running for its owner, the agent runner, to remove;
    without it the backend's sandbox is ephemeral. `platform_dir` and `allowed_roots`
    (FilesystemBackend's) are not supported here: the sandbox sees only its workspace.
    """
    for key in ("platform_dir", "allowed_roots"):
        if config.get(key):
            logger.warning("sandbox_config[%r] is ignored: the sandbox sees only /workspace", key)
    current = (settings or load_settings()).replace(
        workspace=config.get("root_dir"),
        execution_mode=config.get("execution_mode"),
        image=config.get("image"),
    )
    env_vars = config.get("env_vars")
    name = config.get("sandbox_name")
    if not name:
        return StigmerGraphtonBackend(env_vars=env_vars, settings=current, **sandbox_options)
    sandbox = open_sandbox(current, name=name, **sandbox_options).up()
    # After up(): it adds its own notes (a recreated container, bootstrap packages).
    level = logging.WARNING if isinstance(sandbox, LocalSandbox) else logging.INFO
    for note in sandbox.notes:
        logger.log(level, note)
    return StigmerGraphtonBackend(sandbox, env_vars=env_vars)
