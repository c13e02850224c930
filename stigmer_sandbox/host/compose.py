"""Docker Compose: the one place that finds compose and builds its commands.

Compose v2 (`docker compose`) is preferred; the standalone v1 `docker-compose`
is the fallback. v1 releases before 1.27 apply `deploy.resources` limits only
with `--compatibility`, so the version decides that flag.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import engine, isolation, labels, policy
from ..config import Settings
from ..errors import ConfigError, SandboxError, SandboxNotReady, UsageError
from . import compose_check, compose_egress

if TYPE_CHECKING:
    from ..runtime import Sandbox
    from ..runtime.egress_gateway import GatewayStart

INSTALL_HINT = (
    "install the compose plugin (https://docs.docker.com/compose/install/) "
    "or `inv engine.install` for docker-compose"
)


@dataclass(frozen=True)
class ComposeTool:
    """Which compose was found: its argv prefix, flavour (v1/v2) and version."""

    prefix: tuple[str, ...]
    flavour: str
    version: str

    @property
    def needs_compatibility_flag(self) -> bool:
        return self.flavour == "v1" and version_tuple(self.version) < (1, 27)


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _probe(argv: list[str]) -> str | None:
    if not shutil.which(argv[0]):
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"v?(\d+\.\d+\.\d+)", done.stdout)
    return match.group(1) if done.returncode == 0 and match else None


def detect(preference: str = "auto") -> ComposeTool:
    """The compose to use; `preference` is auto, v2 or v1."""
    candidates = {
        "v2": (("docker", "compose"), ["docker", "compose", "version", "--short"]),
        "v1": (("docker-compose",), ["docker-compose", "version", "--short"]),
    }
    order = ["v2", "v1"] if preference == "auto" else [preference]
    for flavour in order:
        prefix, probe = candidates[flavour]
        version = _probe(probe)
        if version:
            return ComposeTool(prefix, flavour, version)
    wanted = "Docker Compose" if preference == "auto" else f"compose {preference}"
    raise SandboxError(f"{wanted} is not installed", INSTALL_HINT)


# The compose project's name for the default container name; a sandbox with another
# `container_name` is a project of that name, so the two never share a network.
PROJECT = "stigmer-sandbox"
BASE_FILE = "docker-compose.sandbox.yml"
ADVANCED_FILE = "docker-compose.sandbox.advanced.yml"
DATABASE_FILE = "docker-compose.sandbox.database.yml"
SERVICE = compose_check.SANDBOX_SERVICE
# The sandbox service's confinement as `policy.container_spec` has it, enforced by the
# generated override: root PID 1 and agent with only the agent's capabilities, and limits.
ENFORCED_KEYS = (
    "user",
    "hostname",
    "init",
    "cap_drop",
    "cap_add",
    "security_opt",
    "pids_limit",
    "mem_limit",
    "memswap_limit",
    "read_only",
)


@dataclass(frozen=True)
class ComposeProject:
    """The compose files of this project and how to call compose on them."""

    tool: ComposeTool
    directory: Path
    files: tuple[Path, ...]
    environment: dict[str, str]
    name: str = PROJECT
    # What compose resolved from these files (the sandbox service's labels and ports).
    resolved: dict[str, Any] = field(default_factory=dict, compare=False)
    gated: bool = False  # the override puts the sandbox behind its egress gateway

    def argv(self, verb: str, *args: str) -> list[str]:
        """The full compose command line for `verb` (the one place that builds them)."""
        head = [
            *self.tool.prefix,
            "--project-name",
            self.name,
            "--project-directory",
            str(self.directory),
        ]
        for path in self.files:
            head += ["--file", str(path)]
        if self.tool.needs_compatibility_flag:
            head.append("--compatibility")
        return [*head, verb, *args]


@dataclass(frozen=True)
class FileChoice:
    """Which compose files a task uses: the project's optional overrides, then the user's."""

    advanced: bool = False
    database: bool = False
    extra: tuple[Path, ...] = ()


def compose_files(directory: Path, choice: FileChoice) -> tuple[Path, ...]:
    """The base file, the requested overrides, then the user's own files."""
    names = [BASE_FILE]
    if choice.advanced:
        names.append(ADVANCED_FILE)
    if choice.database:
        names.append(DATABASE_FILE)
    files = (*(directory / name for name in names), *(directory / p for p in choice.extra))
    for path in files:
        if not path.is_file():
            raise SandboxError(f"{path} not found", "run from a stigmer-sandbox checkout")
    return files


