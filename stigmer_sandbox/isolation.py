"""How strongly a sandbox is kept from the host's kernel: `isolation: container | gvisor`.

- `container` (the default): the engine's own runtime (runc). Commands share the host's
  kernel behind namespaces, capabilities, seccomp and cgroups.
- `gvisor`: the same container run by gVisor's `runsc`, whose user-space kernel answers
  the commands' system calls; a kernel bug reachable from the sandbox is gVisor's, not the
  host's. Registered in the engine as the runtime `RUNTIME` by `inv engine.install
  --gvisor` (Debian's `runsc` package; gVisor passes network calls to the host's stack
  inside the container's own network namespace, `--network=host`, because its own stack
  refuses to start on these kernels). What holds under gVisor and what does not: SECURITY.md.
  A gVisor sandbox without network (egress none) runs under `OFFLINE_RUNTIME`
  (`--network=none`): the only kind gVisor can checkpoint with its memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import SandboxError

CHOICES = ("container", "gvisor")
RUNTIME = "stigmer-gvisor"  # the engine's name for runsc as this project registers it
OFFLINE_RUNTIME = "stigmer-gvisor-nonet"  # the same without any network: checkpointable
RUNSC = "/usr/bin/runsc"
RUNTIME_ARGS = {RUNTIME: ("--network=host",), OFFLINE_RUNTIME: ("--network=none",)}
# runsc 20221219's ptrace platform backs every guest process with a host stub process
# whose threads multiply with the sentry threads that enter it, all in the container's
# pids cgroup: measured 54 host tasks idle and, at a fork loop's peak, 14,483 for 512 guest
# processes (28 each); 50 processes started and ended ten times over left 1,787.
HOST_TASKS_PER_PROCESS = 32
HOST_TASKS_OWN = 512
MAX_HOST_TASKS = 4_194_304  # the kernel's own ceiling on pid_max


def host_pids_limit(isolation: str, processes: int) -> int:
    """The engine's pids_limit for a sandbox whose commands may run `processes` at once (0:
    no limit): that number under runc; under gVisor room for gVisor's own host tasks too, the
    guest being held to `processes` by `process_ulimits` inside gVisor's kernel instead."""
    if isolation != "gvisor" or processes <= 0:
        return processes
    return min(processes * HOST_TASKS_PER_PROCESS + HOST_TASKS_OWN, MAX_HOST_TASKS)


def process_ulimits(isolation: str, processes: int) -> list[dict[str, Any]]:
    """The ulimits holding a gVisor sandbox's users to `processes` each (RLIMIT_NPROC, which
    gVisor's kernel counts per sandbox: a fork loop fails to fork, as under runc's cgroup
    limit, before the host limit takes the whole sandbox down). None under runc, where
    RLIMIT_NPROC counts a uid's processes across the whole host."""
    if isolation != "gvisor" or processes <= 0:
        return []
    return [{"name": "nproc", "soft": processes, "hard": processes}]


INSTALL_HINT = (
    "run `inv engine.install --gvisor` (Debian's runsc package, registered with the engine)"
)


def runtime_for(isolation: str, egress_mode: str = "public") -> str | None:
    """The engine runtime a sandbox of this isolation and egress mode is created with
    (None: the default)."""
    if isolation != "gvisor":
        return None
    return OFFLINE_RUNTIME if egress_mode == "none" else RUNTIME


def runtime_entries() -> dict[str, dict[str, Any]]:
    """What `inv engine.install --gvisor` writes under daemon.json's `runtimes`."""
    return {name: {"path": RUNSC, "runtimeArgs": list(args)} for name, args in RUNTIME_ARGS.items()}


def runsc_version(runsc: str = RUNSC) -> str:
    """runsc's own version line without its prefix (`0.0~20221219.0`), "" when it cannot run."""
    import subprocess

    try:
        done = subprocess.run(
            [runsc, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = done.stdout.strip().splitlines()
    return lines[0].removeprefix("runsc version ").strip() if lines else ""


def unusable_reason(info: Mapping[str, Any], runtime: str = RUNTIME) -> str | None:
    """Why gVisor sandboxes (of the engine `runtime`) cannot start on the engine whose
    `docker info` this is (None when they can)."""
    if runtime not in (info.get("Runtimes") or {}):
        return f"the engine has no {runtime} runtime"
    return None


def require_usable(info: Mapping[str, Any], runtime: str = RUNTIME) -> None:
    """Raise one SandboxError with the fix when gVisor cannot be used here."""
    why = unusable_reason(info, runtime)
    if why:
        raise SandboxError(f"isolation gvisor is not available: {why}", INSTALL_HINT)


def of_container(container: Any) -> str:
    """The isolation a created container runs under, from its engine runtime."""
    runtime = ((getattr(container, "attrs", None) or {}).get("HostConfig") or {}).get("Runtime")
    return "gvisor" if runtime in RUNTIME_ARGS else "container"


# Where runsc (run through the engine's runc shim) keeps each container's state.
STATE_FOLDERS = ("/var/run/docker/runtime-runc/moby", "/run/docker/runtime-runc/moby")


def host_identities(container_id: str, targets: Sequence[str]) -> tuple[int, bytes]:
    """`device:inode` of each mount target as the host sees it, one a line, read through
    the sandbox's gVisor gofer (the host process that serves its files: its root is the
    container's, mounts included) — what `stat` inside prints under runc, where gVisor's
    own `stat` shows its numbers. (status, output) like a command's: 1 and the reason when
    the gofer is not found (an engine on another machine, or runsc's layout changed)."""
    for folder in STATE_FOLDERS:
        state = Path(folder) / f"{container_id}_sandbox:{container_id}.state"
        try:
            gofer = int(json.loads(state.read_text(encoding="utf-8"))["goferPid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        lines = []
        for target in targets:
            try:
                found = os.lstat(f"/proc/{gofer}/root{target}")
            except OSError as exc:
                return 1, f"{target}: {exc.strerror}".encode()
            lines.append(f"{found.st_dev}:{found.st_ino}")
        return 0, ("\n".join(lines) + "\n").encode()
    return 1, b"the gVisor gofer of this sandbox was not found on this host"
