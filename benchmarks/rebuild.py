"""No-op rebuild: `inv sandbox.build-basic` with nothing changed, beside `docker build`.

The baseline is the guide's own command (`docker build -f Dockerfile.sandbox.basic ...`)
on the same unchanged Dockerfile with a warm layer cache, timed in the same run.

    python benchmarks/rebuild.py [--runs N]
"""

from __future__ import annotations

import argparse
import shutil

from _common import INV, ROOT, median_of, report, run

from stigmer_sandbox import config


def main(runs: int) -> None:
    run([*INV, "sandbox.build-basic"])  # make sure the image exists and is current
    ours = median_of(lambda: run([*INV, "sandbox.build-basic"]), runs)
    docker = shutil.which("docker")
    if docker is None:
        raise SystemExit("the docker CLI is needed for the baseline")
    base = config.load_settings(ROOT).base_image
    guide = [
        docker,
        "build",
        "-q",
        "-f",
        "Dockerfile.sandbox.basic",
        "--build-arg",
        f"BASE_IMAGE={base}",
        "-t",
        "stigmer-sandbox-bench:cached",
        ".",
    ]
    env = {"DOCKER_BUILDKIT": "0"}
    run(guide, cwd=ROOT / "dockerfiles", env=env)  # warm the cache for the CLI's context
    baseline = median_of(lambda: run(guide, cwd=ROOT / "dockerfiles", env=env), runs)
    run([docker, "rmi", "stigmer-sandbox-bench:cached"])
    report(
        "no-op rebuild of basic (inv sandbox.build-basic)",
        ours,
        "docker build, all layers cached",
        baseline,
        "s",
        goal="<= 1 s",
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each (default: 5)")
    main(parser.parse_args().runs)
