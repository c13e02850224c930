"""The deepagents backend: `StigmerSandbox` beside a docker-exec-per-command backend.

Both backends work on one sandbox container, in the same run. The baseline is the PyPI
package langchain-docker, unchanged (one docker SDK `exec_run` per command; see
docker_exec_backend.py for why that one and how it is installed). Figures:
- p50/p95 of `execute("true")` through each backend, in blocks of calls A B B A (see
  `abba_ms`); goal: at least 10x faster than the baseline;
- wall time of LangChain's standard suite for deepagents sandboxes
  (`SandboxIntegrationTests`, with this project's strict xfails from
  tests/integration/test_deepagents_standard.py) on each backend, one pytest process
  each, timed from the end of collection to the end of the session (interpreter
  start-up and imports, the same for both, left out), StigmerSandbox first, each under
  a /tmp folder of its own. The figure's name and its baseline's carry each run's
  outcome counts (passed, xfailed, failed, and any errors, xpasses or skips).

    python benchmarks/deepagents_backend.py [--runs N]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker_exec_backend
import pytest
from _common import ROOT, abba_ms, count_option, percentiles, report, report_latency

from stigmer_sandbox import config
from stigmer_sandbox.runtime import Sandbox

STIGMER = "StigmerSandbox"
BASELINE = "docker-exec"
SPEEDUP_GOAL = 10.0
# What the pytest process reads: which backend, on which container, and where to write.
BACKEND_VAR = "STIGMER_BENCH_BACKEND"
CONTAINER_VAR = "STIGMER_BENCH_CONTAINER"
RESULT_VAR = "STIGMER_BENCH_RESULT"
OUTCOMES = ("passed", "xfailed", "failed", "error", "xpassed", "skipped")
SHOWN_ALWAYS = ("passed", "xfailed", "failed")

SUITE_FILES = {
    "pytest.ini": """\
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
""",
    "conftest.py": (
        "from deepagents_backend import pytest_collection_finish, pytest_sessionfinish\n"
    ),
    "test_standard_suite.py": """\
import pytest

import tests.integration.test_deepagents_standard as standard
from deepagents_backend import backend_from_env, suite_root


class TestBackend(standard.TestStigmerSandboxStandard):
    @property
    def sandbox_root_dir(self):
        return suite_root()

    @pytest.fixture(scope="class")
    @classmethod
    def sandbox(cls):
        with backend_from_env() as backend:
            yield backend
""",
}


_suite_started: list[float] = []


def pytest_collection_finish(session: pytest.Session) -> None:
    """In the suite's pytest process (its conftest imports these hooks): the clock starts."""
    _suite_started.append(time.perf_counter())


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In the suite's pytest process: the wall time since collection and the outcomes."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    stats = reporter.stats if reporter else {}
    seconds = time.perf_counter() - _suite_started[0] if _suite_started else None
    counts = {key: len(value) for key, value in stats.items() if key}
    Path(os.environ[RESULT_VAR]).write_text(json.dumps({"seconds": seconds, "counts": counts}))


@contextmanager
def open_backend(kind: str, container: str) -> Iterator[Any]:
    """A deepagents backend of `kind` on the running sandbox `container`."""
    if kind == STIGMER:
        from stigmer_sandbox.integrations.deepagents import StigmerSandbox

        backend = StigmerSandbox(Sandbox(config.load_settings(ROOT), name=container))
    else:
        backend = docker_exec_backend.attach(container)
    try:
        yield backend
    finally:
        backend.close()


def suite_root() -> str:
    """The suite's folder in the sandbox: one per backend, so neither meets the other's
    files (nor its owner: the backends run commands as different users)."""
    return f"/tmp/test_sandbox_ops-{os.environ[BACKEND_VAR]}/"


@contextmanager
def backend_from_env() -> Iterator[Any]:
    """The backend the pytest process was started for (see `run_suite`)."""
    with open_backend(os.environ[BACKEND_VAR], os.environ[CONTAINER_VAR]) as backend:
        yield backend


def run_suite(kind: str, container: str) -> tuple[float, dict[str, int]]:
    """Seconds the standard suite takes on `kind` on `container`, and its outcome counts."""
    with tempfile.TemporaryDirectory(prefix="bench-deepagents-") as folder:
        for name, text in SUITE_FILES.items():
            (Path(folder) / name).write_text(text, encoding="utf-8")
        result = Path(folder) / "result.json"
        path = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])
        env = {
            **os.environ,
            "PYTHONPATH": path,
            BACKEND_VAR: kind,
            CONTAINER_VAR: container,
            RESULT_VAR: str(result),
        }
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", folder],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        summary = done.stdout.strip().splitlines()[-1:] or ["no output"]
        print(f"{kind}: pytest exit {done.returncode}: {summary[0]}", flush=True)
        if not result.exists() or done.returncode not in (0, 1):
            raise SystemExit(f"the suite did not run on {kind}:\n{done.stdout[-3000:]}")
        measured = json.loads(result.read_text(encoding="utf-8"))
    counts = {key: int(measured["counts"].get(key, 0)) for key in OUTCOMES}
    return float(measured["seconds"]), counts


def speedup_goal(baseline_ms: float) -> str:
    """The goal as `run_all` checks it: at most the baseline's time / SPEEDUP_GOAL."""
    return f"<= {baseline_ms / SPEEDUP_GOAL:.3f} ms ({SPEEDUP_GOAL:g}x faster)"


def outcome(kind: str, counts: dict[str, int]) -> str:
    shown = [f"{counts[key]} {key}" for key in OUTCOMES if counts[key] or key in SHOWN_ALWAYS]
    return f"{kind} ({', '.join(shown)})"


def main(runs: int) -> None:
    docker_exec_backend.install()  # before anything is timed
    with Sandbox.create_ephemeral(config.load_settings(ROOT)) as box:
        with open_backend(STIGMER, box.name) as ours, open_backend(BASELINE, box.name) as base:
            for backend in (ours, base):
                check = backend.execute("true")
                if check.exit_code != 0:
                    raise SystemExit(f"execute('true') failed on {backend}: {check.output}")
            samples = abba_ms(
                {STIGMER: lambda: ours.execute("true"), BASELINE: lambda: base.execute("true")},
                runs,
            )
        suite = {kind: run_suite(kind, box.name) for kind in (STIGMER, BASELINE)}
    ours_p, base_p = percentiles(samples[STIGMER]), percentiles(samples[BASELINE])
    goals = (speedup_goal(base_p[0]), speedup_goal(base_p[1]))
    report_latency(
        f"{STIGMER}.execute('true')",
        samples[STIGMER],
        docker_exec_backend.LABEL,
        samples[BASELINE],
        goals=goals,
    )
    for label, ours_ms, base_ms in zip(("p50", "p95"), ours_p, base_p, strict=True):
        met = "met" if ours_ms * SPEEDUP_GOAL <= base_ms else "NOT met"
        speedup = f"{base_ms / ours_ms:.1f}x faster"
        print(f"  {label}: {speedup}, goal {SPEEDUP_GOAL:g}x {met}", flush=True)
    (ours_s, ours_counts), (base_s, base_counts) = suite[STIGMER], suite[BASELINE]
    report(
        f"SandboxIntegrationTests wall time, {outcome(STIGMER, ours_counts)}",
        ours_s,
        f"same suite on {outcome(docker_exec_backend.LABEL, base_counts)}",
        base_s,
        "s",
    )


if __name__ == "__main__":
    main(count_option(__doc__, "runs", 300, "timed execute('true') calls per backend"))
