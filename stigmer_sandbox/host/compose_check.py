"""What a compose configuration may not contain: the sandbox policy applied to compose files.

Compose can weaken a sandbox in ways no single raw file shows: `extends` (from the same
file or another), a second `--file` merged over the first, `${VAR}` filled in from `.env`
or the environment, YAML anchors and merge keys. So `problems` reads the configuration
compose itself resolved (`docker compose config` for the exact files and environment the
tasks use); the raw files are read only to name the file a refused key came from
(`origin`). On Compose v1 1.29 and v2 the resolved output shows everything checked here:
`env_file` contents are merged into `environment`, `~` and relative paths are absolute.

The sandbox service's own confinement (user, capabilities, no-new-privileges, limits,
command) is not checked here: the tasks' generated override file, merged last, sets it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import policy
from ..errors import ConfigError

SANDBOX_SERVICE = "sandbox"
# What the project's own files add to each service; a service of the user's adds none.
PROJECT_CAPABILITIES = {
    SANDBOX_SERVICE: frozenset(policy.AGENT_CAPABILITIES),
    "database": frozenset({"CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID"}),
}
# The only security option the project sets; seccomp=, apparmor=, label= and systempaths=
# all loosen a confinement (unconfined, a custom profile, no label, unmasked /proc).
SECURITY_OPTS = frozenset({"no-new-privileges:true", "no-new-privileges=true", "no-new-privileges"})
NAMESPACE_KEYS = (*policy.HOST_NAMESPACE_KEYS, "cgroup")
FALSE_WORDS = frozenset({"false", "no", "off", "0", "n", "none", ""})
# The sandbox's root processes (agent, helper, health check) inherit the container's
# environment: these make the dynamic loader or bash run code chosen by the file.
ROOT_UNSAFE_PREFIXES = ("LD_", "BASH_FUNC_")
ROOT_UNSAFE_NAMES = frozenset(
    {"BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "GCONV_PATH", "LOCPATH", "NLSPATH"}
)
# Service keys refused outright on every service, and why.
REFUSED_KEYS = {
    "devices": "exposes host devices",
    "device_cgroup_rules": "grants access to host devices",
    "cgroup_parent": "moves the container out of the engine's cgroup, away from its limits",
    "volumes_from": "mounts another container's volumes, which this check cannot see",
    # Namespaced sysctls are all the engine accepts, so none reaches the host; but none is
    # needed, and each loosens a kernel guard for commands (ping_group_range: raw ICMP,
    # ip_unprivileged_port_start: ports below 1024, kernel.shm*: IPC limits).
    "sysctls": "loosens kernel limits for the sandbox's commands; none is needed",
}
# Keys refused on the sandbox service: what they run or change runs as root there.
SANDBOX_ONLY_KEYS = {
    "entrypoint": "would run as root beside the agent (the project fixes what runs as root)",
    "oom_kill_disable": "would hang an out-of-memory command instead of reporting it",
}


@dataclass(frozen=True)
class Problem:
    """One refused setting: the key as compose spells it, why, and where."""

    key: str
    reason: str
    service: str | None = None  # None: a top-level entry (volumes, secrets, configs)
    entry: str = ""  # the refused entry of a list or mapping, to find the file that adds it

    def text(self) -> str:
        where = f"service '{self.service}': " if self.service else ""
        return f"{where}{self.key}: {self.reason}"


@dataclass(frozen=True)
class MountContext:
    """What a host path is checked against: compose's folder and the protected folders."""

    directory: Path
    protected: policy.Protected

    def source(self, text: str) -> Path | None:
        """The host path a bind source names (None for a named volume)."""
        if not text.startswith(("/", ".", "~")):
            return None
        return (self.directory / Path(text).expanduser()).resolve()

    def problem(self, text: str, read_only: bool) -> str | None:
        """Why the host path `text` must not be mounted, or None."""
        path = self.source(text)
        if path is None:
            return None
        found = policy.mount_problem(path, self.protected, read_only=read_only)
        if found and not read_only and not policy.mount_problem(path, self.protected, True):
            found += " (mounted read-only, with :ro, it would be allowed)"
        return f"{text} ({path}) {found}" if found else None


