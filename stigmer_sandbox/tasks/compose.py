"""`compose.*`: the guide's docker-compose setups, with Compose v2 or v1."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

from invoke import Collection, Context, Exit

from .. import console
from ..streams import stream_writer
from ._common import (
    EGRESS_LISTS,
    SANDBOX_HELP,
    egress_settings,
    report_result,
    settings,
    task,
    wait_seconds,
)
from .sandbox import build_kind

if TYPE_CHECKING:
    from ..host import compose

FILE_HELP = {
    "advanced": "add the guide's advanced options: NODE_ENV, port 3000, "
    "limits and reservations, host.docker.internal (default: off)",
    "database": "add the container-to-container example: a database on a shared network "
    "(default: off)",
    "file": "a compose file of yours merged after the project's, relative to the project "
    "folder; checked like them, repeatable (default: none)",
}
FILES = ["file"]


def _choice(advanced: bool, database: bool, file: list[str] | None) -> compose.FileChoice:
    from pathlib import Path

    from ..host import compose  # loaded when a compose task runs, not at start-up

    return compose.FileChoice(advanced, database, tuple(Path(p) for p in file or []))


def _project(
    c: Context, advanced: bool, database: bool, file: list[str] | None
) -> compose.ComposeProject:
    from ..host import compose

    return compose.project(settings(c), _choice(advanced, database, file))


def _run(target: compose.ComposeProject, verb: str, *args: str) -> None:
    from ..host import compose

    _exit_on_failure(compose.run(target, verb, *args, echo=console.echo_command), verb)


def _exit_on_failure(done: subprocess.CompletedProcess[str], verb: str) -> None:
    if done.returncode:
        raise Exit(
            console.error_line(f"compose {verb} failed (exit {done.returncode})"), done.returncode
        )


@task(
    help={
        **FILE_HELP,
        "build": "build the basic image first (default: off)",
        "timeout": "seconds to wait for the sandbox to be healthy (default: 60)",
        **SANDBOX_HELP,
    },
    iterable=[*FILES, *EGRESS_LISTS],
)
def up(
    c: Context,
    advanced: bool = False,
    database: bool = False,
    file: list[str] | None = None,
    build: bool = False,
    timeout: float | None = None,
    egress: str | None = None,
    allow: list[str] | None = None,
    deny: list[str] | None = None,
    allow_preset: list[str] | None = None,
    secret: list[str] | None = None,
    isolation: str | None = None,
) -> None:
    """Start the compose sandbox behind its egress gateway and wait until it is healthy."""
    from ..host import compose
    from ..images import BuildOptions

    current = egress_settings(c, egress, allow, deny, allow_preset, secret, isolation=isolation)
    if build:
        build_kind(current, "basic", BuildOptions(), "auto")
    project = _choice(advanced, database, file)
    started = compose.up(current, project, wait_seconds(timeout), console.echo_command)
    for note in started.notes:
        console.info(note)
    console.success(f"{current.container_name} is up and healthy ({started.seconds:.1f} s)")


@task(
    help={
        **FILE_HELP,
        "volumes": "also remove the project's named volumes (asks first; default: off)",
        "yes": "do not ask for confirmation (default: off)",
    },
    iterable=FILES,
)
def down(
    c: Context,
    advanced: bool = False,
    database: bool = False,
    file: list[str] | None = None,
    volumes: bool = False,
    yes: bool = False,
) -> None:
    """Stop and remove the compose services and network; the workspace is kept."""
    if volumes and not yes:
        console.confirm("Remove the project's named volumes too?")
    from ..host import compose

    current = settings(c)
    target = compose.project(current, _choice(advanced, database, file))
    done = compose.down(
        target, current, *(["--volumes"] if volumes else []), echo=console.echo_command
    )
    _exit_on_failure(done, "down")


@task(help=FILE_HELP, iterable=FILES)
def restart(
    c: Context, advanced: bool = False, database: bool = False, file: list[str] | None = None
) -> None:
    """Restart the compose services."""
    _run(_project(c, advanced, database, file), "restart")


@task(help=FILE_HELP, iterable=FILES)
def ps(
    c: Context, advanced: bool = False, database: bool = False, file: list[str] | None = None
) -> None:
    """List the compose services and their state."""
    _run(_project(c, advanced, database, file), "ps")


@task(
    help={
        **FILE_HELP,
        "follow": "keep printing new lines (default: off)",
        "tail": "lines from the end of each log, or all (default: all)",
        "service": "only this service (default: every service)",
    },
    iterable=FILES,
)
def logs(
    c: Context,
    advanced: bool = False,
    database: bool = False,
    file: list[str] | None = None,
    follow: bool = False,
    tail: str = "all",
    service: str | None = None,
) -> None:
    """Show the compose services' logs."""
    from ..runtime.containers import checked_tail

    lines = checked_tail(tail)
    args = ["--tail", lines, *(["--follow"] if follow else []), *([service] if service else [])]
    _run(_project(c, advanced, database, file), "logs", *args)


@task(
    help={
        **FILE_HELP,
        "service": "the service to run in (default: sandbox)",
        "timeout": "seconds before a command in the sandbox and everything it started is "
        "killed (default: config timeout, 600)",
    },
    iterable=FILES,
)
def exec(
    c: Context,
    advanced: bool = False,
    database: bool = False,
    file: list[str] | None = None,
    service: str | None = None,
    timeout: float | None = None,
) -> None:
    """Run a command in a service: `inv compose.exec -- python --version` (a shell if none).

    In the sandbox a command runs through its agent, as `inv run` does: as the sandbox
    user with no capabilities, everything it started ended with it, its exit cause told
    and recorded in the audit trail (`inv sandbox.history`). Other services: compose exec.
    """
    from ..host import compose

    if service and service != compose.SERVICE:
        _exec_in_service(_project(c, advanced, database, file), service, c.remainder)
        return
    sandbox = compose.attach(settings(c))
    if not c.remainder.strip():
        code = sandbox.shell()
        if code:
            raise Exit(code=code)
        return
    result = sandbox.exec(
        c.remainder,
        timeout=timeout,
        on_stdout=stream_writer(sys.stdout),
        on_stderr=stream_writer(sys.stderr),
    )
    report_result(result.to_dict(), json=False)


def _exec_in_service(target: compose.ComposeProject, service: str, command: str) -> None:
    from ..host import compose

    argv = ["bash", "-c", command] if command.strip() else ["bash"]
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    tty = [] if interactive else ["-T"]
    done = compose.run(target, "exec", *tty, service, *argv, echo=console.echo_command)
    if done.returncode:
        raise Exit(code=done.returncode)


@task(help=FILE_HELP, iterable=FILES)
def config(
    c: Context, advanced: bool = False, database: bool = False, file: list[str] | None = None
) -> None:
    """Print the resolved compose configuration (to run compose yourself)."""
    _run(_project(c, advanced, database, file), "config")


@task(help=FILE_HELP, iterable=FILES)
def command(
    c: Context, advanced: bool = False, database: bool = False, file: list[str] | None = None
) -> None:
    """Print the compose command line the tasks use, with the values they fill in."""
    target = _project(c, advanced, database, file)
    exports = " ".join(f"{k}={v}" for k, v in sorted(target.environment.items()))
    console.plain(f"env {exports} " + " ".join(target.argv("<verb>")))


ns = Collection("compose", up, down, restart, ps, logs, exec, config, command)
