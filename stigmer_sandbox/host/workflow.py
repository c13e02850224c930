"""`dev-full`: from a fresh clone to a working sandbox, one step at a time.

Each step is idempotent, so a second run with nothing changed only checks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .. import engine, images
from ..config import Settings
from ..errors import EngineError, SandboxError
from ..images import smoke
from ..runtime import Sandbox
from . import daemon

NEXT_STEPS = (
    'inv run "python --version"    run a command in the sandbox',
    "inv sandbox.shell             an interactive shell in it",
    "inv compose.up                the same sandbox through docker-compose",
)


@dataclass(frozen=True)
class StepResult:
    """One finished step: its name, what it found or did, how long it took."""

    name: str
    detail: str
    seconds: float


def _engine(settings: Settings) -> str:
    if daemon.engine_answers():
        return f"running ({engine.ping().get('Version')})"
    if os.geteuid() != 0:
        raise EngineError(
            "no Docker Engine answers",
            "start Docker (sudo systemctl start docker), or run as root so "
            "`inv dev-full` can install and start it",
        )
    installed = daemon.install()
    started = daemon.start(
        daemon.EngineState(settings.path("state_dir")),
        data_root=settings.engine_data_root or None,
    )
    return (f"installed {', '.join(installed)}; " if installed else "") + started


def _base(settings: Settings, watcher: images.BuildWatcher) -> str:
    choice = images.resolve_base(settings, pull=False, watcher=watcher)
    return f"{choice.reference} ({choice.reason})"


def _basic(settings: Settings, watcher: images.BuildWatcher) -> str:
    planned = images.plan(settings, "basic", images.BuildOptions(), watcher)
    outcome = images.build(planned, watcher)
    state = "built" if outcome.built else "up to date"
    return f"{state}: {outcome.tags[0]} ({outcome.size_bytes / 1000**2:.0f} MB)"


def _smoke(settings: Settings) -> str:
    results = smoke.smoke_test(settings.image, "basic")
    failed = [r for r in results if not r.passed]
    if failed:
        raise SandboxError(
            f"smoke test failed: {failed[0].name}: {failed[0].detail}",
            "run `inv sandbox.test` for the full table",
        )
    return f"{len(results)} checks passed"


def _version(sandbox: Sandbox, command: str) -> str:
    result = sandbox.exec(command, timeout=60)
    if result.exit_code:
        raise SandboxError(f"`{command}` failed in the sandbox: {result.stderr.strip()[:200]}")
    return result.stdout.strip()


def dev_full(
    settings: Settings, watcher: images.BuildWatcher, starting: Callable[[str], None]
) -> Iterator[StepResult]:
    """Run every step, yielding each result; a failing step raises with its cause."""
    sandbox = Sandbox(settings)
    steps: list[tuple[str, Callable[[], str]]] = [
        ("engine", lambda: _engine(settings)),
        ("base image", lambda: _base(settings, watcher)),
        ("basic image", lambda: _basic(settings, watcher)),
        ("smoke test", lambda: _smoke(settings)),
        ("sandbox", lambda: "; ".join([f"{sandbox.up().name} is up", *sandbox.notes])),
        ("python --version", lambda: _version(sandbox, "python --version")),
        ("node --version", lambda: _version(sandbox, "node --version")),
    ]
    for name, action in steps:
        starting(name)
        started = time.monotonic()
        detail = action()
        yield StepResult(name, detail, time.monotonic() - started)
