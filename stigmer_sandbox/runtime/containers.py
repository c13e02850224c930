"""The container behind a sandbox: its identity, its labels, when it is ready, what it is.

The pieces of the lifecycle that only look at one container (`Sandbox` decides when to
create, reuse, start or remove it): the configuration hash that says when it must be
recreated, the labels it is created with, the wait for its health check, the status
`inv sandbox.status` prints, and an interactive shell in it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from .. import egress, engine, images, isolation, labels, policy
from ..config import Settings
from ..errors import SandboxError, SandboxNotReady, UsageError
from ..images.record import ImageRecord
from . import host_helper, network
from .backends.base import Backend
from .client.channel import AgentChannel

if TYPE_CHECKING:
    from .client.connection import Connection

READY_TIMEOUT_S = 60.0
EARLY_CHANNEL_WAIT_S = 30.0


def spec_hash(spec: dict[str, Any], image_id: str) -> str:
    """Identity of a container's configuration, to notice when it must be recreated."""
    stable = {k: v for k, v in spec.items() if k != "labels"}
    stable["mounts"] = [host_helper.stable_form(m) for m in stable["mounts"]]
    text = json.dumps([stable, image_id], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def wanted_spec(
    settings: Settings, user: tuple[int, int], prepared_image: bool, backend: Backend
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The container a sandbox must have (`policy.container_spec` on the image for `user`,
    with the host's helper mounted; its folders checked) before its network is chosen, and
    the folders it mounts."""
    spec = policy.container_spec(settings, settings.image, {})
    image = settings.image
    if not prepared_image:  # a committed image already has the right user
        image = images.image_for_user(image, *user, ImageRecord.of(settings))
    spec["image"] = image
    folders = list(spec["mounts"])
    # The helper every command runs through comes from the host, never the image.
    spec["mounts"].append(host_helper.mount(settings, image, backend))
    return spec, folders


def check_runtime(settings: Settings) -> None:
    """Refuse, in one line with the fix, an isolation this engine cannot give (asked of
    the engine only when a sandbox is to be made under gVisor)."""
    runtime = isolation.runtime_for(settings.isolation, egress.mode_of(settings))
    if runtime is not None:
        with engine.engine_errors():
            info = engine.client().info()
        isolation.require_usable(info, runtime)


def placed(spec: dict[str, Any], network_options: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """`spec` on the network its egress policy chose, and its identity (`spec_hash`)."""
    final = network.merged(spec, network_options)
    return final, spec_hash(final, engine.image(final["image"]).id)


def create_placed(
    backend: Backend,
    base: dict[str, Any],
    placement: network.Placement,
    marks_for: Callable[[str], dict[str, str]],
) -> Any:
    """The sandbox's container (`base` placed, labelled `marks_for` its identity), created
    while its gateway's network may still be being made. Made again once the network
    exists when it got another subnet than the one the container names, or when the engine
    refused to create it before its network existed; removed when the network fails."""
    spec, wanted = placed(base, placement.options)
    container = None
    try:
        container = backend.create({**spec, "labels": marks_for(wanted)})
    except SandboxError:
        if placement.gateway is None:
            raise
    try:
        same = placement.network_ready()
    except BaseException:
        if container is not None:
            _discard(container)
        raise
    if container is not None and same:
        return container
    if container is not None:
        _discard(container)
    spec, wanted = placed(base, placement.options)
    return backend.create({**spec, "labels": marks_for(wanted)})


def _discard(container: Any) -> None:
    """Remove a container made for a start that cannot go on (never started)."""
    with suppress(Exception), engine.engine_errors():
        container.remove(force=True)


def container_labels(
    settings: Settings, name: str, config_hash: str, ephemeral: bool, extra: dict[str, str]
) -> dict[str, str]:
    """The labels a sandbox's container is created with: the project's, its configuration
    hash, its expiry, and (for an ephemeral one) the process that owns it."""
    marks = {"config": config_hash, "sandbox": name}
    if settings.max_lifetime_hours:
        marks["expires"] = str(int(time.time() + settings.max_lifetime_hours * 3600))
    return {**labels.project_labels("sandbox", **marks), **owner_labels(ephemeral), **extra}


def owner_labels(ephemeral: bool) -> dict[str, str]:
    """For an ephemeral sandbox (and what it owns, like its gateway): the process whose end
    makes them orphans that `inv clean` removes. None for a long-lived one."""
    if not ephemeral:
        return {}
    return {labels.OWNER_PID: str(os.getpid()), labels.OWNER_HOST: os.uname().nodename}


def stale_reason(container: Any, wanted: str) -> str | None:
    """Why an existing container cannot serve (None when it can)."""
    if container.labels.get(f"{labels.PREFIX}.config", wanted) != wanted:
        return "its image or settings changed"
    if labels.expired(container.labels):
        return "it outlived its maximum lifetime"
    return None


def wait_ready(container: Any, name: str, timeout: float = READY_TIMEOUT_S) -> None:
    """Wait until the container's health check passes; SandboxNotReady naming why not."""
    deadline = time.monotonic() + timeout
    detail = "not started"
    while time.monotonic() < deadline:
        with engine.engine_errors():
            container.reload()
            state = container.attrs["State"]
            if state["Status"] in ("exited", "dead"):
                raise SandboxNotReady(
                    f"sandbox {name} exited with code {state.get('ExitCode')} before it "
                    f"was ready: {last_log_line(container)}",
                    f"see `docker logs {name}`",
                )
            if state.get("Health", {}).get("Status") == "healthy":
                return  # the engine's own check passed: skip a ~50 ms exec
            code, output = container.exec_run(
                [policy.HEALTHCHECK_COMMAND], environment={"PATH": policy.ROOT_PATH}
            )
        if code == 0:
            return
        detail = output.decode(errors="replace").strip()[:200]
        time.sleep(0.1)
    raise SandboxNotReady(
        f"sandbox {name} did not become healthy within {timeout:.0f} s: {detail}",
        "run `inv doctor`; `inv fix-permissions` if the workspace is not writable",
    )


def last_log_line(container: Any) -> str:
    with engine.engine_errors():
        lines = container.logs(tail=5).decode(errors="replace").strip().splitlines()
    return lines[-1][:200] if lines else "no output"


def describe(name: str, container: Any, connected: bool) -> dict[str, Any]:
    """State, health, image, limits and mounts, as `docker inspect` knows them."""
    if container is None:
        return {"name": name, "exists": False, "state": "missing"}
    attrs = container.attrs
    host = attrs["HostConfig"]
    return {
        "name": name,
        "exists": True,
        "id": container.short_id,
        "state": attrs["State"]["Status"],
        "health": (attrs["State"].get("Health") or {}).get("Status", "none"),
        "image": attrs["Config"]["Image"],
        "started_at": attrs["State"].get("StartedAt"),
        "memory": host.get("Memory"),
        "nano_cpus": host.get("NanoCpus"),
        "pids_limit": commands_pids_limit(host),
        "engine_pids_limit": host.get("PidsLimit"),
        "network": host.get("NetworkMode"),
        "read_only": host.get("ReadonlyRootfs"),
        "mounts": [
            {"source": m["Source"], "target": m["Destination"], "rw": m["RW"]}
            for m in attrs.get("Mounts", [])
        ],
        "agent": connected,
    }


class EarlyChannel:
    """An agent connection being opened in a thread while the health check runs (they are
    independent, so a new sandbox is connected ~100-300 ms sooner); `result()` waits for
    it (None when it failed: the first command tries again, or falls back to docker exec)."""

    def __init__(self, opener: Callable[[], AgentChannel]) -> None:
        self._channel: AgentChannel | None = None
        self._thread = threading.Thread(target=self._open, args=(opener,), daemon=True)
        self._thread.start()

    def _open(self, opener: Callable[[], AgentChannel]) -> None:
        with suppress(SandboxError):
            self._channel = opener()

    def result(self, timeout: float = EARLY_CHANNEL_WAIT_S) -> AgentChannel | None:
        self._thread.join(timeout)
        return None if self._thread.is_alive() else self._channel


def interactive_shell(name: str, user: tuple[int, int], root: bool = False) -> int:
    """An interactive bash in sandbox `name` with this terminal's stdio (no Invoke pty, which
    drops keys); without a terminal, stdin is still passed so it works in CI."""
    docker = shutil.which("docker")
    if docker is None:
        raise SandboxError("the docker CLI is needed for an interactive shell", "install docker")
    terminal = sys.stdin.isatty() and sys.stdout.isatty()
    uid, gid = (0, 0) if root else user
    argv = [docker, "exec", "-i", *(["-t"] if terminal else []), "-w", policy.WORKSPACE]
    if root:  # never the sandbox user's tools on root's PATH
        argv += ["-e", f"PATH={policy.ROOT_PATH}"]
    argv += ["-u", f"{uid}:{gid}", name, "/bin/bash"]
    return subprocess.run(argv, check=False).returncode


class ContainerViews:
    """What one can see of a sandbox's container (mixed into `Sandbox`): its status, its
    output, `docker inspect`, and an interactive shell in it."""

    if TYPE_CHECKING:  # what the class it is mixed into provides
        name: str
        attached: bool
        connection: Connection

        @property
        def sandbox_user(self) -> tuple[int, int]: ...
        def find(self) -> Any: ...

    def status(self) -> dict[str, Any]:
        """State, health, image, limits and mounts, as `docker inspect` knows them."""
        return describe(self.name, self.find(), self.connection.connected)

    def _existing(self) -> Any:
        container = self.find()
        if container is None:
            start = "`inv compose.up`" if self.attached else "`inv sandbox.up`"
            raise SandboxNotReady(f"sandbox {self.name} does not exist", f"start it with {start}")
        return container

    def logs(self, follow: bool = False, tail: str | int = "all") -> Iterator[bytes]:
        """The container's output (the keep-alive's and the engine's view of it)."""
        checked_tail(tail)
        container = self._existing()
        with engine.engine_errors():
            yield from container.logs(
                stream=True, follow=follow, tail=tail if tail == "all" else int(tail)
            )

    def inspect(self) -> dict[str, Any]:
        """`docker inspect` of the container."""
        return dict(self._existing().attrs)

    def shell(self, root: bool = False) -> int:
        """An interactive bash in the sandbox (as root with `root`); its exit status."""
        return interactive_shell(self.name, self.sandbox_user, root)


def checked_tail(tail: str | int) -> str:
    """`--tail` as the engine and compose take it: `all` or a whole number of lines."""
    if tail != "all" and not str(tail).isdigit():
        raise UsageError(f"--tail must be a number of lines or all, got {tail!r}")
    return str(tail)


def commands_pids_limit(host_config: dict[str, Any]) -> int | None:
    """How many processes the sandbox's commands may run: the engine's pids_limit, or under
    gVisor the nproc ulimit gVisor's kernel holds them to (the engine's limit there also
    leaves room for gVisor's own host tasks)."""
    for limit in host_config.get("Ulimits") or ():
        if limit.get("Name") == "nproc":
            return int(limit.get("Soft"))
    return host_config.get("PidsLimit")
