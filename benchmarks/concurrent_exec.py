"""Many commands at once on one warm sandbox: throughput beside `docker exec`.

Figure, beside its baseline from the same run: commands per second when 64 threads each
run `Sandbox.exec("true")` on one sandbox at the same time, vs 64 threads each running
`docker exec CONTAINER true` (the CLI) on the same sandbox. Rounds alternate A B ... B A
(each round: 64 commands started together, timed until the last one ends) and the
median round is reported; every command must exit 0.

    python benchmarks/concurrent_exec.py [--rounds N]
"""

from __future__ import annotations

import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from _common import ROOT, count_option, docker_cli, report

from stigmer_sandbox import config
from stigmer_sandbox.runtime import Sandbox

CONCURRENCY = 64


def round_rate(pool: ThreadPoolExecutor, command: Callable[[], int]) -> float:
    """Commands per second for CONCURRENCY copies of `command` released together."""
    gate = threading.Barrier(CONCURRENCY + 1)

    def one() -> int:
        gate.wait()
        return command()

    futures = [pool.submit(one) for _ in range(CONCURRENCY)]
    gate.wait()  # every thread is ready: the clock starts as they are let go
    started = time.perf_counter()
    codes = [future.result() for future in futures]
    elapsed = time.perf_counter() - started
    if any(codes):
        raise SystemExit(f"{sum(1 for code in codes if code)} commands failed; nothing measured")
    return CONCURRENCY / elapsed


def main(rounds: int) -> None:
    docker = docker_cli()
    with Sandbox.create_ephemeral(config.load_settings(ROOT)) as box:
        box.exec("true")  # connects the agent

        def ours() -> int:
            return box.exec("true").exit_code or 0

        def theirs() -> int:
            argv = [docker, "exec", box.name, "true"]
            return subprocess.run(argv, capture_output=True, check=False).returncode

        rates: dict[str, list[float]] = {"ours": [], "theirs": []}
        with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
            round_rate(pool, ours)  # warm-up: threads, warm helpers
            for turn in range(rounds):
                order = ("ours", "theirs") if turn % 2 == 0 else ("theirs", "ours")
                for name in order:
                    rates[name].append(round_rate(pool, ours if name == "ours" else theirs))
    report(
        f"{CONCURRENCY} concurrent Sandbox.exec('true') on one sandbox, throughput",
        statistics.median(rates["ours"]),
        f"{CONCURRENCY} concurrent docker exec CONTAINER true (CLI)",
        statistics.median(rates["theirs"]),
        "commands/s",
    )


if __name__ == "__main__":
    main(count_option(__doc__, "rounds", 6, "rounds of each (alternating)"))
