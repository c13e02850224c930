"""The one translation every framework adapter shares over a `Sandbox`.

Each adapter (deepagents, inspect_ai, and the ones to come) is a thin file that says how
its framework names things; what a result means, which timeout a command gets, where a
relative path lands and which exception a failure becomes are decided here, once:

- results: `ended_notice` (an OOM kill, a lost result), `start_failure_text`, `truncated`
  and `with_notice` read an `ExecResult` the same way for every framework;
- settings: `configured_settings` (the project's, then an adapter config's keys);
- timeouts: `command_timeout` (the framework's, else the sandbox's default);
- paths: `sandbox_path` (relative to /workspace) and `names_a_directory`;
- errors: `ErrorTypes` holds a framework's exception types as small callables;
  `file_error` and `sandbox_error` pick one for a transfer's error code or a
  `SandboxError`;
- async frameworks: `run_request` runs a command in a worker thread and, when the
  awaiting task is cancelled, ends the command in the sandbox instead of abandoning it;
  `in_thread` runs any other blocking call (file transfers) the same way.

Nothing here carries commands, applies policy or cleans up: that stays in the runtime.
"""

from __future__ import annotations

import asyncio
import errno
import posixpath
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .. import policy
from ..config import Settings, load_settings
from ..errors import ConfigError, SandboxError, UsageError
from ..runtime import ExecOptions, ExecResult
from ..runtime.client.commands import Request
from ..runtime.client.files import EXPLAINED

if TYPE_CHECKING:
    from ..runtime import Sandbox

WORKSPACE = policy.WORKSPACE
# The exit code a timed-out command reports (GNU timeout's, which agents know).
TIMEOUT_EXIT = 124
OOM_NOTICE = "Error: the command was killed because the sandbox ran out of memory."
# Exit codes bash gives a command that could not start (not executable / not found).
START_FAILURES = (126, 127)
T = TypeVar("T")


# -- results ---------------------------------------------------------------------------------


def ended_notice(result: ExecResult) -> str | None:
    """What a reader must be told about how a command ended beyond its exit code: an OOM
    kill or a lost result (a timeout's wording is each framework's own)."""
    if result.oom_killed:
        return OOM_NOTICE
    if result.exit_code is None:
        return f"Error: the command's result was lost: {result.error}"
    return None


def with_notice(output: str, notice: str | None) -> str:
    """`output` with `notice` after a blank line (the notice alone when there is none)."""
    if not notice:
        return output
    return f"{output.rstrip()}\n\n{notice}" if output.strip() else notice


def truncated(result: ExecResult) -> bool:
    """Whether either stream lost bytes to the output limit (head and tail are kept)."""
    return any(result.truncated.values())


def start_failure_text(result: ExecResult) -> str | None:
    """Why an argv command could not start (126/127), as a line for its stderr when the
    agent left that empty, so a reader sees what a shell would have said."""
    if result.exit_code in START_FAILURES and result.error and not result.stderr:
        return f"stigmer-sandbox: the command could not start: {result.error}\n"
    return None


def refused_execution(result: ExecResult) -> bool:
    """Whether the kernel refused to execute the command itself (exit 126, EACCES)."""
    return result.exit_code == 126 and "permission denied" in (result.error or "").lower()


# -- settings --------------------------------------------------------------------------------


def validated(model: Any, values: dict[str, Any], source: str) -> Any:
    """An adapter's config (a pydantic model class) built from `values`, or one
    ConfigError naming the first bad key."""
    from pydantic import ValidationError  # the frameworks that have configs bring it

    try:
        return model.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "config"
        raise ConfigError(f"{source}: {where}: {first['msg']}") from None


def configured_settings(
    project_dir: str | None,
    own: dict[str, Any],
    others: dict[str, Any],
    reserved: Iterable[str],
    source: str,
) -> Settings:
    """The settings an adapter's config gives: the project's (`project_dir`'s invoke.yaml
    and INVOKE_STIGMER_*), then `others` (any setting by name), then the config's own keys
    (`own`; None is unset). A key in `others` that `own` or `reserved` names is one
    ConfigError line: each setting is set in one place."""
    given = {key: value for key, value in own.items() if value is not None}
    twice = sorted(set(others) & {*own, *reserved})
    if twice:
        raise ConfigError(f"{source}: set {twice[0]!r} as its own key, not under settings")
    return load_settings(project_dir).replace(source, **others, **given)


# -- timeouts --------------------------------------------------------------------------------


