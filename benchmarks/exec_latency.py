"""Command latency on a warm sandbox, sandbox start, and `inv run` end to end.

Figures, each beside its baseline from the same run:
- p50/p95 of `Sandbox.exec("true")` vs `docker exec` (CLI) and the SDK's `exec_run`,
  all on the same warm sandbox;
- sandbox start (`Sandbox.up()` from nothing to ready) vs `docker run --rm IMAGE true`;
- `inv run "true"` end to end vs `docker run --rm IMAGE true`.

    python benchmarks/exec_latency.py [--runs N]
"""

from __future__ import annotations

import shutil
import statistics

from _common import INV, ROOT, count_option, median_of, report, run, timed

from stigmer_sandbox import config
from stigmer_sandbox.runtime import Sandbox


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(0.95 * (len(ordered) - 1))]


def sample(action, runs: int) -> list[float]:
    action()  # warm-up
    return [timed(action) * 1000 for _ in range(runs)]


def main(runs: int) -> None:
    settings = config.load_settings(ROOT)
    docker = shutil.which("docker")
    if docker is None:
        raise SystemExit("the docker CLI is needed for the baselines")
    docker_run = [docker, "run", "--rm", settings.image, "true"]
    start_ms = []
    for _ in range(5):
        box = Sandbox.create_ephemeral(settings)
        start_ms.append(timed(box.up) * 1000)
        box.remove()
    run_baseline = median_of(lambda: run(docker_run), 5) * 1000
    report(
        "sandbox start (Sandbox.up, median of 5)",
        statistics.median(start_ms),
        "docker run --rm IMAGE true",
        run_baseline,
        "ms",
    )
    with Sandbox.create_ephemeral(settings) as box:
        ours = sample(lambda: box.exec("true"), runs)
        cli = sample(lambda: run([docker, "exec", box.name, "true"]), runs)
        container = box.find()
        sdk = sample(lambda: container.exec_run(["true"]), runs)
    for label, index in (("p50", 0), ("p95", 1)):
        value = percentiles(ours)[index]
        goal = "<= 5 ms" if index == 0 else "<= 10 ms"
        report(
            f"Sandbox.exec('true') {label}",
            value,
            "docker exec (CLI)",
            percentiles(cli)[index],
            "ms",
            goal=goal,
        )
        report(
            f"Sandbox.exec('true') {label}",
            value,
            "SDK exec_run",
            percentiles(sdk)[index],
            "ms",
            goal=goal,
        )
    run([*INV, "sandbox.up"])
    inv_run = median_of(lambda: run([*INV, "run", "true"]), 5) * 1000
    report(
        "inv run 'true' end to end (median of 5)",
        inv_run,
        "docker run --rm IMAGE true",
        run_baseline,
        "ms",
    )


if __name__ == "__main__":
    main(count_option(__doc__, "runs", 300, "timed commands each"))
