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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .. import engine, labels, policy
from ..config import Settings
from ..errors import ConfigError, SandboxError, SandboxNotReady

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


PROJECT = "stigmer-sandbox"
BASE_FILE = "docker-compose.sandbox.yml"
ADVANCED_FILE = "docker-compose.sandbox.advanced.yml"
DATABASE_FILE = "docker-compose.sandbox.database.yml"
SERVICE = "sandbox"
# `${VAR}` and `${VAR:-default}` as compose substitutes them in a volume source.
VARIABLE_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


@dataclass(frozen=True)
class ComposeProject:
    """The compose files of this project and how to call compose on them."""

    tool: ComposeTool
    directory: Path
    files: tuple[Path, ...]
    environment: dict[str, str]

    def argv(self, verb: str, *args: str) -> list[str]:
        """The full compose command line for `verb` (the one place that builds them)."""
        head = [
            *self.tool.prefix,
            "--project-name",
            PROJECT,
            "--project-directory",
            str(self.directory),
        ]
        for path in self.files:
            head += ["--file", str(path)]
        if self.tool.needs_compatibility_flag:
            head.append("--compatibility")
        return [*head, verb, *args]


def compose_files(directory: Path, advanced: bool, database: bool) -> tuple[Path, ...]:
    """The base file plus the requested overrides."""
    names = [BASE_FILE]
    if advanced:
        names.append(ADVANCED_FILE)
    if database:
        names.append(DATABASE_FILE)
    files = tuple(directory / name for name in names)
    for path in files:
        if not path.is_file():
            raise SandboxError(f"{path} not found", "run from a stigmer-sandbox checkout")
    return files


@dataclass(frozen=True)
class MountContext:
    """What a volume source is resolved against: compose's variables and folders."""

    environment: Mapping[str, str]
    directory: Path
    protected: policy.Protected

    def expand(self, text: str) -> str:
        """`text` with compose's variables substituted."""
        return VARIABLE_RE.sub(
            lambda m: self.environment.get(m.group(1)) or (m.group(2) or ""), text
        )

    def source(self, text: str) -> Path | None:
        """The host path a bind source names (None for a named volume)."""
        if not text.startswith(("/", ".", "~")):
            return None
        return (self.directory / os.path.expanduser(text)).resolve()


def _service_problems(service: str, spec: dict, mounts: MountContext) -> Iterator[str]:
    if spec.get("privileged"):
        yield f"service '{service}': privileged: true is not allowed"
    for key in policy.HOST_NAMESPACE_KEYS:
        if str(spec.get(key, "")).startswith("host"):
            yield f"service '{service}': {key}: host shares the host's namespace"
    added = {str(cap).upper().removeprefix("CAP_") for cap in spec.get("cap_add") or []}
    if added & policy.DANGEROUS_CAPABILITIES:
        dangerous = sorted(added & policy.DANGEROUS_CAPABILITIES)
        yield f"service '{service}': cap_add {dangerous} is not allowed"
    if spec.get("devices"):
        yield f"service '{service}': devices exposes host devices"
    for volume in spec.get("volumes") or []:
        problem = _volume_problem(volume, mounts)
        if problem:
            yield f"service '{service}': volumes: {problem}"


def _volume_problem(volume: object, mounts: MountContext) -> str | None:
    if isinstance(volume, dict):
        source = mounts.expand(str(volume.get("source", "")))
        read_only = bool(volume.get("read_only"))
    else:
        parts = mounts.expand(str(volume)).split(":")
        source = parts[0]
        read_only = len(parts) > 2 and "ro" in parts[2].split(",")
    path = mounts.source(source)
    if path is None:
        return None
    problem = policy.mount_problem(path, mounts.protected, read_only=read_only)
    if problem and not read_only and not policy.mount_problem(path, mounts.protected, True):
        problem += " (mounted read-only, with :ro, it would be allowed)"
    return f"{source} ({path}) {problem}" if problem else None


def validate(path: Path, mounts: MountContext) -> dict:
    """Load one compose file and refuse what a sandbox must never have; one line per problem."""
    import yaml

    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}") from None
    services = document.get("services") if isinstance(document, dict) else None
    if not isinstance(services, dict):
        raise ConfigError(f"{path}: needs a 'services' mapping")
    for name, spec in services.items():
        for problem in _service_problems(str(name), spec or {}, mounts):
            raise ConfigError(f"{path}: {problem}")
    return document


def project(settings: Settings, advanced: bool = False, database: bool = False) -> ComposeProject:
    """The compose project for these settings: folders checked against the policy, tool
    found, files validated, values filled in. Nothing on disk changes before that."""
    folders = policy.sandbox_folders(settings)
    if advanced:  # the advanced file mounts ~/.aws and ~/.kube read-only
        policy.credential_folders(settings.replace(mount_aws=True, mount_kube=True))
    tool = detect(settings.compose)
    files = compose_files(settings.root, advanced, database)
    environment = {
        "STIGMER_SANDBOX_IMAGE": settings.image,
        "STIGMER_WORKSPACE": str(folders["workspace"]),
        "STIGMER_LOGS": str(folders["logs"]),
        "STIGMER_MEMORY": settings.memory,
        "STIGMER_TMP_SIZE": settings.tmp_size,
        "STIGMER_GIT_NAME": settings.git_name,
        "STIGMER_GIT_EMAIL": settings.git_email,
    }
    protected = policy.Protected.of(settings)
    mounts = MountContext({**os.environ, **environment}, settings.root, protected)
    for path in files:
        validate(path, mounts)
    return ComposeProject(tool, settings.root, (*files, _limits_override(settings)), environment)


def _limits_override(settings: Settings) -> Path:
    """A generated override with the configured numeric limits, typed as compose needs them."""
    import yaml

    path = settings.path("state_dir") / "compose.limits.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    limits = {"pids_limit": settings.pids_limit, "cpus": settings.cpus}
    document = {"services": {SERVICE: limits}}
    path.write_text(
        "# Written by stigmer-sandbox from its settings; do not edit.\n" + yaml.safe_dump(document),
        encoding="utf-8",
    )
    return path


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


def up(
    settings: Settings,
    advanced: bool = False,
    database: bool = False,
    timeout: float = 60.0,
    echo: Callable[[list[str]], None] | None = None,
) -> float:
    """Start the compose sandbox in the background and wait until it is healthy; returns
    the seconds the wait took. Refuses a sandbox of the same name that `Sandbox.up` made."""
    target = project(settings, advanced, database)
    existing = engine.find_container(settings.container_name)
    if existing is not None and existing.labels.get(labels.KIND) != "compose":
        raise SandboxError(
            f"{existing.name} was started by `inv sandbox.up`",
            "stop it with `inv sandbox.down` first",
        )
    policy.prepare_folders(settings)
    done = run(target, "up", "-d", echo=echo)
    if done.returncode:
        raise SandboxError(f"compose up failed (exit {done.returncode})")
    container = engine.find_container(settings.container_name)
    if container is None:
        raise SandboxNotReady(f"compose did not create {settings.container_name}")
    healthy, detail, seconds = engine.wait_healthy(container, timeout)
    if not healthy:
        raise SandboxNotReady(
            f"{settings.container_name} is not healthy: {detail}",
            f"see `inv compose.logs`; `docker inspect {settings.container_name}`",
        )
    return seconds
