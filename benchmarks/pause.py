"""Pause and resume with memory kept (issue 23), beside what they replace, in the same run.

- `Sandbox.pause()` and `resume()` (p50) of a sandbox whose background process holds
  100 MB and 1 GB resident, beside `stop()` + `up()` of the same sandbox (what a pool or a
  caller does without pause: the memory is lost, every process restarts).
- A pool of 4 waiting sandboxes over 10 s: CPU time they use (the engine's cgroup counter,
  read on the host) with `pause_idle` beside the same pool running.
- `acquire()` + the first command from a pool with `pause_idle` beside the same from a
  running pool.

Everything runs under a scratch state folder and workspace and is removed at the end.

    python benchmarks/pause.py [--runs N]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from _common import ROOT, count_option, report, timed

from stigmer_sandbox import config
from stigmer_sandbox.runtime import Sandbox, SandboxPool

LABELS = {"com.stigmer.sandbox.bench": "pause"}
HOLD = "import time; b = bytearray({size}); b[::4096] = b'x' * len(b[::4096]); time.sleep(10**6)"
CPU_USAGE = "/sys/fs/cgroup/cpuacct/docker/{id}/cpuacct.usage"
IDLE_S = 10.0
POOL = 4


def pause_figures(settings: config.Settings, runs: int) -> None:
    for label, size in (("100 MB", 100 * 2**20), ("1 GB", 2**30)):
        with Sandbox.create_ephemeral(settings, extra_labels=LABELS) as box:
            box.start(["python3", "-c", HOLD.format(size=size)])
            time.sleep(2 if size > 2**28 else 0.5)  # the memory is touched
            pauses, resumes, restarts = [], [], []
            for _ in range(runs):
                pauses.append(timed(box.pause) * 1000)
                resumes.append(timed(box.resume) * 1000)
            for _ in range(max(3, runs // 5)):
                restarts.append(timed(lambda: (box.stop(), box.up())) * 1000)
            restart = statistics.median(restarts)
            for what, samples in (("pause", pauses), ("resume", resumes)):
                report(
                    f"Sandbox.{what}() p50, {label} resident",
                    statistics.median(samples),
                    "stop() + up() of the same sandbox (memory lost)",
                    restart,
                    "ms",
                )


def cpu_ns(pool: SandboxPool) -> int:
    total = 0
    for box in list(pool._ready):
        path = Path(CPU_USAGE.format(id=box.find().id))
        total += int(path.read_text()) if path.exists() else 0
    return total


def idle_cpu_ms(settings: config.Settings, pause_idle: bool) -> float:
    with SandboxPool(POOL, settings=settings, extra_labels=LABELS, pause_idle=pause_idle) as pool:
        pool.wait_ready()
        time.sleep(2)  # starts settled
        before = cpu_ns(pool)
        time.sleep(IDLE_S)
        return (cpu_ns(pool) - before) / 1e6


def acquire_ms(settings: config.Settings, pause_idle: bool, runs: int) -> list[float]:
    samples = []
    with SandboxPool(1, settings=settings, extra_labels=LABELS, pause_idle=pause_idle) as pool:
        for _ in range(runs):
            pool.wait_ready()
            time.sleep(0.5)
            began = time.perf_counter()
            box = pool.acquire()
            box.exec("true")
            samples.append((time.perf_counter() - began) * 1000)
            pool.release(box)
    return samples


def main(runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="stigmer-bench-pause-") as scratch:
        folders = {k: str(Path(scratch) / k) for k in ("workspace", "logs", "state_dir")}
        settings = config.load_settings(ROOT).replace(**folders)
        pause_figures(settings, runs)
        paused, running = idle_cpu_ms(settings, True), idle_cpu_ms(settings, False)
        report(
            f"CPU used by a pool of {POOL} waiting sandboxes over {IDLE_S:.0f} s, pause_idle",
            paused,
            "the same pool running",
            running,
            "ms",
        )
        with_pause = acquire_ms(settings, True, max(5, runs // 4))
        without = acquire_ms(settings, False, max(5, runs // 4))
        report(
            "pool acquire() + first command p50, pause_idle",
            statistics.median(with_pause),
            "the same from a running pool",
            statistics.median(without),
            "ms",
        )


if __name__ == "__main__":
    main(count_option(__doc__, "runs", 20, "pause/resume rounds per size"))
