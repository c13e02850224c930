"""Shared test helpers: run the task tree as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .caller import without_settings_variables

ROOT = Path(__file__).resolve().parent.parent


def run_inv(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    timeout: float = 900,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """`inv ARGS` in a subprocess with colour off; never raises on a non-zero exit."""
    merged = {**os.environ, "NO_COLOR": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "invoke", *args],
        cwd=cwd,
        env=merged,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input_text,
        # Never the caller's terminal: a child that reads it would wait (or, in a
        # background job, be stopped) instead of seeing end of input.
        stdin=subprocess.DEVNULL if input_text is None else None,
        check=False,
    )


@pytest.fixture(scope="session", autouse=True)
def callers_settings_left_out():
    """The tests read only the settings they give, never the caller's `INVOKE_STIGMER_*`
    or the guide's `STIGMER_*` variables (e.g. STIGMER_EXECUTION_MODE=local)."""
    with without_settings_variables():
        yield


@pytest.fixture
def inv():
    """The `run_inv` helper as a fixture."""
    return run_inv
