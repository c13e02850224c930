"""`stigmer-sandbox run CMD` on a warm relay, without Invoke or the Docker SDK.

Importing Invoke costs ~70 ms and the Docker SDK more; a command on a running sandbox
costs a few. When the console script is asked for a plain `run` whose every flag this
parser knows, and a relay for the same settings is warm (see `relay`), the command goes
straight to it: same request, same streamed output, same result, warnings and exit code
as `inv run`. Anything else (another task, a short or unknown flag, `--help`,
`--background`, `--network`, local mode, bad settings, no relay, a relay that refuses)
returns None before anything ran, and the full task tree handles it as always.

Loading the settings costs more than the command: a run goes first to the relay that
`warm_index` noted for the same inputs, and only then through the settings (noting the
relay it reached there for the next run). Imports stay inside the functions that need
them, so the noted path loads little more than a socket and JSON.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from . import warm_index
from .errors import SandboxError, UsageError
from .streams import stream_writer

if TYPE_CHECKING:
    from pathlib import Path

# `inv run`'s flags this path takes: name -> how its value is read (None: a switch).
VALUED = {"timeout": float, "idle-timeout": float, "env": str, "workdir": str, "session": str}
SWITCHES = {"json", "keep-background"}


def parse(argv: list[str]) -> dict[str, Any] | None:
    """`run [--FLAG VALUE | --FLAG=VALUE | --SWITCH]... COMMAND` as `inv run` reads it, or
    None for anything else (left to Invoke, which also reports its errors)."""
    if not argv or argv[0] != "run":
        return None
    found: dict[str, Any] = {"env": []}
    words = argv[1:]
    while words:
        word = words.pop(0)
        if not word.startswith("--"):
            if "command" in found or word.startswith("-"):
                return None
            found["command"] = word
            continue
        name, equals, value = word[2:].partition("=")
        if name in SWITCHES and not equals:
            found[name] = True
        elif name in VALUED and (equals or words):
            if not _take_value(found, name, value if equals else words.pop(0)):
                return None
        else:
            return None
    return found if found.get("command") else None


def _take_value(found: dict[str, Any], name: str, text: str) -> bool:
    """Put flag `name`'s value in `found`; False where Invoke would refuse it."""
    try:
        value = VALUED[name](text)
    except ValueError:
        return False
    if name == "env":
        found["env"].append(value)
    elif name in found:
        return False  # given twice: Invoke says so
    else:
        found[name] = value
    return True


def request_of(flags: dict[str, Any]) -> dict[str, Any]:
    """The relay request `inv run` sends for these flags."""
    from . import relay

    options = {
        "timeout": flags.get("timeout"),
        "idle_timeout": flags.get("idle-timeout"),
        "env": relay.env_pairs(flags["env"]),
        "cwd": flags.get("workdir"),
        "keep_background": bool(flags.get("keep-background")),
    }
    return {"command": flags["command"], "options": options, "session": flags.get("session")}


def try_run(argv: list[str], project_dir: Path | None = None) -> int | None:
    """The exit code of `argv` run on a warm relay, or None when nothing ran (take the full
    path)."""
    flags = parse(argv)
    if flags is None:
        return None
    cwd = str(project_dir) if project_dir else None
    noted = _run_noted(flags, cwd)
    return noted if noted is not None else _run_through_settings(flags, cwd)


def _run_noted(flags: dict[str, Any], cwd: str | None) -> int | None:
    """Run on the relay noted for these inputs, if there is one and it takes the request."""
    noted = warm_index.lookup(cwd)
    if noted is None:
        return None
    socket_path, fingerprint, default_timeout = noted
    from . import relay

    try:
        request = request_of(flags)
    except UsageError:
        return None  # the full path reports it exactly as always
    timeout = float(request["options"]["timeout"] or default_timeout)
    answer = _answer(lambda callbacks: relay.run_at(
        socket_path, fingerprint, timeout, request, **callbacks
    ), flags)  # fmt: skip
    if answer is None:
        warm_index.forget(cwd)
    return answer


def _run_through_settings(flags: dict[str, Any], cwd: str | None) -> int | None:
    """Run on the relay the settings name; note it for the next run."""
    from pathlib import Path

    from . import config, relay

    try:
        settings = config.load_settings(Path(cwd) if cwd else Path.cwd())
        request = request_of(flags)
    except SandboxError:
        return None  # the full path reports it exactly as always
    if settings.relay_idle_s <= 0 or settings.execution_mode == "local":
        return None
    code = _answer(lambda callbacks: relay.run(settings, request, **callbacks), flags)
    if code is not None:
        path, fingerprint = relay.socket_path(settings), relay.fingerprint(settings)
        warm_index.remember(str(path), fingerprint, settings.timeout, cwd)
    return code


def _answer(send: Any, flags: dict[str, Any]) -> int | None:
    """Send the request with output callbacks; the exit code, or None when nothing ran."""
    streaming = not flags.get("json")
    callbacks = {
        "on_stdout": stream_writer(sys.stdout) if streaming else None,
        "on_stderr": stream_writer(sys.stderr) if streaming else None,
    }
    try:
        answer = send(callbacks)
    except SandboxError as exc:
        from . import console

        print(console.error_line(exc.message, exc.hint), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # the relay sees the connection close and ends the command
        return 1
    if answer is None:
        return None
    if flags.get("json") or answer.get("cause") != "exit" or answer.get("exit_code") is None:
        from . import console  # a JSON result or a warning to print

        return console.command_result(answer, bool(flags.get("json")))
    return int(answer["exit_code"])