def project(
    settings: Settings, choice: FileChoice = FileChoice(), starting: bool = False
) -> ComposeProject:
    """The compose project for these settings: folders checked against the policy, tool
    found, the merged configuration of these exact files checked (`compose_check`), values
    filled in. Before that check only the generated override in the state folder is written;
    when `starting`, it gives the sandbox the placeholders of the secrets it uses."""
    folders = policy.sandbox_folders(settings)
    policy.credential_folders(settings)  # the opt-in mounts: a missing folder is an error
    if choice.database and settings.network == "none":
        raise UsageError("--database needs a network, but network is none")
    tool = detect(settings.compose)
    files = compose_files(settings.root, choice)
    for path in files:
        compose_check.load(path)  # a broken file is named with its line, before compose
    environment = {
        "STIGMER_CONTAINER_NAME": settings.container_name,
        "STIGMER_SANDBOX_IMAGE": settings.image,
        "STIGMER_WORKSPACE": str(folders["workspace"]),
        "STIGMER_LOGS": str(folders["logs"]),
        "STIGMER_MEMORY": str(settings.memory_bytes),
        "STIGMER_TMP_SIZE": policy.tmpfs_size(settings.tmp_size),  # as the kernel reads it
        "STIGMER_GIT_NAME": settings.git_name,
        "STIGMER_GIT_EMAIL": settings.git_email,
    }
    placed = compose_egress.placement(settings)
    brokered = compose_egress.secret_keys(settings, settings.image) if starting else {}
    override = Override(settings, placed, choice.advanced, brokered=brokered)
    files = (*files, override.write())
    target = ComposeProject(tool, settings.root, files, environment, settings.container_name)
    config = resolved_config(target)
    if placed is not None and override.settle(config):
        override.write()
        config = resolved_config(target)  # the sandbox's other networks, made internal
    mounts = compose_check.MountContext(settings.root, policy.Protected.of(settings))
    compose_check.refuse(config, target.files[:-1], mounts)
    return replace(target, resolved=config, gated=placed is not None)


def resolved_config(target: ComposeProject) -> dict[str, Any]:
    """The configuration compose itself makes of the project's files and environment."""
    import yaml

    done = run(target, "config", capture=True)
    if done.returncode:
        said = [line for line in done.stderr.splitlines() if line.strip()] or ["no output"]
        raise ConfigError(f"compose config refused the files: {said[-1].strip()[:300]}")
    config = yaml.safe_load(done.stdout)
    return config if isinstance(config, dict) else {}


