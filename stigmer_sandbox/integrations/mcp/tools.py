"""The tools' implementations (`Tools`) over the server's sandboxes, and the commands the
file and search tools run in the sandbox."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ... import policy
from ...errors import SandboxError
from ...runtime import ExecOptions, ExecResult, Sandbox
from ...runtime.client.commands import to_bytes
from ...runtime.client.files import SYSTEM_PATH
from .. import adapter
from .results import (
    Reply,
    command_reply,
    ending,
    failure_reply,
    json_reply,
    process_state,
    process_summary,
)
from .sandboxes import Sandboxes
from .schemas import GREP_DEFAULT_MATCHES, READ_DEFAULT_BYTES, TOOLS, ToolFailure, check_arguments

logger = logging.getLogger(__name__)
T = TypeVar("T")

# -- commands the file and search tools run in the sandbox -----------------------------------

# The file and search tools' own commands: bounded, whatever the sandbox's default.
HELPER_TIMEOUT_S = 60.0
HELPER_OUTPUT = 4 * 1024 * 1024
LIST_LIMIT = 2000
GLOB_LIMIT = 1000
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
            "isolation": arguments.get("isolation"),
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
