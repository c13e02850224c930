"""Tasks for working on this project itself: tests and linters."""

from __future__ import annotations

import subprocess
import sys

from invoke import Context, Exit

from ._common import task

NO_TESTS_COLLECTED = 5


@task(
    help={
        "unit": "run only the fast unit tests, no Docker needed (default: off)",
        "k": "only tests matching this pytest -k expression (default: all)",
    }
)
def test(c: Context, unit: bool = False, k: str | None = None) -> None:
    """Run the test suite (unit + integration against the real engine)."""
    argv = [sys.executable, "-m", "pytest", "tests/unit" if unit else "tests"]
    if k:
        argv += ["-k", k]
    code = subprocess.run(argv, check=False).returncode
    if code not in (0, NO_TESTS_COLLECTED):
        raise Exit(code=code)
    if code == NO_TESTS_COLLECTED:
        raise Exit("no test matched", code)


TASKS = (test,)
