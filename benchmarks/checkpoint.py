"""Checkpoint and restore with memory under gVisor (issue 23 item 4), beside what they
replace, in the same run.

For a sandbox (isolation gvisor, egress none) whose background process holds 100 MB and
1 GB resident:
- `checkpoints.create` (p50): the engine's checkpoint alone and the whole call (commit of
  the filesystem, copies of the workspace and the memory, the source restarted from it),
  and the checkpoint's size on disk;
- `checkpoints.restore` into a new sandbox, until its first command answers (p50);
beside `stop()` + `up()` of the same sandbox (the memory is lost, every process starts
again) and its `pause()` + `resume()` (memory kept, nothing written).

Needs an engine in experimental mode with the runtime stigmer-gvisor-nonet (skips with
the reason otherwise). An engine run with its own `--exec-root`: name runsc's state folder
in STIGMER_TEST_RUNSC_ROOT. Everything runs under a scratch state folder and is removed.

    python benchmarks/checkpoint.py [--runs N]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import ROOT, count_option, report, timed

from stigmer_sandbox import config, isolation
from stigmer_sandbox.errors import SandboxError
from stigmer_sandbox.runtime import Sandbox, checkpoints

LABELS = {"com.stigmer.sandbox.bench": "checkpoint"}
HOLD = "import time; b = bytearray({size}); b[::4096] = b'x' * len(b[::4096]); time.sleep(10**6)"
SIZES = (("100 MB", 100 * 2**20), ("1 GB", 2**30))


def held_box(settings: config.Settings, size: int) -> Sandbox:
    box = Sandbox.create_ephemeral(settings, extra_labels=LABELS, isolation="gvisor", egress="none")
    box.up().start(["python3", "-c", HOLD.format(size=size)])
    time.sleep(3 if size > 2**28 else 1)  # the memory is touched
    return box


def figures(settings: config.Settings, label: str, size: int, runs: int) -> None:
    engine_s, whole_s, restore_s, sizes = [], [], [], []
    for _ in range(runs):  # a sandbox each: one started from a checkpoint cannot take another
        box = held_box(settings, size)
        name = checkpoints.unique_name("bench")
        try:
            made = checkpoints.create(box, name)
            engine_s.append(made["seconds"] * 1000)
            whole_s.append(made["total_seconds"] * 1000)
            sizes.append(made["bytes"] / 1e6)
            began = time.perf_counter()
            restored = checkpoints.restore(
                name, settings, sandbox_class=Sandbox, extra_labels=LABELS
            )
            restored.exec("true")
            restore_s.append((time.perf_counter() - began) * 1000)
            restored.remove()
        finally:
            box.remove()
            checkpoints.delete(settings, name)
    box = held_box(settings, size)
    try:
        restart = statistics.median(timed(lambda: (box.stop(), box.up())) * 1000 for _ in range(3))
        rounds = [timed(lambda: (box.pause(), box.resume())) * 1000 for _ in range(max(5, runs))]
    finally:
        box.remove()
    pause = statistics.median(rounds)
    for what, samples in (
        ("engine checkpoint p50", engine_s),
        ("checkpoints.create() p50", whole_s),
        ("checkpoints.restore() + first command p50", restore_s),
    ):
        median = statistics.median(samples)
        report(f"{what}, {label} resident", median, "stop() + up() (memory lost)", restart, "ms")
        report(f"{what}, {label} resident", median, "pause() + resume() (memory kept)", pause, "ms")
    report(
        f"checkpoint size, {label} resident", statistics.median(sizes), "resident", size / 1e6, "MB"
    )


def main(runs: int) -> None:
    root = os.environ.get("STIGMER_TEST_RUNSC_ROOT")
    if root:
        isolation.STATE_FOLDERS = (root, *isolation.STATE_FOLDERS)
    try:
        checkpoints.require_engine(isolation.OFFLINE_RUNTIME)
    except SandboxError as exc:
        print(f"skipped: {exc.message}")
        return
    with tempfile.TemporaryDirectory(prefix="stigmer-bench-checkpoint-") as scratch:
        folders = {k: str(Path(scratch) / k) for k in ("workspace", "logs", "state_dir")}
        settings = config.load_settings(ROOT).replace(**folders)
        for label, size in SIZES:
            figures(settings, label, size, runs)


if __name__ == "__main__":
    main(count_option(__doc__, "runs", 3, "checkpoint/restore rounds per size"))
