"""Sandbox start and `inv run`, each beside the same work done without this tool.

- Start: `Sandbox.up()` (create, start, wait until ready) beside creating a container
  with exactly that sandbox's configuration (its `docker inspect` Config and HostConfig:
  same image, limits, mounts, capabilities) through the Engine API, starting it, and
  waiting with the same readiness check. Alternating, A B B A, so neither goes first.
  Both under egress `open` (the default bridge): what a gateway adds is `egress.py`'s.
- `inv run 'true'` on a running sandbox beside `docker exec CONTAINER bash -c true`,
  the same command on the same running container.

    python benchmarks/sandbox_start.py [--runs N]
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _common import INV, ROOT, count_option, median_of, report, run, timed

from stigmer_sandbox import config, engine
from stigmer_sandbox.runtime import Sandbox

READY_POLL_S = 0.1  # as often as Sandbox.up checks
READY_TIMEOUT_S = 60.0
# What `docker create` takes back from `docker inspect`'s Config; the rest is runtime state.
CREATE_KEYS = ("Image", "Cmd", "Entrypoint", "User", "Env", "WorkingDir", "Labels", "Healthcheck")


def wait_ready(container: Any) -> None:
    """Sandbox.up's readiness: the engine says healthy, or the image's check passes."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        container.reload()
        if container.attrs["State"].get("Health", {}).get("Status") == "healthy":
            return
        if container.exec_run(["sandbox-healthcheck"]).exit_code == 0:
            return
        time.sleep(READY_POLL_S)
    raise SystemExit(f"the baseline container was not ready within {READY_TIMEOUT_S:.0f} s")


def same_config(sandbox: Sandbox) -> dict[str, Any]:
    """The create request that makes a container configured exactly like `sandbox`'s."""
    attrs = sandbox.inspect()
    made = {key: attrs["Config"][key] for key in CREATE_KEYS if attrs["Config"].get(key)}
    return {**made, "HostConfig": attrs["HostConfig"]}


def start_by_hand(request: dict[str, Any], name: str) -> None:
    api = engine.client().api
    created = api.create_container_from_config(request, name)
    try:
        api.start(created["Id"])
        wait_ready(engine.client().containers.get(created["Id"]))
    finally:
        api.remove_container(created["Id"], force=True)


def start_with_the_library(settings: config.Settings) -> None:
    box = Sandbox.create_ephemeral(settings)
    try:
        box.up()
    finally:
        box.remove()


def compare_starts(settings: config.Settings, runs: int) -> None:
    template = Sandbox.create_ephemeral(settings).up()  # also warms image and folders
    try:
        request = same_config(template)
    finally:
        template.remove()
    ours: list[float] = []
    by_hand: list[float] = []
    name = f"{settings.container_name}-bench-{uuid.uuid4().hex[:8]}"
    for index in range(runs):
        pair = [
            (ours, lambda: start_with_the_library(settings)),
            (by_hand, lambda: start_by_hand(request, name)),
        ]
        for samples, action in pair if index % 2 == 0 else reversed(pair):
            samples.append(timed(action) * 1000)
    report(
        f"sandbox start (Sandbox.up: create, start, ready; median of {runs})",
        statistics.median(ours),
        "same container config via the Engine API, started, same readiness check",
        statistics.median(by_hand),
        "ms",
    )


def compare_run_and_exec(folders: dict[str, str], runs: int) -> None:
    name = f"stigmer-sandbox-bench-{uuid.uuid4().hex[:8]}"
    env = {"INVOKE_STIGMER_CONTAINER_NAME": name, **folders}
    docker = shutil.which("docker")
    if docker is None:
        raise SystemExit("the docker CLI is needed for the baseline")
    run([*INV, "sandbox.up"], env=env)
    try:
        inv_run = [*INV, "run", "true"]
        run(inv_run, env=env)  # warm-up: the first call connects the agent
        ours = median_of(lambda: run(inv_run, env=env), runs) * 1000
        baseline = median_of(lambda: run([docker, "exec", name, "bash", "-c", "true"]), runs)
    finally:
        run([*INV, "sandbox.down"], env=env)
    report(
        f"inv run 'true' on a running sandbox (median of {runs})",
        ours,
        "docker exec CONTAINER bash -c true (CLI), same container",
        baseline * 1000,
        "ms",
    )


def main(runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="stigmer-bench-") as scratch:
        folders = {key: str(Path(scratch) / key) for key in ("workspace", "logs", "state_dir")}
        settings = config.load_settings(ROOT).replace(**folders)
        compare_starts(settings.replace(egress="open"), runs)
        compare_run_and_exec(
            {f"INVOKE_STIGMER_{key.upper()}": value for key, value in folders.items()}, runs
        )


if __name__ == "__main__":
    main(count_option(__doc__, "runs", 7, "timed runs of each"))
