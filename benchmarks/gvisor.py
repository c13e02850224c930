"""gVisor (`isolation: gvisor`) beside the engine's runc, in the same run (issue 23).

- start: `Sandbox.create_ephemeral(...).up()` and its first command;
- `Sandbox.exec('true')` p50 on a warm sandbox;
- a CPU-bound loop (3M additions in Python) and a system-call-heavy one (100k `os.stat`),
  timed inside the sandbox, so only the kernel each runs on differs;
- `pause()` + `resume()` p50;
- `fork()` of a warm sandbox and the fork's first command (median of 3);
- `pip install` of a mid-size package from the package index, no cache (requests and its
  four dependencies, into a fresh folder; median of 3): the network is the same for both,
  what differs is unpacking, compiling bytecode and writing ~2k files.

Skips (exit 0, one line) when the engine has no gVisor runtime (`inv engine.install
--gvisor`). Checkpoints are not measured: they need the engine's experimental mode.

    python benchmarks/gvisor.py [--runs N]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from _common import ROOT, count_option, report, timed

from stigmer_sandbox import config, engine, isolation
from stigmer_sandbox.runtime import Sandbox

LABELS = {"com.stigmer.sandbox.bench": "gvisor"}
TIMED = "import os, time\nt = time.perf_counter()\n{loop}\nprint(time.perf_counter() - t)"
CPU = TIMED.format(loop="s = 0\nfor i in range(3_000_000): s += i")
SYSCALLS = TIMED.format(loop="for _ in range(100_000): os.stat('/')")
CHOICES = ("container", "gvisor")
PIP = "pip install -q --no-cache-dir --disable-pip-version-check --target /tmp/pip-{n} requests"


def pip_install_ms(box: Sandbox, n: int) -> float:
    began = time.perf_counter()
    done = box.exec(PIP.format(n=n), timeout=600)
    if done.exit_code != 0:
        raise SystemExit(f"gvisor benchmark: pip install failed: {done.stderr[-300:]}")
    return (time.perf_counter() - began) * 1000


def fork_ms(box: Sandbox) -> float:
    began = time.perf_counter()
    with box.fork(extra_labels=LABELS) as forked:
        forked.exec("true")
        return (time.perf_counter() - began) * 1000


def inside_ms(box: Sandbox, code: str) -> float:
    return float(box.exec(["python3", "-c", code], timeout=300).stdout) * 1000


def started_ms(settings: config.Settings, choice: str) -> float:
    began = time.perf_counter()
    box = Sandbox.create_ephemeral(settings, extra_labels=LABELS, isolation=choice)
    try:
        box.up()
        box.exec("true")
        return (time.perf_counter() - began) * 1000
    finally:
        box.remove()


def main(runs: int) -> None:
    why = isolation.unusable_reason(engine.client().info())
    if why:
        print(f"gvisor: skipped: {why} ({isolation.INSTALL_HINT})")
        return
    with tempfile.TemporaryDirectory(prefix="stigmer-bench-gvisor-") as scratch:
        folders = {k: str(Path(scratch) / k) for k in ("workspace", "logs", "state_dir")}
        settings = config.load_settings(ROOT).replace(**folders)
        starts: dict[str, list[float]] = {c: [] for c in CHOICES}
        for choice in [*CHOICES, *reversed(CHOICES)] * max(1, runs // 10):
            starts[choice].append(started_ms(settings, choice))
        figures: dict[str, dict[str, float]] = {c: {} for c in CHOICES}
        for choice in CHOICES:
            with Sandbox.create_ephemeral(settings, extra_labels=LABELS, isolation=choice) as box:
                box.exec("true")
                figures[choice]["exec('true') p50"] = statistics.median(
                    timed(lambda: box.exec("true")) * 1000 for _ in range(runs * 5)
                )
                figures[choice]["CPU loop (3M additions)"] = statistics.median(
                    inside_ms(box, CPU) for _ in range(3)
                )
                figures[choice]["system calls (100k stat)"] = statistics.median(
                    inside_ms(box, SYSCALLS) for _ in range(3)
                )
                figures[choice]["pause() + resume() p50"] = statistics.median(
                    timed(lambda: (box.pause(), box.resume())) * 1000 for _ in range(runs)
                )
                figures[choice]["fork() + first command"] = statistics.median(
                    fork_ms(box) for _ in range(3)
                )
                figures[choice]["pip install requests (5 packages, no cache)"] = statistics.median(
                    pip_install_ms(box, n) for n in range(3)
                )
        report(
            "gvisor: start + first command",
            statistics.median(starts["gvisor"]),
            "the same under runc",
            statistics.median(starts["container"]),
            "ms",
        )
        for figure, value in figures["gvisor"].items():
            report(
                f"gvisor: {figure}",
                value,
                "the same under runc",
                figures["container"][figure],
                "ms",
            )


if __name__ == "__main__":
    main(count_option(__doc__, "runs", 20, "samples per figure (starts: runs // 10 rounds)"))
