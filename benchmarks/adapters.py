"""The framework adapters' overhead (issue 24): the inspect_ai provider and the
mini-swe-agent environment beside `Sandbox`.

- One `echo hi` (argv, no shell) through the provider's `exec` beside `Sandbox.exec` on
  the same sandbox, p50 and p95, in blocks of calls A B B A (see `abba_ms`); the
  provider's path adds a worker thread, the request built for cancellation and the
  mapping to inspect's `ExecResult`. Goal: within 1.2x.
- One `echo hi` through the mini-swe-agent environment's `execute` (its default config:
  `bash -lc`, merged output, the result as mini-swe-agent's dict) beside `Sandbox.exec` of
  the same argv on the same sandbox (the adapter's cost; goal: within 1.2x), and beside
  `Sandbox.exec("echo hi")` (what the docker environment's login-shell default adds).
  Skipped, with a line saying so, when mini-swe-agent is not installed.
- inspect's sample start and teardown through the provider (`sample_init` from a warm
  pool, `sample_cleanup` releasing to it; the pool refilled before each start) beside
  the same done without a pool: a cold ephemeral `Sandbox.up()` + `connect()`, and its
  `remove()`, each a median of `--runs`.

Everything runs under a scratch state folder and workspace, with the label
`stigmer-bench.run`, and is removed at the end, also on failure.

    python benchmarks/adapters.py [--runs N]
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import statistics
import tempfile
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from _common import ROOT, abba_ms, count_option, percentiles, report, report_latency, timed

from stigmer_sandbox import config
from stigmer_sandbox.integrations import inspect_ai as provider
from stigmer_sandbox.integrations.inspect_ai import (
    StigmerSandboxConfig,
    StigmerSandboxEnvironment,
)
from stigmer_sandbox.runtime import Sandbox

RUN = uuid.uuid4().hex[:8]
MARKS = {"stigmer-bench.run": RUN}
ECHO = ["echo", "hi"]
ECHO_CALLS = 200
T = TypeVar("T")


class Loop:
    """One event loop for every async call of the run (as inspect keeps one)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def close(self) -> None:
        self.loop.close()


def echo_overhead(loop: Loop, environment: StigmerSandboxEnvironment) -> None:
    """One `echo` through the provider beside `Sandbox.exec`, on its sandbox."""
    sandbox = environment.sandbox

    def through_provider() -> None:
        done = loop.run(environment.exec(ECHO))
        assert done.stdout == "hi\n", done

    def direct() -> None:
        done = sandbox.exec(ECHO)
        assert done.stdout == "hi\n", done

    name = "inspect provider exec(['echo', 'hi'])"
    samples = abba_ms({name: through_provider, "Sandbox.exec": direct}, ECHO_CALLS)
    report_latency(
        name,
        samples[name],
        "Sandbox.exec(['echo', 'hi']) same sandbox",
        samples["Sandbox.exec"],
        goals=("ratio <= 1.2", ""),
    )


def swe_echo_overhead(sandbox: Sandbox) -> None:
    """One `echo` through the mini-swe-agent environment beside `Sandbox.exec`, on `sandbox`."""
    if importlib.util.find_spec("minisweagent") is None:
        print("mini-swe-agent environment: skipped (mini-swe-agent is not installed)")
        return
    os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")  # its banner, printed on import
    from stigmer_sandbox.integrations.minisweagent import StigmerEnvironment

    environment = StigmerEnvironment(sandbox=sandbox)  # the caller's sandbox: left running
    argv = [*environment.config.interpreter, "echo hi"]

    def through_environment() -> None:
        done = environment.execute({"command": "echo hi"})
        assert done["output"] == "hi\n", done

    def same_argv() -> None:
        done = sandbox.exec(argv, merge_output=True)
        assert done.stdout == "hi\n", done

    def plain() -> None:
        done = sandbox.exec("echo hi")
        assert done.stdout == "hi\n", done

    name = "mini-swe-agent environment execute({'command': 'echo hi'})"
    actions = {name: through_environment, "same argv": same_argv, "plain": plain}
    samples = abba_ms(actions, ECHO_CALLS)
    p50 = {key: percentiles(values)[0] for key, values in samples.items()}
    report(
        f"{name} p50",
        p50[name],
        f"Sandbox.exec({argv!r}) same sandbox",
        p50["same argv"],
        "ms",
        goal="ratio <= 1.2",
    )
    report(f"{name} p50", p50[name], "Sandbox.exec('echo hi') (bash -c)", p50["plain"], "ms")


def sample_lifecycle(loop: Loop, bench_config: StigmerSandboxConfig, runs: int) -> None:
    """inspect's sample start and teardown from a warm pool, beside a cold start and a
    removal per sample."""
    env = StigmerSandboxEnvironment
    pool = provider.pool_for(provider.resolved_config(bench_config), False)
    starts, ends = [], []
    for _ in range(runs):
        pool.wait_ready()  # the pool refilled: each sample starts as a warm pool allows
        box: dict[str, Any] = {}

        def start(box: dict[str, Any] = box) -> None:
            box.update(loop.run(env.sample_init("bench", bench_config, {})))

        starts.append(timed(start))
        assert loop.run(box["default"].exec(ECHO)).stdout == "hi\n"
        ends.append(
            timed(lambda box=box: loop.run(env.sample_cleanup("bench", bench_config, box, False)))
        )

    settings = provider.settings_for(provider.resolved_config(bench_config))
    cold_starts, removals = [], []
    for _ in range(runs):
        sandbox = Sandbox.create_ephemeral(settings, extra_labels=MARKS)
        try:
            cold_starts.append(timed(lambda sandbox=sandbox: sandbox.up().connect()))
            assert sandbox.exec(ECHO).stdout == "hi\n"
        finally:
            removals.append(timed(sandbox.remove))
    report(
        f"inspect sample_init from a warm pool (median of {runs})",
        statistics.median(starts) * 1000,
        "cold Sandbox.up() + connect() per sample",
        statistics.median(cold_starts) * 1000,
        "ms",
        goal="ratio <= 0.1",
    )
    report(
        f"inspect sample_cleanup, released to the pool (median of {runs})",
        statistics.median(ends) * 1000,
        "Sandbox.remove() per sample",
        statistics.median(removals) * 1000,
        "ms",
    )


def main(runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="stigmer-bench-adapters-") as scratch:
        folders = {key: str(Path(scratch) / key) for key in ("workspace", "logs", "state_dir")}
        bench_config = StigmerSandboxConfig(
            pool_size=1, labels=MARKS, project_dir=str(ROOT), settings=folders
        )
        config.load_settings(ROOT)  # a bad project config stops here, before anything starts
        loop = Loop()
        env = StigmerSandboxEnvironment
        try:
            loop.run(env.task_init("startup", bench_config))
            environments = loop.run(env.sample_init("bench", bench_config, {}))
            try:
                echo_overhead(loop, environments["default"])
                swe_echo_overhead(environments["default"].sandbox)
            finally:
                loop.run(env.sample_cleanup("bench", bench_config, environments, False))
            sample_lifecycle(loop, bench_config, runs)
        finally:
            loop.run(env.task_cleanup("shutdown", bench_config, True))
            loop.close()


if __name__ == "__main__":
    main(count_option(__doc__, "runs", 5, "timed sample starts and teardowns of each kind"))