@dataclass
class Override:
    """The generated override, merged last: the sandbox service's confinement from
    `policy.container_spec` (no file of the user's can change it: scalars are replaced and
    lists are merged, so nothing here can be removed) and, behind an egress gateway, its
    network (`compose_egress`)."""

    settings: Settings
    placed: compose_egress.GatewayPlacement | None = None
    advanced: bool = False
    networks: dict[str, Any] = field(default_factory=dict)
    bypass: tuple[str, ...] = ()
    brokered: dict[str, Any] = field(default_factory=dict)  # `compose_egress.secret_keys`

    def __post_init__(self) -> None:
        if self.placed is not None:  # before compose resolved the files: no other network
            self.settle({})

    def settle(self, config: Mapping[str, Any]) -> bool:
        """Take the sandbox's other networks and the names it reaches directly from what
        compose resolved; whether they changed (the file must be written again)."""
        assert self.placed is not None
        before = (self.networks, self.bypass)
        self.networks = compose_egress.network_keys(self.placed, config)
        self.bypass = tuple(compose_egress.direct_names(config, self.advanced))
        return (self.networks, self.bypass) != before

    @property
    def path(self) -> Path:
        name = f"compose.{self.settings.container_name}.enforced.yml"
        return self.settings.path("state_dir") / name

    def document(self) -> dict[str, Any]:
        settings = self.settings
        spec = policy.container_spec(settings, settings.image, {})
        service = {key: spec[key] for key in ENFORCED_KEYS}
        service["cpus"] = settings.cpus
        if "runtime" in spec:  # isolation gvisor
            service["runtime"] = spec["runtime"]
        limits = isolation.process_ulimits(settings.isolation, settings.pids_limit)
        if limits:  # gVisor: the commands' limit; pids_limit above leaves gVisor its room
            service["ulimits"] = {u["name"]: {"soft": u["soft"], "hard": u["hard"]} for u in limits}
        # Compose keeps its service up (restart: unless-stopped): no lifetime wrapper.
        service["command"] = [policy.KEEPALIVE]
        service.update(_host_helper_volume(settings))
        service["volumes"] = [*service.get("volumes", []), *_credential_volumes(settings)]
        if settings.network == "none":
            service["network_mode"] = "none"
        document: dict[str, Any] = {"services": {SERVICE: service}}
        if self.placed is not None:
            service.update(compose_egress.service_keys(self.placed, self.bypass))
            document["networks"] = self.networks
        if self.brokered:
            environment = {**service.get("environment", {}), **self.brokered["environment"]}
            service["environment"] = environment
            service["volumes"] = [*service.get("volumes", []), *self.brokered["volumes"]]
        return document

    def write(self) -> Path:
        import yaml

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(
            "# Written by stigmer-sandbox from its settings and policy; do not edit.\n"
            + yaml.safe_dump(self.document()),
            encoding="utf-8",
        )
        return self.path


def _credential_volumes(settings: Settings) -> list[str]:
    """The credential folders opted into (`mount_aws`, `mount_kube`), read-only, where
    `Sandbox.up` mounts them."""
    found = policy.credential_folders(settings)
    return [f"{path}:{policy.SANDBOX_HOME}/{name}:ro" for name, path in found.items()]


def _host_helper_volume(settings: Settings) -> dict[str, list[str]]:
    """The host's copy of the command helper mounted read-only over the image's (as for
    `Sandbox.up`). Without the image (`compose.down` after `inv clean --all`) there is no
    copy to take and nothing to start: the other verbs go on without it."""
    from ..runtime import host_helper

    try:
        helper = host_helper.copy_for(settings, settings.image)
    except SandboxError:
        return {}
    return {"volumes": [f"{helper}:{policy.EXEC_HELPER}:ro"]}


def with_user_image(target: ComposeProject, settings: Settings) -> ComposeProject:
    """`target` with the image whose sandbox user is the one commands run as (as for
    `Sandbox.up`), so workspace files stay the host user's; built only when needed."""
    from .. import images
    from ..images.record import ImageRecord

    uid, gid = policy.sandbox_user()
    image = images.image_for_user(settings.image, uid, gid, ImageRecord.of(settings))
    return replace(target, environment={**target.environment, "STIGMER_SANDBOX_IMAGE": image})


