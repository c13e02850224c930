"""Shared benchmark plumbing: timing, medians, and one result line per figure.

Every figure is printed beside a baseline measured in the same run, with the
ratio, because these machines are noisy and only ratios compare across runs.
Set BENCH_JSON=path to also append the results as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INV = [sys.executable, "-m", "invoke"]


def count_option(doc: str, name: str, default: int, meaning: str) -> int:
    """The one integer option a benchmark takes (`--runs`, `--commands`), from argv."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument(
        f"--{name}", type=int, default=default, help=f"{meaning} (default: {default})"
    )
    return int(getattr(parser.parse_args(), name))


def timed(action: Callable[[], object]) -> float:
    """Seconds one call of `action` takes."""
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def median_of(action: Callable[[], object], runs: int) -> float:
    """Median seconds over `runs` calls."""
    return statistics.median(timed(action) for _ in range(runs))


def run(argv: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    """Run a command that must succeed; its stdout."""
    done = subprocess.run(
        argv,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "NO_COLOR": "1", **(env or {})},
    )
    if done.returncode != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(argv)}\n{done.stderr[-2000:]}")
    return done.stdout


@contextmanager
def guide_build_context() -> Iterator[list[str]]:
    """The guide's `docker build` command, run in dockerfiles/ with the extra CA placed
    where the build task injects it, so both see the same context (and the same cache)."""
    from stigmer_sandbox import config, images
    from stigmer_sandbox.images import ca

    settings = config.load_settings(ROOT)
    extra = ca.detect(settings.ca_cert)
    placed = ROOT / images.CONTEXT_DIR / images.CA_CONTEXT_PATH
    if extra:
        shutil.copyfile(extra.path, placed)
    docker = shutil.which("docker")
    if docker is None:
        raise SystemExit("the docker CLI is needed for the baseline")
    try:
        yield [
            docker,
            "build",
            "-q",
            "-f",
            "Dockerfile.sandbox.basic",
            "--build-arg",
            f"BASE_IMAGE={settings.base_image}",
        ]
    finally:
        placed.unlink(missing_ok=True)


def report(
    figure: str, value: float, baseline_name: str, baseline: float, unit: str, *, goal: str = ""
) -> None:
    """One line: the figure, its baseline, their ratio and the goal."""
    ratio = value / baseline if baseline else float("nan")
    line = (
        f"{figure}: {value:.3f} {unit} | baseline {baseline_name}: {baseline:.3f} {unit} | "
        f"ratio {ratio:.3g}" + (f" | goal {goal}" if goal else "")
    )
    print(line, flush=True)
    target = os.environ.get("BENCH_JSON")
    if target:
        with open(target, "a", encoding="utf-8") as out:
            out.write(
                json.dumps(
                    {
                        "figure": figure,
                        "value": value,
                        "unit": unit,
                        "baseline_name": baseline_name,
                        "baseline": baseline,
                        "ratio": ratio,
                        "goal": goal,
                        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpu",
                    }
                )
                + "\n"
            )


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p95 of `samples`."""
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(0.95 * (len(ordered) - 1))]


def abba_ms(actions: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    """Milliseconds per call of each action, `runs` calls each, in blocks taken in the order
    A B ... B A: drift on a noisy machine falls on all alike, and no timed call comes right
    after another action's (whose after-effects, such as the engine tearing down a
    `docker exec`, would land on it); each block starts with an untimed call."""
    samples: dict[str, list[float]] = {name: [] for name in actions}
    for turn, name in enumerate([*actions, *reversed(actions)]):
        action = actions[name]
        action()
        count = runs // 2 if turn < len(actions) else runs - runs // 2
        samples[name].extend(timed(action) * 1000 for _ in range(count))
    return samples


def docker_cli() -> str:
    """The docker CLI's path: the client the baselines run."""
    docker = shutil.which("docker")
    if docker is None:
        raise SystemExit("the docker CLI is needed for the baselines")
    return docker


def report_latency(
    figure: str,
    ours: list[float],
    baseline_name: str,
    baseline: list[float],
    *,
    goals: tuple[str, str] = ("", ""),
) -> None:
    """Two lines, p50 and p95 of `ours` beside the same percentile of `baseline` (both in
    milliseconds per call), with the goal for each (`goals`: p50's, p95's)."""
    for label, index in (("p50", 0), ("p95", 1)):
        report(
            f"{figure} {label}",
            percentiles(ours)[index],
            baseline_name,
            percentiles(baseline)[index],
            "ms",
            goal=goals[index],
        )


def standin_certificates(folder: Path, names: list[str], addresses: list[str]) -> None:
    """A throw-away CA and server certificate for a benchmark's own TLS server (the
    tests' helper, `tests/tls_standin.py`)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.tls_standin import make_certificates

    make_certificates(folder, names, addresses)
