"""Cold build of the basic image (no layer cache), beside `docker build --no-cache`.

Both build the same Dockerfile and context from the same base in the same run; the
tags are throwaway and removed afterwards. Runs each twice, alternating; takes about ten minutes.

    python benchmarks/cold_build.py
"""

from __future__ import annotations

from _common import INV, ROOT, guide_build_context, report, run, timed

TAG = "stigmer-sandbox-bench:cold"


def main() -> None:
    ours_argv = [*INV, "sandbox.build-basic", "--no-cache", "--progress", "plain", "--tag", TAG]
    ours, baseline = [], []
    with guide_build_context() as build:
        guide_argv = [*build, "--no-cache", "-t", TAG, "."]

        def guide() -> None:
            run(guide_argv, cwd=ROOT / "dockerfiles", env={"DOCKER_BUILDKIT": "0"})

        # A B B A: whoever builds first warms the download caches on the way (proxy,
        # mirror); alternating cancels that out.
        for first in (True, False):
            if first:
                ours.append(timed(lambda: run(ours_argv)))
            baseline.append(timed(guide))
            if not first:
                ours.append(timed(lambda: run(ours_argv)))
    run(["docker", "rmi", "-f", TAG])
    run([*INV, "sandbox.build-basic"])  # point :local back at the content-addressed image
    report(
        "cold build of basic (inv sandbox.build-basic --no-cache, mean of 2)",
        sum(ours) / 2,
        "docker build --no-cache, mean of 2",
        sum(baseline) / 2,
        "s",
    )


if __name__ == "__main__":
    main()
