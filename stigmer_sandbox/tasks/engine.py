"""`engine.*`: install, start and stop a Docker Engine where none runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from invoke import Collection, Context, Exit

from .. import console
from ._common import settings, task, wait_seconds

if TYPE_CHECKING:
    from ..host import daemon


def _state(c: Context) -> daemon.EngineState:
    from ..host import daemon  # loaded when an engine task runs, not at start-up

    return daemon.EngineState(settings(c).path("state_dir"))


@task(
    help={
        "gvisor": "also install gVisor's runsc and register it with the engine as the runtimes "
        "stigmer-gvisor and stigmer-gvisor-nonet (merged into /etc/docker/daemon.json; a "
        "running engine is reloaded, never restarted; default: off)",
        "checkpoints": "with --gvisor: also set the engine's experimental mode, which "
        "checkpoints with memory need; it applies at the engine's next start (default: off)",
    }
)
def install(c: Context, gvisor: bool = False, checkpoints: bool = False) -> None:
    """Install Docker Engine, docker-compose, debootstrap (Debian/Ubuntu); --gvisor adds runsc."""
    from ..host import daemon

    if checkpoints and not gvisor:
        raise Exit(console.error_line("--checkpoints goes with --gvisor"), 2)
    installed = daemon.install()
    if installed:
        console.success(f"installed {', '.join(installed)}")
    else:
        console.success(f"already installed: {', '.join(daemon.PACKAGES)}")
    if gvisor:
        from ..host import gvisor as gvisor_host

        current = settings(c)
        state = daemon.EngineState(current.path("state_dir"))
        for line in gvisor_host.install(state, current.image, checkpoints=checkpoints):
            console.success(line)


@task(
    help={
        "timeout": "seconds to wait for the engine to answer (default: 60)",
        "data_root": "dockerd --data-root for a fresh, separate engine state (default: config "
        "engine_data_root, else dockerd's own)",
    }
)
def start(c: Context, timeout: float | None = None, data_root: str | None = None) -> None:
    """Start dockerd in the background if no engine answers (idempotent)."""
    from ..host import daemon

    current = settings(c)
    state = daemon.EngineState(current.path("state_dir"))
    root = data_root or current.engine_data_root or None
    console.success(daemon.start(state, timeout_s=wait_seconds(timeout), data_root=root))


@task
def stop(c: Context) -> None:
    """Stop the engine that `engine.start` started; never one it did not start."""
    from ..host import daemon

    console.success(daemon.stop(_state(c)))


ns = Collection("engine", install, start, stop)
