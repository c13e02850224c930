"""Start-up: `inv --list` of this project beside Invoke listing an empty collection,
and the second (no-op) `inv dev-full` beside the guide's manual equivalent (a cached
`docker build` plus its test-sandbox.sh).

    python benchmarks/startup.py [--runs N]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _common import INV, ROOT, count_option, guide_build_context, median_of, report, run, timed

TAG = "stigmer-sandbox-bench:cached"


def main(runs: int) -> None:
    ours = median_of(lambda: run([*INV, "--list"]), runs)
    with tempfile.TemporaryDirectory() as empty:
        (Path(empty) / "tasks.py").write_text(
            "from invoke import task\n\n\n@task\ndef noop(c):\n    pass\n"
        )
        bare = median_of(lambda: run([*INV, "--list"], cwd=Path(empty)), runs)
    report("inv --list start-up", ours, "invoke --list, one empty task", bare, "s")

    run([*INV, "dev-full"])
    again = timed(lambda: run([*INV, "dev-full"]))
    guide_test = ["bash", str(ROOT / "tests/integration/guide/test-sandbox.sh")]
    with guide_build_context() as build:
        cached = [*build, "-t", TAG, "."]
        context, legacy = ROOT / "dockerfiles", {"DOCKER_BUILDKIT": "0"}
        run(cached, cwd=context, env=legacy)  # warm the CLI's cache first
        guide = timed(lambda: (run(cached, cwd=context, env=legacy), run(guide_test)))
    run(["docker", "rmi", TAG])
    report(
        "inv dev-full, second run (nothing changed)",
        again,
        "guide: cached docker build + test-sandbox.sh",
        guide,
        "s",
        goal="< 10 s",
    )


if __name__ == "__main__":
    main(count_option(__doc__, "runs", 7, "timed runs each"))
