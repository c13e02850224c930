"""Cold build of the basic image (no layer cache), beside `docker build --no-cache`.

Both build the same Dockerfile and context from the same base in the same run; the
tags are throwaway and removed afterwards. Takes a few minutes.

    python benchmarks/cold_build.py
"""

from __future__ import annotations

from _common import INV, ROOT, guide_build_context, report, run, timed

TAG = "stigmer-sandbox-bench:cold"


def main() -> None:
    ours = timed(
        lambda: run(
            [*INV, "sandbox.build-basic", "--no-cache", "--progress", "plain", "--tag", TAG]
        )
    )
    with guide_build_context() as build:
        baseline = timed(
            lambda: run(
                [*build, "--no-cache", "-t", TAG, "."],
                cwd=ROOT / "dockerfiles",
                env={"DOCKER_BUILDKIT": "0"},
            )
        )
    run(["docker", "rmi", "-f", TAG])
    run([*INV, "sandbox.build-basic"])  # point :local back at the content-addressed image
    report(
        "cold build of basic (inv sandbox.build-basic --no-cache)",
        ours,
        "docker build --no-cache",
        baseline,
        "s",
    )


if __name__ == "__main__":
    main()
