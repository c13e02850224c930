"""An MCP server: any MCP client runs commands, files and sandboxes in stigmer sandboxes.

    stigmer-sandbox mcp                       # stdio: the MCP client starts it
    stigmer-sandbox mcp --http --port 8765    # streamable HTTP on 127.0.0.1, bearer token

Tools: `run` (timeout, session, background), `read_file`, `write_file`, `list_files`,
`glob`, `grep`, `process_list` / `process_output` / `process_kill`, and `sandbox_create` /
`sandbox_list` / `sandbox_fork` / `sandbox_snapshot` / `sandbox_destroy`. Every tool takes
an optional `sandbox` (a name this server gave out); without one it uses the server's own
sandbox, started on first use with the project's settings. Every sandbox the server
starts is ephemeral (labelled with this process as its owner, plus `MCP_LABEL`), removed
when the server exits, and found by `inv clean` if the server is killed first.

Results carry the exit code, the exit cause (exit, timeout, idle, oom, signal, lost) and
which stream lost bytes to the output limit, read through `adapter`. A bad argument, an
unknown sandbox or a failure of the sandbox is an MCP error result (`isError`) in one line;
the server keeps serving. A command is ended in the sandbox, its whole tree, when its call
is cancelled: the client's cancel notification, the stdio client going away, an HTTP
session deleted, or (HTTP) the connection that carried the call dropping.

Built on the official SDK's low-level `Server`, not FastMCP: the tools' JSON schemas are one
table here, checked with the SDK's jsonschema so a bad argument is one line we word (FastMCP
hands back pydantic's multi-line report); each result is a `CallToolResult` with both a text
block and `structuredContent`, with `isError` ours to set; and the HTTP app is the SDK's
session manager behind a bearer-token check, without FastMCP's OAuth machinery. Needs the
`mcp` extra (`pip install 'stigmer-sandbox[mcp]'`); only `inv mcp` imports this module.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import jsonschema  # type: ignore[import-untyped]  # the SDK's dependency; no stubs
from mcp import types
from mcp.server.lowlevel import Server

from .. import __version__, labels, policy
from ..config import Settings
from ..errors import SandboxError, SandboxNotReady, UsageError
from ..runtime import ExecOptions, ExecResult, Sandbox, egress_spares
from ..runtime.client.commands import to_bytes
from ..runtime.client.files import MAX_FILE_BYTES, SYSTEM_PATH
from ..runtime.guest import protocol
from . import adapter

logger = logging.getLogger(__name__)
T = TypeVar("T")

SERVER_NAME = "stigmer-sandbox"
# Marks every sandbox this server starts (beside the owner labels of an ephemeral one).
MCP_LABEL = f"{labels.PREFIX}.mcp"
TOKEN_ENV = "STIGMER_MCP_TOKEN"
MIN_TOKEN_CHARS = 16
HOST = "127.0.0.1"
DEFAULT_PORT = 8765
HTTP_PATH = "/mcp"
# How often a call carried by HTTP checks that its connection is still there.
DISCONNECT_POLL_S = 0.25
# The file and search tools' own commands: bounded, whatever the sandbox's default.
HELPER_TIMEOUT_S = 60.0
HELPER_OUTPUT = 4 * 1024 * 1024
READ_DEFAULT_BYTES = 1024 * 1024
LIST_LIMIT = 2000
GLOB_LIMIT = 1000
GREP_DEFAULT_MATCHES = 200
GREP_MAX_MATCHES = 5000
# Labels the project sets on a sandbox; `--label` may not replace them.
RESERVED_LABELS = frozenset(
    {
        labels.MANAGED,
        labels.KIND,
        labels.VERSION,
        labels.INPUTS,
        labels.OWNER_PID,
        labels.OWNER_HOST,
        labels.EXPIRES,
        labels.OWNER,
        MCP_LABEL,
        *(f"{labels.PREFIX}.{key}" for key in ("config", "sandbox", "private", "source")),
    }
)


class ToolFailure(Exception):
    """What a tool answers with an error result: one line, said to the client."""


# -- the tools' arguments --------------------------------------------------------------------

SANDBOX_ARG = {
    "type": "string",
    "description": "the sandbox's name (from sandbox_create, sandbox_fork or sandbox_list); "
    "default: the server's own sandbox, started on first use",
}
PATH_HELP = "a path in the sandbox; relative ones are under /workspace"


def _schema(required: Sequence[str] = (), **properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {**properties, "sandbox": SANDBOX_ARG},
        "required": list(required),
        "additionalProperties": False,
    }


def _text(description: str, **more: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **more}


def _number(description: str, **more: Any) -> dict[str, Any]:
    return {"type": "number", "description": description, "exclusiveMinimum": 0, **more}


def _flag(description: str) -> dict[str, Any]:
    return {"type": "boolean", "description": description, "default": False}


def _list(description: str) -> dict[str, Any]:
    return {"type": "array", "items": {"type": "string"}, "description": description}


@dataclass(frozen=True)
class ToolSpec:
    """One tool as clients see it: what it does and the arguments it takes."""

    description: str
    schema: dict[str, Any]
    read_only: bool = False


TOOLS: dict[str, ToolSpec] = {
    "run": ToolSpec(
        "Run a bash command in the sandbox (as its unprivileged user, in /workspace) and "
        "return stdout, stderr, the exit code and why it ended (exit, timeout, idle, oom, "
        "signal, lost). Everything it started ends with it. With background=true it is "
        "started and its process id returned (see process_output, process_kill).",
        _schema(
            ["command"],
            command=_text("the command, run by bash -c", minLength=1),
            timeout=_number(
                "seconds before it and everything it started is killed (default: the "
                "sandbox's, 600; background: no limit)"
            ),
            session=_text(
                "a named shell session: cd, exports and an activated venv carry over to the "
                "next run in the same session (default: a fresh shell)"
            ),
            background=_flag("start it in the background and return its process id"),
            cwd=_text("working folder, relative to /workspace (default: /workspace)"),
            env={
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "environment variables for the command",
            },
        ),
    ),
    "read_file": ToolSpec(
        "Read a text file from the sandbox (regular files only, never through a symlink).",
        _schema(
            ["path"],
            path=_text(PATH_HELP),
            max_bytes={
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_FILE_BYTES,
                "description": f"read at most this many bytes (default: {READ_DEFAULT_BYTES})",
            },
        ),
        read_only=True,
    ),
    "write_file": ToolSpec(
        "Write a text file in the sandbox, creating its folders; replaces an existing file.",
        _schema(["path", "content"], path=_text(PATH_HELP), content=_text("the file's text")),
    ),
    "list_files": ToolSpec(
        "List a folder in the sandbox: each entry's name, type (file, dir, link, other) and size.",
        _schema(path=_text(f"{PATH_HELP} (default: /workspace)")),
        read_only=True,
    ),
    "glob": ToolSpec(
        "Find paths in the sandbox matching a glob pattern (** matches any depth).",
        _schema(
            ["pattern"],
            pattern=_text("e.g. **/*.py", minLength=1),
            path=_text(f"the folder to search from; {PATH_HELP} (default: /workspace)"),
        ),
        read_only=True,
    ),
    "grep": ToolSpec(
        "Search file contents in the sandbox (recursive, binary files skipped): each match's "
        "path, line number and line.",
        _schema(
            ["pattern"],
            pattern=_text(
                "an extended regular expression (or text with literal=true)", minLength=1
            ),
            path=_text(f"a file or folder; {PATH_HELP} (default: /workspace)"),
            glob=_text("only files whose name matches this glob, e.g. *.py"),
            ignore_case=_flag("match without regard to case"),
            literal=_flag("the pattern is plain text, not a regular expression"),
            max_matches={
                "type": "integer",
                "minimum": 1,
                "maximum": GREP_MAX_MATCHES,
                "description": f"stop after this many matches (default: {GREP_DEFAULT_MATCHES})",
            },
        ),
        read_only=True,
    ),
    "process_list": ToolSpec(
        "List the sandbox's background processes, running and recently ended.",
        _schema(),
        read_only=True,
    ),
    "process_output": ToolSpec(
        "A background process's output so far (head and tail when it printed a lot) and state.",
        _schema(["process_id"], process_id=_text("the id run with background=true returned")),
        read_only=True,
    ),
    "process_kill": ToolSpec(
        "End a background process and everything it started; its final result.",
        _schema(["process_id"], process_id=_text("the id run with background=true returned")),
    ),
    "sandbox_create": ToolSpec(
        "Start a new sandbox and return its name (pass it as `sandbox` to the other tools).",
        _schema(
            egress=_text(
                "public: any public address, never the host or the LAN; allowlist: only the "
                "allow entries; open: everything; none: no network (default: the project's)",
                enum=["public", "allowlist", "open", "none"],
            ),
            allow=_list("destinations it may reach: name, *.name, address or CIDR, optional :port"),
            deny=_list("destinations it may never reach (deny wins)"),
            allow_presets=_list("named allow sets: python, node, debian"),
            image=_text("the image to run (default: the project's)"),
            snapshot=_text("start from this snapshot (see sandbox_snapshot) instead of an image"),
        ),
    ),
    "sandbox_list": ToolSpec(
        "List the sandboxes this server started: name, which is the default, where it came "
        "from, its state.",
        {"type": "object", "properties": {}, "additionalProperties": False},
        read_only=True,
    ),
    "sandbox_fork": ToolSpec(
        "Start a copy of a sandbox (its installed packages, files and workspace; not its "
        "processes, /tmp or sessions) and return the copy's name.",
        _schema(),
    ),
    "sandbox_snapshot": ToolSpec(
        "Keep a sandbox's filesystem and workspace as a named snapshot, which outlives this "
        "server (start one from it with sandbox_create snapshot=NAME).",
        _schema(
            ["name"],
            name=_text("the snapshot's name: letters, digits, . _ -"),
            replace=_flag("overwrite a snapshot of that name"),
        ),
    ),
    "sandbox_destroy": ToolSpec(
        "Remove a sandbox this server started, with its private workspace.",
        _schema(),
    ),
}


def check_arguments(tool: str, arguments: dict[str, Any] | None) -> dict[str, Any]:
    """The arguments of a call to `tool`, checked against its schema; a ToolFailure in one
    line naming the tool and the argument otherwise."""
    spec = TOOLS.get(tool)
    if spec is None:
        raise ToolFailure(f"unknown tool {tool!r}; the tools are: {', '.join(TOOLS)}")
    given = arguments or {}
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(spec.schema).iter_errors(given)
    )
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path)
        prefix = f"argument {where!r}: " if where else ""
        raise ToolFailure(one_line(f"{tool}: {prefix}{error.message}"))
    return dict(given)


def one_line(text: str, limit: int = 500) -> str:
    """`text` on one line, at most `limit` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# -- results ---------------------------------------------------------------------------------


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