def is_on(value: object) -> bool:
    """Whether a compose boolean is set; anything not plainly false counts as on."""
    return value is not None and value is not False and str(value).lower() not in FALSE_WORDS


def capability_names(values: object) -> set[str]:
    """`cap_add` entries as the engine reads them (case and a CAP_ prefix do not matter)."""
    return {str(cap).upper().removeprefix("CAP_") for cap in _entries(values)}


def _entries(values: object) -> list[Any]:
    if isinstance(values, Mapping):
        return [f"{key}={value}" for key, value in values.items()]
    return list(values) if isinstance(values, list | tuple) else [values] if values else []


def _privileged(name: str, spec: Mapping[str, Any], _mounts: MountContext) -> Iterator[Problem]:
    if is_on(spec.get("privileged")):
        yield Problem("privileged", f"{str(spec['privileged']).lower()} is not allowed", name)


def _namespaces(name: str, spec: Mapping[str, Any], _mounts: MountContext) -> Iterator[Problem]:
    for key in NAMESPACE_KEYS:
        mode = str(spec.get(key) or "")
        if mode.startswith("host"):
            yield Problem(key, f"{mode} shares the host's namespace", name)
        elif mode.startswith("container:"):
            yield Problem(key, f"{mode} shares a container this check cannot see", name)


def _capabilities(name: str, spec: Mapping[str, Any], _mounts: MountContext) -> Iterator[Problem]:
    allowed = PROJECT_CAPABILITIES.get(name, frozenset())
    extra = sorted(capability_names(spec.get("cap_add")) - allowed)
    if extra:
        granted = ", ".join(sorted(allowed)) or "none"
        reason = f"{', '.join(extra)} is not allowed (the project adds only: {granted})"
        yield Problem("cap_add", reason, name, extra[0])


def _security_opts(name: str, spec: Mapping[str, Any], _mounts: MountContext) -> Iterator[Problem]:
    for option in _entries(spec.get("security_opt")):
        if str(option).replace(" ", "") not in SECURITY_OPTS:
            reason = f"{option} is not allowed (only no-new-privileges)"
            yield Problem("security_opt", reason, name, str(option))


def _refused(name: str, spec: Mapping[str, Any], _mounts: MountContext) -> Iterator[Problem]:
    keys = {**REFUSED_KEYS, **(SANDBOX_ONLY_KEYS if name == SANDBOX_SERVICE else {})}
    for key, reason in keys.items():
        if key in spec and spec[key] not in (None, [], {}, False):
            yield Problem(key, reason, name)


def _healthcheck(name: str, spec: Mapping[str, Any], _mounts: MountContext) -> Iterator[Problem]:
    check = spec.get("healthcheck")
    if name == SANDBOX_SERVICE and isinstance(check, Mapping) and check.get("test"):
        yield Problem("healthcheck", "test would run as root (the image's check is used)", name)


def _environment(name: str, spec: Mapping[str, Any], _mounts: MountContext) -> Iterator[Problem]:
    if name != SANDBOX_SERVICE:
        return
    for entry in _entries(spec.get("environment")):
        variable = str(entry).partition("=")[0]
        if variable.startswith(ROOT_UNSAFE_PREFIXES) or variable in ROOT_UNSAFE_NAMES:
            reason = f"{variable} would run code in the sandbox's root processes"
            yield Problem("environment", reason, name, variable)


def _volumes(name: str, spec: Mapping[str, Any], mounts: MountContext) -> Iterator[Problem]:
    for volume in _entries(spec.get("volumes")):
        if isinstance(volume, Mapping):
            source = str(volume.get("source") or "")
            read_only = is_on(volume.get("read_only"))
        else:
            parts = str(volume).split(":")
            source, read_only = parts[0], len(parts) > 2 and "ro" in parts[2].split(",")
        found = mounts.problem(source, read_only)
        if found:
            yield Problem("volumes", found, name)


