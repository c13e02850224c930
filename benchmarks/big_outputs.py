"""No command delays another: a small command's latency while others return 64 MiB each.

Four commands each print 64 MiB of base64 text (86 MB per stream) with `output_limit` at the
64 MiB cap, at the same time, on one warm sandbox; meanwhile `echo hi` runs in a loop.
Figures, each beside its baseline from the same run:
- `echo hi` p50 and worst case during the flood vs `echo hi` on the same sandbox idle;
- the flood's throughput (MB/s of output delivered to the caller) vs the same four
  commands through the SDK's `exec_run` (one `docker exec` each, output read whole).

    python benchmarks/big_outputs.py [--rounds N]
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from _common import ROOT, count_option, report, timed

from stigmer_sandbox import config
from stigmer_sandbox.runtime import Sandbox

FLOOD = 4
LIMIT = 64 << 20
BIG = f"head -c {LIMIT} /dev/urandom | base64 -w0"
PAUSE_S = 0.02


def probe_while(box: Sandbox, busy: threading.Event) -> list[float]:
    """Milliseconds of each `echo hi` run while `busy` is set."""
    samples = []
    while busy.is_set():
        samples.append(timed(lambda: box.exec("echo hi")) * 1000)
        time.sleep(PAUSE_S)
    return samples


def flood(run_one) -> float:
    """MB/s of output the four big commands deliver together."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=FLOOD) as pool:
        sizes = list(pool.map(lambda _i: run_one(), range(FLOOD)))
    return sum(sizes) / 1e6 / (time.perf_counter() - started)


def main(rounds: int) -> None:
    with Sandbox.create_ephemeral(config.load_settings(ROOT)) as box:
        box.exec("true")
        idle = [timed(lambda: box.exec("echo hi")) * 1000 for _ in range(50)]
        during: list[float] = []
        rates = []
        for _round in range(rounds):
            busy = threading.Event()
            busy.set()
            prober = ThreadPoolExecutor(max_workers=1)
            probes = prober.submit(probe_while, box, busy)
            rates.append(flood(lambda: len(box.exec(BIG, output_limit=LIMIT).stdout)))
            busy.clear()
            during += probes.result()
            prober.shutdown()
        container = box.find()
        sdk_rate = flood(lambda: len(container.exec_run(["bash", "-c", BIG]).output))
    report(
        f"echo hi p50 while {FLOOD} commands return 64 MiB each",
        statistics.median(during),
        "echo hi p50 on the idle sandbox",
        statistics.median(idle),
        "ms",
    )
    report(
        f"echo hi worst of {len(during)} while {FLOOD} commands return 64 MiB each",
        max(during),
        "echo hi worst on the idle sandbox",
        max(idle),
        "ms",
        goal="<= 200 ms",
    )
    report(
        f"{FLOOD} x 64 MiB results delivered",
        statistics.median(rates),
        "the same through SDK exec_run",
        sdk_rate,
        "MB/s",
    )


if __name__ == "__main__":
    main(count_option(__doc__, "rounds", 2, "floods of four big commands"))
