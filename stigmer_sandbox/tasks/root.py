"""Root tasks: `doctor` and the other everyday commands."""

from __future__ import annotations

import sys

from invoke import Context, Exit

from .. import console, diagnostics, runtime
from ..errors import UsageError
from ._common import settings, task


@task(help={"json": "print the report as one JSON object (default: off)"})
def doctor(c: Context, json: bool = False) -> None:
    """Check this host: Python packages, engine, compose, disk, images, workspace, CA."""
    checks = diagnostics.run_checks(settings(c))
    result = diagnostics.report(checks)
    if json:
        console.emit_json(result)
    else:
        for check in checks:
            console.check_line(check.status, check.name, check.detail, check.hint)
    if not result["ok"]:
        raise Exit(code=1)


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--env must be KEY=VALUE, got {pair!r}")
        parsed[key] = value
    return parsed


def _write(stream: object) -> runtime.OutputCallback:
    def write(data: bytes) -> None:
        stream.buffer.write(data)  # type: ignore[attr-defined]
        stream.buffer.flush()  # type: ignore[attr-defined]

    return write


@task(
    help={
        "command": "the command, run by bash inside the sandbox; quote it (required, no default)",
        "json": "print the result object (exit code, output, cause...) instead of streaming "
        "(default: off)",
        "timeout": "seconds before the command and everything it started is killed "
        "(default: config timeout, 600)",
        "env": "KEY=VALUE for the command, repeatable (default: none)",
        "workdir": "working directory, relative to /workspace (default: /workspace)",
        "network": "none runs it in a separate sandbox without network (default: config network)",
        "keep_background": "let background processes it starts outlive it, e.g. a server "
        "(default: off, they end with the command)",
    },
    iterable=["env"],
)
def run(
    c: Context,
    command: str,
    json: bool = False,
    timeout: float | None = None,
    env: list[str] | None = None,
    workdir: str | None = None,
    network: str | None = None,
    keep_background: bool = False,
) -> None:
    """Run a command in the sandbox (or on the host with STIGMER_EXECUTION_MODE=local)."""
    current = settings(c)
    streaming = not json
    options = {
        "timeout": timeout,
        "env": _env_pairs(env or []),
        "cwd": workdir,
        "on_stdout": _write(sys.stdout) if streaming else None,
        "on_stderr": _write(sys.stderr) if streaming else None,
    }
    if current.execution_mode == "local":
        result = runtime.run_local(current, command, **options)
    else:
        name = current.container_name
        if network and network != current.network:
            name = f"{name}-{network}"
        sandbox = runtime.Sandbox(current, name=name, network=network)
        result = sandbox.exec(command, keep_background=keep_background, **options)
        for note in sandbox.notes:
            console.warning(note)
    if json:
        console.emit_json(result.to_dict())
    elif result.cause != "exit":
        console.warning(f"command ended by {result.cause} (exit {result.exit_code})")
    if result.exit_code:
        raise Exit(code=result.exit_code)


TASKS = (doctor, run)