SERVICE_CHECKS: tuple[Callable[[str, Mapping[str, Any], MountContext], Iterator[Problem]], ...] = (
    _privileged,
    _namespaces,
    _capabilities,
    _security_opts,
    _refused,
    _healthcheck,
    _environment,
    _volumes,
)


def _top_level(config: Mapping[str, Any], mounts: MountContext) -> Iterator[Problem]:
    """Named volumes bound to a host folder, and secrets or configs read from host files."""
    for name, volume in (config.get("volumes") or {}).items():
        options = (volume or {}).get("driver_opts") or {}
        device = str(options.get("device") or "")
        if "bind" in str(options.get("o", "")).split(","):
            found = mounts.problem(device, read_only=False)
            if found:
                yield Problem("volumes", f"{name} binds {found}")
    for key in ("secrets", "configs"):
        for name, entry in (config.get(key) or {}).items():
            found = mounts.problem(str((entry or {}).get("file") or ""), read_only=True)
            if found:
                yield Problem(key, f"{name} mounts {found}")


def problems(config: Mapping[str, Any], mounts: MountContext) -> list[Problem]:
    """Everything a resolved compose configuration must not have, in file order."""
    found = list(_top_level(config, mounts))
    for name, spec in (config.get("services") or {}).items():
        for check in SERVICE_CHECKS:
            found.extend(check(str(name), spec or {}, mounts))
    return found


def load(path: Path) -> dict[str, Any]:
    """One compose file as YAML (anchors and merge keys applied); one line when it is not."""
    import yaml

    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    if not isinstance(document, dict) or not isinstance(document.get("services", {}), dict):
        raise ConfigError(f"{path}: needs a 'services' mapping")
    return document


def origin(files: Sequence[Path], problem: Problem, directory: Path) -> Path | None:
    """The file that writes the problem's key: the last of `files` that does, directly or
    through the `extends` chain of its service, preferring one whose value shows the
    refused entry (lists merge across files); None when none does. An `extends` file is
    found beside the extending file (Compose v2) or in `directory`, the project folder
    (Compose v1 with --project-directory)."""
    for entry in dict.fromkeys((problem.entry, "")):
        trace = _Trace(problem.key, entry.upper(), directory, set())
        for path in reversed(files):
            found = trace.writer(path, problem.service)
            if found is not None:
                return found
    return None


@dataclass
class _Trace:
    """One search for the file that writes `key`, following `extends`."""

    key: str
    entry: str  # upper case; "" matches any value
    directory: Path
    seen: set[tuple[Path, str]]

    def _matches(self, value: object) -> bool:
        return self.entry in str(value).upper()

    def writer(self, path: Path, service: str | None) -> Path | None:
        if (path, str(service)) in self.seen or not path.is_file():
            return None
        self.seen.add((path, str(service)))
        try:
            document = load(path)
        except ConfigError:
            return None
        if service is None:
            found = self.key in document and self._matches(document[self.key])
            return path if found else None
        spec = (document.get("services") or {}).get(service)
        if not isinstance(spec, dict):
            return None
        if self.key in spec and self._matches(spec[self.key]):
            return path
        return self._extended(path, spec.get("extends"))

    def _extended(self, path: Path, extends: object) -> Path | None:
        if isinstance(extends, str):
            return self.writer(path, extends)
        if not isinstance(extends, dict) or not extends.get("service"):
            return None
        service = str(extends["service"])
        if not extends.get("file"):
            return self.writer(path, service)
        for folder in (path.parent, self.directory):
            found = self.writer((folder / str(extends["file"])).resolve(), service)
            if found is not None:
                return found
        return None


def refuse(config: Mapping[str, Any], files: Sequence[Path], mounts: MountContext) -> None:
    """Raise a one-line ConfigError naming the first problem's file, service and key;
    `files` are the user-editable files (not the generated override)."""
    found = problems(config, mounts)
    if not found:
        return
    first = found[0]
    source = origin(files, first, mounts.directory)
    where = str(source) if source else "the merged files " + ", ".join(p.name for p in files)
    raise ConfigError(
        f"{where}: {first.text()}",
        "remove it: the sandbox's confinement is fixed by the project (README, Security design)",
    )
