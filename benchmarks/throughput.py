"""Commands per second on one warm sandbox, and how that scales with concurrency.

Baseline: the SDK's `exec_run` (one `docker exec` per command) at the same
concurrency on the same sandbox.

    python benchmarks/throughput.py [--commands N]
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from _common import ROOT, count_option, report

from stigmer_sandbox import config
from stigmer_sandbox.runtime import Sandbox

LEVELS = (1, 4, 16)


def rate(action, commands: int, workers: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda _i: action(), range(commands)))
    return commands / (time.perf_counter() - started)


def main(commands: int) -> None:
    with Sandbox.create_ephemeral(config.load_settings(ROOT)) as box:
        container = box.find()
        box.exec("true")
        single = None
        for workers in LEVELS:
            ours = rate(lambda: box.exec(["true"]), commands, workers)
            sdk = rate(lambda: container.exec_run(["true"]), max(commands // 5, 20), workers)
            single = single or ours
            report(
                f"commands/s on one sandbox, concurrency {workers}",
                ours,
                "SDK exec_run, same concurrency",
                sdk,
                "cmd/s",
            )
        report(
            f"scaling from 1 to {LEVELS[-1]} concurrent callers",
            ours / single,
            "ideal on 2 cores",
            2.0,
            "x",
        )


if __name__ == "__main__":
    main(count_option(__doc__, "commands", 400, "commands per level"))
