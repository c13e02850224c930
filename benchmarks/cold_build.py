"""Cold build of the basic image (no layer cache), beside `docker build --no-cache`.

Both build the same Dockerfile from the same base in the same run; the tags
are throwaway and removed afterwards. Takes a few minutes.

    python benchmarks/cold_build.py
"""

from __future__ import annotations

import shutil

from _common import INV, ROOT, report, run, timed

from stigmer_sandbox import config

TAG = "stigmer-sandbox-bench:cold"


def main() -> None:
    docker = shutil.which("docker")
    if docker is None:
        raise SystemExit("the docker CLI is needed for the baseline")
    ours = timed(
        lambda: run(
            [*INV, "sandbox.build-basic", "--no-cache", "--progress", "plain", "--tag", TAG]
        )
    )
    base = config.load_settings(ROOT).base_image
    extra_ca = ROOT / "dockerfiles/certs/bench-extra-ca.crt"
    bundle = config.load_settings(ROOT).ca_cert or "/etc/ssl/certs/ca-certificates.crt"
    shutil.copyfile(bundle, extra_ca)  # the CLI cannot inject the CA the way the task does
    try:
        baseline = timed(
            lambda: run(
                [
                    docker,
                    "build",
                    "-q",
                    "--no-cache",
                    "-f",
                    "Dockerfile.sandbox.basic",
                    "--build-arg",
                    f"BASE_IMAGE={base}",
                    "-t",
                    TAG,
                    ".",
                ],
                cwd=ROOT / "dockerfiles",
                env={"DOCKER_BUILDKIT": "0"},
            )
        )
    finally:
        extra_ca.unlink()
    run([docker, "rmi", "-f", TAG])
    report(
        "cold build of basic (inv sandbox.build-basic --no-cache)",
        ours,
        "docker build --no-cache",
        baseline,
        "s",
    )


if __name__ == "__main__":
    main()
