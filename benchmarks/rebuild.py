"""No-op rebuild: `inv sandbox.build-basic` with nothing changed, beside `docker build`.

The baseline is the guide's own command (`docker build -f Dockerfile.sandbox.basic ...`)
on the same unchanged Dockerfile and context with a warm layer cache, in the same run.

    python benchmarks/rebuild.py [--runs N]
"""

from __future__ import annotations

from _common import INV, ROOT, count_option, guide_build_context, median_of, report, run

TAG = "stigmer-sandbox-bench:cached"
LEGACY = {"DOCKER_BUILDKIT": "0"}


def main(runs: int) -> None:
    run([*INV, "sandbox.build-basic"])  # make sure the image exists and is current
    ours = median_of(lambda: run([*INV, "sandbox.build-basic"]), runs)
    with guide_build_context() as build:
        guide = [*build, "-t", TAG, "."]
        context = ROOT / "dockerfiles"
        run(guide, cwd=context, env=LEGACY)  # warm: every layer comes from the cache
        baseline = median_of(lambda: run(guide, cwd=context, env=LEGACY), runs)
    run(["docker", "rmi", TAG])
    report(
        "no-op rebuild of basic (inv sandbox.build-basic)",
        ours,
        "docker build, all layers cached",
        baseline,
        "s",
        goal="<= 1 s",
    )


if __name__ == "__main__":
    main(count_option(__doc__, "runs", 5, "timed runs of each"))