def run(
    target: ComposeProject,
    verb: str,
    *args: str,
    echo: Callable[[list[str]], None] | None = None,
    capture: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run one compose command with inherited stdio (interactive commands keep their keys)."""
    argv = target.argv(verb, *args)
    if echo:
        echo(argv)
    return subprocess.run(
        argv,
        env={**os.environ, **target.environment},
        check=False,
        capture_output=capture,
        text=True,
    )


@dataclass(frozen=True)
class Started:
    """What `up` did: seconds until healthy, and lines to show (a policy applied live)."""

    seconds: float
    notes: tuple[str, ...] = ()


def up(
    settings: Settings,
    choice: FileChoice = FileChoice(),
    timeout: float = 60.0,
    echo: Callable[[list[str]], None] | None = None,
) -> Started:
    """Start the compose sandbox in the background behind its egress gateway (when its
    policy has one) and wait until it is healthy. Refuses a sandbox of the same name that
    `Sandbox.up` made."""
    settings = compose_egress.with_policy_entries(settings, choice.advanced)
    from ..runtime import containers

    containers.check_runtime(settings)
    target, gateway = _prepared(settings, choice)
    name = settings.container_name
    # Pinned now and checked once started: a folder swapped for a symlink in between must
    # not be what compose mounts.
    pins = policy.pin_mounts(policy.folder_mounts(policy.prepare_folders(settings)))
    done = run(target, "up", "-d", echo=echo)
    container = engine.find_container(name)
    if done.returncode or container is None:
        if container is None:
            release_gateway(settings)  # nothing is behind it
        raise SandboxError(f"compose up failed (exit {done.returncode})")
    from ..runtime import network
    from ..runtime.backends.docker import DOCKER

    notes = network.Placement({}, gateway).finish(name)
    if gateway is None:
        release_gateway(settings)  # one left from an earlier policy with a gateway
    else:
        notes += compose_egress.notes(settings, target.resolved, choice.advanced)
    policy.verify_mounts(pins, DOCKER, container)
    # The health command run at once, as for `Sandbox.up`, rather than waiting for the
    # engine's first scheduled check (the service's interval, 5 s).
    began = time.monotonic()
    containers.wait_ready(container, name, timeout)
    return Started(time.monotonic() - began, tuple(notes))


def _prepared(settings: Settings, choice: FileChoice) -> tuple[ComposeProject, GatewayStart | None]:
    """The checked project and the sandbox's egress gateway being started (None without
    one): refused when a sandbox of that name is not compose's, or when a network of the
    project must be recreated first."""
    target = with_user_image(project(settings, choice, starting=True), settings)
    existing = engine.find_container(settings.container_name)
    if existing is not None and existing.labels.get(labels.KIND) != "compose":
        raise SandboxError(
            f"{existing.name} was started by `inv sandbox.up`",
            "stop it with `inv sandbox.down` first",
        )
    if compose_egress.gated(settings):  # checked on `up` only: `down` must always work
        compose_egress.refuse_bypasses(target.resolved, *compose_egress.gateway_names(settings))
    sandbox = (target.resolved.get("services") or {}).get(SERVICE) or {}
    gateway = compose_egress.begin(settings, sandbox.get("labels") or {})
    if gateway is not None and not target.gated:  # its network exists only now
        target = with_user_image(project(settings, choice, starting=True), settings)
    stale = compose_egress.stale_networks(target.name, target.resolved)
    if stale:
        if gateway is not None:  # the running sandbox is not behind it
            release_gateway(settings)
        raise SandboxError(
            f"network {stale[0]} was made for another egress mode and must be recreated",
            "run `inv compose.down` first (the workspace and named volumes are kept)",
        )
    return target, gateway


def down(
    target: ComposeProject,
    settings: Settings,
    *args: str,
    echo: Callable[[list[str]], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`compose down`, then the sandbox's egress gateway and network (the audit stays)."""
    done = run(target, "down", *args, echo=echo)
    if not done.returncode:
        release_gateway(settings)
    return done


def release_gateway(settings: Settings) -> None:
    """Remove the sandbox's egress gateway and its network, if it has them."""
    from ..runtime import network
    from ..runtime.backends.docker import DOCKER

    network.release(settings, settings.container_name, DOCKER)()


def attach(settings: Settings) -> Sandbox:
    """The running compose sandbox, reached through its agent like any sandbox
    (`Sandbox.attach`): commands as the sandbox user, tree kill, exit causes, audit trail.
    It is never started, recreated or removed from here."""
    from ..runtime import Sandbox

    if engine.find_container(settings.container_name) is None:
        raise SandboxNotReady(
            f"{settings.container_name} is not running", "start it with `inv compose.up`"
        )
    return Sandbox.attach(settings.container_name, settings).up()
