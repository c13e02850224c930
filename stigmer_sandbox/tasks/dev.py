"""Tasks for working on this project itself: tests and linters."""

from __future__ import annotations

import builtins
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from invoke import Context, Exit

from .. import config, console
from ..errors import SandboxError
from ._common import settings, task

NO_TESTS_COLLECTED = 5


ISOLATION_VAR = f"{config.ENV_PREFIX}ISOLATION"  # the settings' own variable


@dataclass(frozen=True)
class PytestRun:
    """One pytest run of `inv test`: its argv and its environment's isolation variable
    (None: left out, the engine's default runtime)."""

    argv: list[str]
    isolation: str | None = None

    def env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """`environ` with this run's isolation variable (and no caller's one)."""
        merged = {name: value for name, value in environ.items() if name != ISOLATION_VAR}
        if self.isolation:
            merged[ISOLATION_VAR] = self.isolation
        return merged


def planned_runs(
    python: str, unit: bool, k: str | None, all: bool, gvisor_unusable: str | None
) -> tuple[list[PytestRun], str | None]:
    """The pytest runs `inv test` makes, and the line that says whether (or why not) the
    integration tests run a second time under gVisor (--all only, None otherwise)."""
    selection = (["-k", k] if k else []) + ([] if all else ["-m", "not stress"])
    runs = [PytestRun([python, "-m", "pytest", "tests/unit" if unit else "tests", *selection])]
    if unit or not all:
        return runs, None
    if gvisor_unusable:
        return runs, f"the integration tests do not run again under gVisor: {gvisor_unusable}"
    runs.append(PytestRun([python, "-m", "pytest", "tests/integration", *selection], "gvisor"))
    return runs, f"then the integration tests again under gVisor ({ISOLATION_VAR}=gvisor)"


def gvisor_unusable() -> str | None:
    """Why this engine cannot run gVisor sandboxes (None when it can)."""
    from .. import engine, isolation

    try:
        info = engine.client().info()
    except SandboxError as exc:
        return exc.message
    return isolation.unusable_reason(info)


@task(
    help={
        "unit": "run only the fast unit tests, no Docker needed (default: off)",
        "k": "only tests matching this pytest -k expression (default: all)",
        "all": "also the long stress runs (marked `stress`), whose properties shorter tests "
        "of the default run check too, then the integration tests again with every sandbox "
        "under gVisor where the engine has it (default: off, CI's run)",
    }
)
def test(c: Context, unit: bool = False, k: str | None = None, all: bool = False) -> None:
    """Run the test suite (unit + integration against the real engine)."""
    reason = gvisor_unusable() if all and not unit else None
    runs, note = planned_runs(sys.executable, unit, k, all, reason)
    if note:
        console.info(note)
    codes = []
    for run in runs:
        if run.isolation:
            console.echo_command([f"{ISOLATION_VAR}={run.isolation}", *run.argv[1:]])
        done = subprocess.run(run.argv, cwd=settings(c).root, env=run.env(os.environ), check=False)
        codes.append(done.returncode)
    failed = [code for code in codes if code not in (0, NO_TESTS_COLLECTED)]
    if failed:
        raise Exit(code=failed[0])
    if builtins.all(code == NO_TESTS_COLLECTED for code in codes):
        raise Exit("no test matched", NO_TESTS_COLLECTED)


def _tool(name: str) -> str:
    """A linter from this environment's bin folder, else PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise SandboxError(f"{name} is not installed", "inv deps.install")
    return found


def lint_commands(dockerfiles: list[str]) -> list[list[str]]:
    """The linters `inv lint` runs, each failing on warnings."""
    return [
        [
            _tool("hadolint"),
            "--config",
            ".hadolint.yaml",
            "--failure-threshold",
            "warning",
            *dockerfiles,
        ],
        [_tool("ruff"), "check", "."],
        [_tool("ruff"), "format", "--check", "."],
        [_tool("mypy")],
    ]


@task
def lint(c: Context) -> None:
    """Lint the Dockerfiles (hadolint, fails on warnings) and the Python code (ruff, mypy)."""
    root = settings(c).root
    dockerfiles = sorted(str(p) for p in (root / "dockerfiles").glob("Dockerfile.*"))
    failed = 0
    for argv in lint_commands(dockerfiles):
        console.echo_command(argv)
        failed += subprocess.run(argv, cwd=root, check=False).returncode != 0
    if failed:
        raise Exit(console.error_line(f"{failed} linter(s) reported problems"), 1)
    console.success("lint clean")


@task(help={"quick": "skip the cold build of the basic image, which takes minutes (default: off)"})
def bench(c: Context, quick: bool = False) -> None:
    """Run every benchmark in benchmarks/ and write BENCHMARKS.md (figures beside baselines)."""
    argv = [sys.executable, "benchmarks/run_all.py", *(["--quick"] if quick else [])]
    code = subprocess.run(argv, cwd=settings(c).root, check=False).returncode
    if code:
        raise Exit(code=code)


TASKS = (test, lint, bench)
