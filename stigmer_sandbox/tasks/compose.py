"""`compose.*`: the guide's docker-compose setups, with Compose v2 or v1."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from invoke import Collection, Context, Exit

from .. import console
from ._common import settings, task
from .sandbox import build_kind

if TYPE_CHECKING:
    from ..host import compose

FILE_HELP = {
    "advanced": "add the guide's advanced options: read-only credentials, NODE_ENV, port 3000, "
    "limits and reservations, host.docker.internal (default: off)",
    "database": "add the container-to-container example: a database on a shared network "
    "(default: off)",
}


def _project(c: Context, advanced: bool, database: bool) -> compose.ComposeProject:
    from ..host import compose  # loaded when a compose task runs, not at start-up

    return compose.project(settings(c), advanced, database)


def _run(target: compose.ComposeProject, verb: str, *args: str) -> None:
    from ..host import compose

    done = compose.run(target, verb, *args, echo=console.echo_command)
    if done.returncode:
        raise Exit(
            console.error_line(f"compose {verb} failed (exit {done.returncode})"), done.returncode
        )


@task(
    help={
        **FILE_HELP,
        "build": "build the basic image first (default: off)",
        "timeout": "seconds to wait for the sandbox to be healthy (default: 60)",
    }
)
def up(
    c: Context,
    advanced: bool = False,
    database: bool = False,
    build: bool = False,
    timeout: float = 60,
) -> None:
    """Start the compose sandbox in the background and wait until it is healthy."""
    from ..host import compose
    from ..images import BuildOptions

    current = settings(c)
    if build:
        build_kind(current, "basic", BuildOptions(), "auto")
    seconds = compose.up(current, advanced, database, timeout, echo=console.echo_command)
    console.success(f"{current.container_name} is up and healthy ({seconds:.1f} s)")


@task(
    help={
        **FILE_HELP,
        "volumes": "also remove the project's named volumes (asks first; default: off)",
        "yes": "do not ask for confirmation (default: off)",
    }
)
def down(
    c: Context,
    advanced: bool = False,
    database: bool = False,
    volumes: bool = False,
    yes: bool = False,
) -> None:
    """Stop and remove the compose services and network; the workspace is kept."""
    if volumes and not yes:
        console.confirm("Remove the project's named volumes too?")
    _run(_project(c, advanced, database), "down", *(["--volumes"] if volumes else []))


@task(help=FILE_HELP)
def restart(c: Context, advanced: bool = False, database: bool = False) -> None:
    """Restart the compose services."""
    _run(_project(c, advanced, database), "restart")


@task(help=FILE_HELP)
def ps(c: Context, advanced: bool = False, database: bool = False) -> None:
    """List the compose services and their state."""
    _run(_project(c, advanced, database), "ps")


@task(
    help={
        **FILE_HELP,
        "follow": "keep printing new lines (default: off)",
        "tail": "lines from the end of each log, or all (default: all)",
        "service": "only this service (default: every service)",
    }
)
def logs(
    c: Context,
    advanced: bool = False,
    database: bool = False,
    follow: bool = False,
    tail: str = "all",
    service: str | None = None,
) -> None:
    """Show the compose services' logs."""
    args = ["--tail", tail, *(["--follow"] if follow else []), *([service] if service else [])]
    _run(_project(c, advanced, database), "logs", *args)


@task(help={**FILE_HELP, "service": "the service to run in (default: sandbox)"})
def exec(
    c: Context,
    advanced: bool = False,
    database: bool = False,
    service: str | None = None,
) -> None:
    """Run a command in a service: `inv compose.exec -- python --version` (a shell if none)."""
    from ..host import compose

    command = ["bash", "-c", c.remainder] if c.remainder.strip() else ["bash"]
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    target = _project(c, advanced, database)
    done = compose.run(
        target,
        "exec",
        *([] if interactive else ["-T"]),
        service or compose.SERVICE,
        *command,
        echo=console.echo_command,
    )
    if done.returncode:
        raise Exit(code=done.returncode)


@task(help=FILE_HELP)
def config(c: Context, advanced: bool = False, database: bool = False) -> None:
    """Print the resolved compose configuration (to run compose yourself)."""
    _run(_project(c, advanced, database), "config")


@task(help=FILE_HELP)
def command(c: Context, advanced: bool = False, database: bool = False) -> None:
    """Print the compose command line the tasks use, with the values they fill in."""
    target = _project(c, advanced, database)
    exports = " ".join(f"{k}={v}" for k, v in sorted(target.environment.items()))
    console.plain(f"env {exports} " + " ".join(target.argv("<verb>")))


ns = Collection("compose", up, down, restart, ps, logs, exec, config, command)