def command_timeout(requested: float | None, settings: Settings) -> tuple[float, bool]:
    """The timeout a command runs with, and whether the framework chose it: the given
    one, else (None or 0) the sandbox's default. A bad value is left for `Request.build`
    to refuse in one line."""
    if requested:
        return float(requested), True
    return settings.timeout, False


# -- paths -----------------------------------------------------------------------------------


def sandbox_path(path: str, home: str = WORKSPACE) -> str:
    """A framework's path as the sandbox sees it: an absolute one as given, a relative one
    under `home` (the per-sample workspace). Nothing is resolved on the host."""
    return path if path.startswith("/") else posixpath.join(home, path)


def names_a_directory(path: str) -> bool:
    """Whether a path can only name a folder: it ends in `.` or `..`."""
    return posixpath.basename(path.rstrip("/")) in (".", "..")


# -- errors ----------------------------------------------------------------------------------

PathError = Callable[[str, str], Exception]  # (the path as the framework named it, why)


def _os_error(kind: type[OSError], code: int) -> PathError:
    return lambda path, why: kind(code, why, path)


NOT_FOUND = _os_error(FileNotFoundError, errno.ENOENT)
DENIED = _os_error(PermissionError, errno.EACCES)
IS_DIRECTORY = _os_error(IsADirectoryError, errno.EISDIR)
TOO_LARGE = _os_error(OSError, errno.EFBIG)
NO_SPACE = _os_error(OSError, errno.ENOSPC)
IO_ERROR = _os_error(OSError, errno.EIO)


@dataclass(frozen=True)
class ErrorTypes:
    """A framework's exceptions, as small callables that make one. The defaults are
    Python's own OSErrors with an errno, a reason and the path (what open() raises)."""

    not_found: PathError = NOT_FOUND
    permission: PathError = DENIED
    is_directory: PathError = IS_DIRECTORY
    # A path the sandbox refuses to follow (a symlink its user could have made, a kernel
    # file): the user may not go there, whatever the file's own permissions say.
    invalid_path: PathError = DENIED
    too_large: PathError = TOO_LARGE
    no_space: PathError = NO_SPACE
    other: PathError = IO_ERROR
    timeout: Callable[[str], Exception] = TimeoutError
    unavailable: Callable[[str], Exception] = ConnectionError
    bad_input: Callable[[str], Exception] = ValueError


FILE_ERRORS = {
    "file_not_found": "not_found",
    "permission_denied": "permission",
    "is_directory": "is_directory",
    "invalid_path": "invalid_path",
    "file_too_large": "too_large",
    "no_space_left": "no_space",
}
TRANSFER_TIMED_OUT = "error: the transfer timed out"


def file_error(path: str, code: str, errors: ErrorTypes) -> Exception:
    """The framework's exception for a file transfer's error `code` on `path`."""
    if code == TRANSFER_TIMED_OUT:
        return errors.timeout(f"{path}: the file transfer timed out")
    field = FILE_ERRORS.get(code)
    why = EXPLAINED.get(code, code.removeprefix("error: "))
    maker: PathError = getattr(errors, field) if field else errors.other
    return maker(path, why[:1].upper() + why[1:])


def sandbox_error(exc: SandboxError, errors: ErrorTypes) -> Exception:
    """The framework's exception for a `SandboxError`: bad input the caller gave, or a
    sandbox that cannot run anything (gone, released, engine down)."""
    if isinstance(exc, UsageError):
        return errors.bad_input(exc.message)
    return errors.unavailable(str(exc))


# -- async frameworks ------------------------------------------------------------------------


async def in_thread(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a worker thread, awaited; cancelling the await abandons the
    thread (the caller ends what it started). asyncio's own executor under asyncio (about
    0.1 ms a call here, anyio's worker threads 0.4 ms), anyio's under any other loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # not asyncio (trio, which inspect can run on)
        import anyio

        return await anyio.to_thread.run_sync(function, *args, abandon_on_cancel=True)
    return await asyncio.to_thread(function, *args)


async def run_request(
    sandbox: Sandbox,
    command: str | Sequence[str],
    options: ExecOptions,
    session: str | None = None,
) -> ExecResult:
    """`sandbox.exec(command, **options)` (in shell session `session`, when given) from
    async code, in a worker thread. When the awaiting task is cancelled (a time limit, an
    interrupted sample) the command is ended in the sandbox, its whole tree, rather than
    left running behind an abandoned thread. Bad input raises the UsageError
    `Request.build` makes, before anything runs."""
    import anyio  # only async frameworks need it

    request = Request.build(sandbox.settings, command, options, session=session)
    connection = sandbox.connection
    try:
        return await in_thread(connection.execute, request)
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(connection.cancel, request.cid)
        raise