# -- the server's sandboxes ------------------------------------------------------------------


@dataclass
class Entry:
    sandbox: Sandbox
    origin: str


class Sandboxes:
    """The sandboxes this server started, by name; the default one started on first use.
    Thread-safe: tools call it from worker threads."""

    def __init__(self, settings: Settings, extra_labels: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.labels = {**(extra_labels or {}), MCP_LABEL: "true"}
        self._entries: dict[str, Entry] = {}
        self._default: str | None = None
        self._lock = threading.Lock()
        self._starting = threading.Lock()  # one default, however many first calls race
        self.closed = False

    def get(self, name: str | None) -> Sandbox:
        """The sandbox called `name`, or the default one (started now if need be)."""
        if not name:
            return self.default()
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise UsageError(f"no sandbox {name!r} on this server (see sandbox_list)")
        return entry.sandbox

    def default(self) -> Sandbox:
        """The server's own sandbox, started with the project's settings on first use."""
        with self._starting:
            with self._lock:
                entry = self._entries.get(self._default or "")
            if entry is not None:
                return entry.sandbox
            sandbox = self._started(
                lambda: Sandbox.create_ephemeral(self.settings, extra_labels=self.labels)
            )
            self._add(sandbox, "default")
            self._default = sandbox.name
            return sandbox

    def create(self, image: str | None, snapshot: str | None, **egress: Any) -> Sandbox:
        """A new sandbox: the project's settings with this image or egress, or from a
        snapshot."""
        if image and snapshot:
            raise UsageError("give image or snapshot, not both")
        if snapshot:
            sandbox = self._checked(
                lambda: Sandbox.from_snapshot(
                    snapshot, self.settings, extra_labels=self.labels, **egress
                )
            )
            return self._add(sandbox, f"snapshot {snapshot}")
        sandbox = self._started(
            lambda: Sandbox.create_ephemeral(
                self.settings, image=image, extra_labels=self.labels, **egress
            )
        )
        return self._add(sandbox, "created")

    def fork(self, name: str | None) -> Sandbox:
        """A started copy of sandbox `name` (or the default)."""
        source = self.get(name)
        forked = self._checked(lambda: source.fork(extra_labels=self.labels))
        return self._add(forked, f"fork of {source.name}")

    def destroy(self, name: str | None) -> str:
        """Remove sandbox `name` (or the default one); its name."""
        with self._lock:
            chosen = name or self._default
            entry = self._entries.pop(chosen or "", None)
            if entry is not None and chosen == self._default:
                self._default = None
        if entry is None:
            if name:
                raise UsageError(f"no sandbox {name!r} on this server (see sandbox_list)")
            raise UsageError("the default sandbox is not running (nothing to destroy)")
        entry.sandbox.remove()
        return entry.sandbox.name

    def listing(self) -> list[dict[str, Any]]:
        """Each sandbox: name, whether it is the default, origin, image, egress, state."""
        with self._lock:
            entries = list(self._entries.values())
            default = self._default
        rows = []
        for entry in entries:
            sandbox = entry.sandbox
            try:
                container = sandbox.find()
                state = container.status if container is not None else "gone"
            except SandboxError as exc:
                state = f"unknown ({exc.message})"
            rows.append(
                {
                    "name": sandbox.name,
                    "default": sandbox.name == default,
                    "origin": entry.origin,
                    "image": sandbox.settings.image,
                    "egress": sandbox.settings.egress,
                    "state": state,
                }
            )
        return rows

    def close(self) -> list[tuple[str, str | None]]:
        """Remove every sandbox (in parallel: a client gives a server a few seconds to
        exit); each name with the error that kept it, if any. Later starts are refused."""
        with self._lock:
            self.closed = True
            entries = list(self._entries.values())
            self._entries.clear()
            self._default = None
        if not entries:
            return []
        with ThreadPoolExecutor(max_workers=min(8, len(entries))) as pool:
            return list(pool.map(_removed, [entry.sandbox for entry in entries]))

    def _started(self, make: Callable[[], Sandbox]) -> Sandbox:
        def start() -> Sandbox:
            sandbox = make()
            try:
                sandbox.up()
                sandbox.connect()
            except BaseException:
                with contextlib.suppress(SandboxError):
                    sandbox.remove()
                raise
            return sandbox

        return self._checked(start)

    def _checked(self, start: Callable[[], Sandbox]) -> Sandbox:
        if self.closed:
            raise SandboxNotReady("the MCP server is shutting down")
        return start()

    def _add(self, sandbox: Sandbox, origin: str) -> Sandbox:
        with self._lock:
            closed = self.closed
            if not closed:
                self._entries[sandbox.name] = Entry(sandbox, origin)
        if closed:  # started while the server was closing: it goes at once
            _removed(sandbox)
            raise SandboxNotReady("the MCP server is shutting down")
        return sandbox


def _removed(sandbox: Sandbox) -> tuple[str, str | None]:
    try:
        sandbox.remove()
    except SandboxError as exc:
        return sandbox.name, str(exc)
    return sandbox.name, None


# -- commands the file and search tools run in the sandbox -----------------------------------

# Root-owned tools only (the sandbox user owns /opt/venv/bin, first on its PATH).
HELPER_ENV = {"PATH": SYSTEM_PATH, "LC_ALL": "C.UTF-8"}

LIST_SOURCE = r"""
import json, os, stat, sys
path, limit = sys.argv[1], int(sys.argv[2])
def shown(name):
    return os.fsencode(name).decode("utf-8", "replace")
try:
    with os.scandir(path) as found:
        entries = sorted(found, key=lambda entry: entry.name)
except OSError as exc:
    sys.exit(f"{path}: {exc.strerror}")
rows = []
for entry in entries[:limit]:
    try:
        info = entry.stat(follow_symlinks=False)
    except OSError:
        rows.append({"name": shown(entry.name), "type": "other", "size": None})
        continue
    mode = info.st_mode
    kind = ("dir" if stat.S_ISDIR(mode) else "link" if stat.S_ISLNK(mode)
            else "file" if stat.S_ISREG(mode) else "other")
    rows.append({"name": shown(entry.name), "type": kind, "size": info.st_size})
print(json.dumps({"entries": rows, "total": len(entries)}))
"""

GLOB_SOURCE = r"""
import glob, itertools, json, os, sys
path, pattern, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    os.chdir(path)
except OSError as exc:
    sys.exit(f"{path}: {exc.strerror}")
found = list(itertools.islice(glob.iglob(pattern, recursive=True), limit + 1))
paths = sorted(os.fsencode(os.path.join(path, name)).decode("utf-8", "replace")
               for name in found[:limit])
print(json.dumps({"matches": paths, "truncated": len(found) > limit}))
"""


def python_argv(source: str, *arguments: str) -> list[str]:
    """The sandbox's own Python running `source` with `arguments` (isolated, no site)."""
    return [policy.PYTHON, "-I", "-S", "-c", source, *arguments]


def helper_options() -> ExecOptions:
    return {"timeout": HELPER_TIMEOUT_S, "env": HELPER_ENV, "output_limit": HELPER_OUTPUT}


def helper_json(result: ExecResult) -> dict[str, Any]:
    """The JSON a helper printed; a ToolFailure with its error line when it failed."""
    if result.exit_code != 0 or result.cause != "exit":
        raise ToolFailure(helper_error(result))
    try:
        answer = json.loads(result.stdout)
    except ValueError:
        raise ToolFailure("the sandbox's answer was not readable") from None
    if not isinstance(answer, dict):
        raise ToolFailure("the sandbox's answer was not readable")
    return answer


def helper_error(result: ExecResult) -> str:
    """Why a helper command failed, in one line."""
    notice = ending(result, HELPER_TIMEOUT_S)
    if notice and result.cause != "exit":
        return notice
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {result.exit_code}"


def grep_argv(arguments: dict[str, Any], target: str) -> list[str]:
    """grep over `target`: recursive, line numbers, names NUL-terminated, binaries skipped."""
    argv = ["/usr/bin/grep", "-rnIH", "--null", "--color=never"]
    argv.append("-F" if arguments.get("literal") else "-E")
    if arguments.get("ignore_case"):
        argv.append("-i")
    if arguments.get("glob"):
        argv.append(f"--include={arguments['glob']}")
    return [*argv, "-e", arguments["pattern"], "--", target]


def grep_matches(stdout: str, limit: int) -> tuple[list[dict[str, Any]], bool]:
    """grep's `path\\0line:text` lines as matches, at most `limit`; whether there were more."""
    matches: list[dict[str, Any]] = []
    for line in stdout.splitlines():
        path, nul, rest = line.partition("\0")
        number, colon, text = rest.partition(":")
        if not (nul and colon and number.isdigit()):
            continue  # the head/tail marker of a truncated output, or a mangled line
        if len(matches) == limit:
            return matches, True
        matches.append({"path": path, "line": int(number), "text": text})
    return matches, False


# -- the tools -------------------------------------------------------------------------------


def _path_failure(path: str, why: str) -> Exception:
    return ToolFailure(f"{path}: {why}")


FILE_ERRORS = adapter.ErrorTypes(
    not_found=_path_failure,
    permission=_path_failure,
    is_directory=_path_failure,
    invalid_path=_path_failure,
    too_large=_path_failure,
    no_space=_path_failure,
    other=_path_failure,
    timeout=ToolFailure,
    unavailable=ToolFailure,
    bad_input=ToolFailure,
)


async def blocking(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a worker thread (`adapter.in_thread`: asyncio's executor, a
    quarter of anyio's cost a hop); a cancelled caller stops waiting for it."""
    return await adapter.in_thread(function, *args)


async def run_command(
    sandbox: Sandbox, command: str, options: ExecOptions, session: str | None
) -> ExecResult:
    """`command` (in `session`, when given), ended in the sandbox, its whole tree, if the
    call is cancelled."""
    return await adapter.run_request(sandbox, command, options, session)


def sandbox_path(arguments: dict[str, Any], key: str = "path", default: str = ".") -> str:
    """A path argument as the sandbox sees it (relative: under /workspace)."""
    given = arguments.get(key) or default
    if "\0" in given:
        raise ToolFailure(f"{key} cannot contain NUL bytes")
    path = adapter.sandbox_path(given)
    return path.removesuffix("/.") if path.endswith("/.") and len(path) > 2 else path


class Tools:
    """The tools' implementations over a `Sandboxes`; `call` answers any tool call."""

    def __init__(self, sandboxes: Sandboxes) -> None:
        self.sandboxes = sandboxes
        self.handlers: dict[str, Callable[[dict[str, Any]], Awaitable[Reply]]] = {
            name: getattr(self, name) for name in TOOLS
        }

    async def call(self, tool: str, arguments: dict[str, Any] | None) -> Reply:
        """The reply to one call: its result, or one error line (never an exception but
        cancellation)."""
        try:
            checked = check_arguments(tool, arguments)
            return await self.handlers[tool](checked)
        except ToolFailure as exc:
            return failure_reply(tool, str(exc))
        except SandboxError as exc:
            return failure_reply(tool, str(exc))
        except Exception as exc:  # a bug: logged, answered, and the server keeps serving
            logger.exception("tool %s failed", tool)
            return failure_reply(tool, f"internal error: {type(exc).__name__}: {exc}")

    async def _sandbox(self, arguments: dict[str, Any]) -> Sandbox:
        return await blocking(self.sandboxes.get, arguments.get("sandbox"))

    # -- commands ----------------------------------------------------------------------------

    async def run(self, arguments: dict[str, Any]) -> Reply:
        session, background = arguments.get("session"), arguments.get("background", False)
        if session and background:
            raise ToolFailure("background runs outside any session; drop one of the two")
        sandbox = await self._sandbox(arguments)
        options: ExecOptions = {"env": arguments.get("env"), "cwd": arguments.get("cwd")}
        if background:
            options["timeout"] = arguments.get("timeout")
            process = await blocking(lambda: sandbox.start(arguments["command"], **options))
            data = {"sandbox": sandbox.name, "process_id": process.id, "command": process.command}
            return Reply(f"started in the background: process id {process.id}", data)
        seconds, _chosen = adapter.command_timeout(arguments.get("timeout"), sandbox.settings)
        options["timeout"] = seconds
        result = await run_command(sandbox, arguments["command"], options, session)
        return command_reply(sandbox.name, result, seconds)

    # -- files -------------------------------------------------------------------------------

    async def read_file(self, arguments: dict[str, Any]) -> Reply:
        path = sandbox_path(arguments)
        if adapter.names_a_directory(path):
            raise ToolFailure(f"{path}: is a directory")
        sandbox = await self._sandbox(arguments)
        done = (await blocking(sandbox.download_files, [path]))[0]
        if done.error:
            raise adapter.file_error(path, done.error, FILE_ERRORS)
        content = done.content or b""
        limit = arguments.get("max_bytes") or READ_DEFAULT_BYTES
        kept = content[:limit]
        text = kept.decode("utf-8", errors="replace")
        data = {
            "sandbox": sandbox.name,
            "path": path,
            "content": text,
            "bytes": len(content),
            "truncated": len(content) > limit,
            "utf8": _is_utf8(kept),
        }
        note = f"\n[truncated: {len(content)} bytes, the first {limit} shown]"
        return Reply(text + (note if data["truncated"] else ""), data)

    async def write_file(self, arguments: dict[str, Any]) -> Reply:
        path = sandbox_path(arguments)
        data = to_bytes(arguments["content"], "content")
        sandbox = await self._sandbox(arguments)
        done = (await blocking(sandbox.upload_files, [(path, data)]))[0]
        if done.error:
            raise adapter.file_error(path, done.error, FILE_ERRORS)
        return Reply(
            f"wrote {len(data)} bytes to {path}",
            {"sandbox": sandbox.name, "path": path, "bytes": len(data)},
        )

    async def list_files(self, arguments: dict[str, Any]) -> Reply:
        path = sandbox_path(arguments)
        sandbox = await self._sandbox(arguments)
        argv = python_argv(LIST_SOURCE, path, str(LIST_LIMIT))
        answer = helper_json(await adapter.run_request(sandbox, argv, helper_options()))
        entries = answer.get("entries") or []
        total = int(answer.get("total") or 0)
        data = {"sandbox": sandbox.name, "path": path, "entries": entries, "total": total}
        data["truncated"] = total > len(entries)
        lines = [f"{e['type']}\t{e['size']}\t{e['name']}" for e in entries]
        if data["truncated"]:
            lines.append(f"[{total} entries, the first {len(entries)} shown]")
        return Reply("\n".join(lines) or f"{path} is empty", data)

    async def glob(self, arguments: dict[str, Any]) -> Reply:
        path = sandbox_path(arguments)
        sandbox = await self._sandbox(arguments)
        argv = python_argv(GLOB_SOURCE, path, arguments["pattern"], str(GLOB_LIMIT))
        answer = helper_json(await adapter.run_request(sandbox, argv, helper_options()))
        matches = list(answer.get("matches") or [])
        truncated = bool(answer.get("truncated"))
        data = {"sandbox": sandbox.name, "path": path, "matches": matches, "truncated": truncated}
        more = [f"[more than {GLOB_LIMIT} matches; the first {GLOB_LIMIT} shown]"]
        lines = matches + (more if truncated else [])
        return Reply("\n".join(lines) or "no matches", data)

    async def grep(self, arguments: dict[str, Any]) -> Reply:
        path = sandbox_path(arguments)
        sandbox = await self._sandbox(arguments)
        result = await adapter.run_request(sandbox, grep_argv(arguments, path), helper_options())
        limit = arguments.get("max_matches") or GREP_DEFAULT_MATCHES
        matches, more = grep_matches(result.stdout, limit)
        if result.cause != "exit" or (result.exit_code not in (0, 1) and not matches):
            raise ToolFailure(helper_error(result))
        errors = [line for line in result.stderr.splitlines() if line.strip()][:5]
        data = {
            "sandbox": sandbox.name,
            "path": path,
            "matches": matches,
            "truncated": more or adapter.truncated(result),
            "errors": errors,
        }
        lines = [f"{m['path']}:{m['line']}:{m['text']}" for m in matches]
        if data["truncated"]:
            lines.append(f"[stopped after {len(matches)} matches; there are more]")
        lines += [f"[grep: {line}]" for line in errors]
        return Reply("\n".join(lines) or "no matches", data)

    # -- background processes ----------------------------------------------------------------

    async def process_list(self, arguments: dict[str, Any]) -> Reply:
        sandbox = await self._sandbox(arguments)
        found = [process_summary(info) for info in await blocking(sandbox.processes)]
        return json_reply({"sandbox": sandbox.name, "processes": found})

    async def process_output(self, arguments: dict[str, Any]) -> Reply:
        sandbox = await self._sandbox(arguments)

        def read() -> dict[str, Any]:
            process = sandbox.process(arguments["process_id"])
            state = process.status()
            output = process.output_from(state)
            return {
                "sandbox": sandbox.name,
                "process_id": process.id,
                "command": state.get("command"),
                "state": process_state(state),
                "running": bool(state.get("running")),
                "exit_code": state.get("exit_code"),
                "stdout": output.stdout,
                "stderr": output.stderr,
                "truncated": output.truncated,
                "output_bytes": {"stdout": output.stdout_bytes, "stderr": output.stderr_bytes},
            }

        data = await blocking(read)
        parts = [data["stdout"].rstrip("\n")] if data["stdout"] else []
        if data["stderr"]:
            parts.append("[stderr]\n" + data["stderr"].rstrip("\n"))
        parts.append(f"[{data['state']}, exit code {data['exit_code']}]")
        return Reply("\n".join(parts), data)

    async def process_kill(self, arguments: dict[str, Any]) -> Reply:
        sandbox = await self._sandbox(arguments)
        process_id = arguments["process_id"]
        result = await blocking(lambda: sandbox.process(process_id).kill())
        reply = command_reply(sandbox.name, result)
        return Reply(reply.text, {"process_id": process_id, **reply.data}, reply.error)

    # -- sandboxes ---------------------------------------------------------------------------

    async def sandbox_create(self, arguments: dict[str, Any]) -> Reply:
        egress = {
            "egress": arguments.get("egress"),
            "allow": tuple(arguments.get("allow") or ()),
            "deny": tuple(arguments.get("deny") or ()),
            "allow_presets": tuple(arguments.get("allow_presets") or ()),
        }
        image, snapshot = arguments.get("image"), arguments.get("snapshot")
        sandbox = await blocking(lambda: self.sandboxes.create(image, snapshot, **egress))
        return self._started_reply(sandbox, "started")

    async def sandbox_list(self, arguments: dict[str, Any]) -> Reply:
        return json_reply({"sandboxes": await blocking(self.sandboxes.listing)})

    async def sandbox_fork(self, arguments: dict[str, Any]) -> Reply:
        fork = await blocking(self.sandboxes.fork, arguments.get("sandbox"))
        return self._started_reply(fork, "forked")

    async def sandbox_snapshot(self, arguments: dict[str, Any]) -> Reply:
        sandbox = await self._sandbox(arguments)
        taken = await blocking(sandbox.snapshot, arguments["name"], arguments.get("replace", False))
        return json_reply({"sandbox": sandbox.name, **taken})

    async def sandbox_destroy(self, arguments: dict[str, Any]) -> Reply:
        name = await blocking(self.sandboxes.destroy, arguments.get("sandbox"))
        return Reply(f"removed sandbox {name}", {"sandbox": name, "removed": True})

    @staticmethod
    def _started_reply(sandbox: Sandbox, verb: str) -> Reply:
        data = {"sandbox": sandbox.name, "image": sandbox.settings.image}
        data["egress"] = sandbox.settings.egress
        return Reply(f"{verb} sandbox {sandbox.name}", data)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# -- the MCP server --------------------------------------------------------------------------


def tool_list() -> list[types.Tool]:
    """Every tool as `tools/list` gives it."""
    return [
        types.Tool(
            name=name,
            description=spec.description,
            inputSchema=spec.schema,
            annotations=types.ToolAnnotations(readOnlyHint=spec.read_only),
        )
        for name, spec in TOOLS.items()
    ]


def build_server(tools: Tools) -> Server[Any, Any]:
    """The MCP server answering `tools/list` and `tools/call` with `tools`."""
    server: Server[Any, Any] = Server(
        SERVER_NAME,
        version=__version__,
        instructions="Run commands and edit files in local, hardened Docker sandboxes. Without "
        "a `sandbox` argument every tool uses this server's own sandbox (started on first "
        "use); sandbox_create and sandbox_fork start more, all removed when the server exits.",
    )

    @server.list_tools()
    async def list_tools() -> list[types.Tool]:
        return tool_list()

    @server.call_tool(validate_input=False)  # checked in `Tools.call`, in one line
    async def call_tool(name: str, arguments: dict[str, Any]) -> types.CallToolResult:
        request = server.request_context.request  # HTTP: the request that carried the call
        reply = await unless_client_leaves(lambda: tools.call(name, arguments), request)
        return reply.result()

    return server


async def unless_client_leaves(work: Callable[[], Awaitable[Reply]], request: Any) -> Reply:
    """`work()`, cancelled when the HTTP connection that carried the call drops (the SDK
    would let it run on in the session; cancelling ends its command in the sandbox)."""
    if request is None or not hasattr(request, "is_disconnected"):
        return await work()  # stdio: the transport closing cancels the call already
    done: list[Reply] = []
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            while not await request.is_disconnected():
                await anyio.sleep(DISCONNECT_POLL_S)
            group.cancel_scope.cancel()

        group.start_soon(watch)
        done.append(await work())
        group.cancel_scope.cancel()
    if not done:
        return Reply("the client went away; the call was cancelled", error=True)
    return done[0]


# -- transports ------------------------------------------------------------------------------


async def serve_stdio(server: Server[Any, Any], protocol_out: io.BufferedWriter) -> None:
    """Serve one client over stdin and `protocol_out` until stdin closes."""
    from mcp.server.stdio import stdio_server

    writer = anyio.wrap_file(io.TextIOWrapper(protocol_out, encoding="utf-8"))
    async with stdio_server(stdout=writer) as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


class BearerAuth:
    """ASGI middleware: every HTTP request needs `Authorization: Bearer <token>` (compared
    in constant time), else 401."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self.allowed(scope):
            body = b'{"error": "unauthorized: send Authorization: Bearer <token>"}'
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"www-authenticate", b'Bearer realm="stigmer-sandbox"'),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

    def allowed(self, scope: dict[str, Any]) -> bool:
        given = b""
        for name, value in scope.get("headers") or []:
            if name.lower() == b"authorization":
                given = value
        return hmac.compare_digest(given, self.expected)


class _SessionApp:
    """The SDK's session manager as an ASGI endpoint (a class: Starlette passes it the raw
    ASGI call, as the SDK's own app does)."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.manager.handle_request(scope, receive, send)


def http_app(server: Server[Any, Any], token: str) -> Any:
    """The streamable HTTP app at `HTTP_PATH`, behind the bearer token; Host and Origin
    must be loopback ones (no DNS rebinding)."""
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
    from mcp.server.transport_security import TransportSecuritySettings
    from starlette.applications import Starlette
    from starlette.routing import Route

    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[f"{HOST}:*", "localhost:*"],
        allowed_origins=[f"http://{HOST}:*", "http://localhost:*"],
    )
    manager = StreamableHTTPSessionManager(app=server, security_settings=security)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        async with manager.run():
            yield

    app = Starlette(routes=[Route(HTTP_PATH, endpoint=_SessionApp(manager))], lifespan=lifespan)
    return BearerAuth(app, token)


def bound_socket(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:`port` (0: a free port); one line when taken."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {port}")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError as exc:
        sock.close()
        why = f"cannot listen on {HOST}:{port}: {exc.strerror}"
        raise UsageError(why, "pick another --port") from None
    sock.listen(128)
    return sock


def _not_a_closed_stream(record: logging.LogRecord) -> bool:
    """False for the SDK's report of a client closing its event stream (an ordinary end,
    logged with a traceback at ERROR level)."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, anyio.ClosedResourceError)


async def serve_http(server: Server[Any, Any], sock: socket.socket, token: str) -> None:
    """Serve streamable HTTP on `sock` until SIGINT or SIGTERM (uvicorn's own handling)."""
    import uvicorn

    logging.getLogger("mcp.server.streamable_http").addFilter(_not_a_closed_stream)

    config = uvicorn.Config(
        http_app(server, token),
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=3,
    )
    await uvicorn.Server(config).serve(sockets=[sock])


def token_from(environ: dict[str, str] | os._Environ[str]) -> tuple[str, bool]:
    """The bearer token: `STIGMER_MCP_TOKEN` if set (at least 16 characters), else a new
    random one; whether it was generated."""
    given = environ.get(TOKEN_ENV)
    if given is None:
        return secrets.token_urlsafe(32), True
    if len(given.strip()) < MIN_TOKEN_CHARS or given != given.strip():
        raise UsageError(
            f"{TOKEN_ENV} must be at least {MIN_TOKEN_CHARS} characters without spaces around"
        )
    return given, False


def parse_labels(items: Sequence[str]) -> dict[str, str]:
    """`KEY=VALUE` labels for the server's sandboxes; the project's own keys are refused."""
    found = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key or key != key.strip() or "\0" in item:
            raise UsageError(f"--label must be KEY=VALUE, got {item!r}")
        if key in RESERVED_LABELS:
            raise UsageError(f"--label {key} is set by stigmer-sandbox itself; pick another key")
        found[key] = value
    return found


@contextlib.contextmanager
def protocol_stdout() -> Iterator[io.BufferedWriter]:
    """The real stdout for the protocol alone: whatever else writes to fd 1 or sys.stdout
    meanwhile (a library's print, a child process) goes to stderr instead of corrupting
    the stream."""
    sys.stdout.flush()
    saved = os.dup(1)
    protocol_out = os.fdopen(os.dup(1), "wb")  # the SDK flushes after each message
    os.dup2(2, 1)
    previous = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield protocol_out
    finally:
        sys.stdout = previous
        os.dup2(saved, 1)
        os.close(saved)
        protocol_out.close()


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt meanwhile, as SIGINT does, so that the
    sandboxes are removed however the server is asked to stop (uvicorn raises the signal
    again once it has shut down)."""
    wanted = (signal.SIGTERM, signal.SIGHUP)
    before = {number: signal.signal(number, signal.default_int_handler) for number in wanted}
    try:
        yield
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP ignored meanwhile (removing the sandboxes must finish)."""
    wanted = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {number: signal.signal(number, signal.SIG_IGN) for number in wanted}
    try:
        yield
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


def serve(
    settings: Settings,
    *,
    http: bool = False,
    port: int = DEFAULT_PORT,
    extra_labels: dict[str, str] | None = None,
    say: Callable[[str], None] | None = None,
) -> list[tuple[str, str | None]]:
    """Serve MCP over stdio (default) or streamable HTTP on 127.0.0.1:`port` until the
    client leaves or a signal ends it; then remove every sandbox the server started
    (returned: each name and the error that kept it, if any). `say` gets the lines for a
    person (stderr by default): the URL and a generated token, printed once."""
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    sandboxes = Sandboxes(settings, extra_labels)
    server = build_server(Tools(sandboxes))
    try:
        with signals_interrupt():
            _serve(server, http, port, say)
    except KeyboardInterrupt:
        pass
    finally:
        with signals_held():  # before a client's SIGKILL: it gives stdio servers ~4 s
            removed = sandboxes.close()
            egress_spares.discard_all()  # else at exit, outside this window
    for name, error in removed:
        say(f"removed sandbox {name}" if error is None else f"could not remove {name}: {error}")
    return removed


def _serve(server: Server[Any, Any], http: bool, port: int, say: Callable[[str], None]) -> None:
    if http:
        token, generated = token_from(os.environ)
        sock = bound_socket(port)
        say(f"MCP server (streamable HTTP) on http://{HOST}:{sock.getsockname()[1]}{HTTP_PATH}")
        say(f"bearer token: {token}" if generated else f"bearer token: from {TOKEN_ENV}")
        anyio.run(serve_http, server, sock, token)
    else:
        with protocol_stdout() as protocol_out:
            anyio.run(serve_stdio, server, protocol_out)
