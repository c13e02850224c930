"""Tasks for working on this project itself: tests and linters."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from invoke import Context, Exit

from .. import console
from ..errors import SandboxError
from ._common import settings, task

NO_TESTS_COLLECTED = 5


@task(
    help={
        "unit": "run only the fast unit tests, no Docker needed (default: off)",
        "k": "only tests matching this pytest -k expression (default: all)",
        "all": "also the long stress runs (marked `stress`), whose properties shorter tests "
        "of the default run check too (default: off, CI's run)",
    }
)
def test(c: Context, unit: bool = False, k: str | None = None, all: bool = False) -> None:
    """Run the test suite (unit + integration against the real engine)."""
    argv = [sys.executable, "-m", "pytest", "tests/unit" if unit else "tests"]
    if k:
        argv += ["-k", k]
    if not all:
        argv += ["-m", "not stress"]
    code = subprocess.run(argv, cwd=settings(c).root, check=False).returncode
    if code not in (0, NO_TESTS_COLLECTED):
        raise Exit(code=code)
    if code == NO_TESTS_COLLECTED:
        raise Exit("no test matched", code)


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
