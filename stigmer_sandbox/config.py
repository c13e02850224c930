"""Settings: defaults in code, a project `invoke.yaml`, the environment, flags.

Precedence, lowest first: the defaults below → the `stigmer:` section of the
project `invoke.yaml` (next to `tasks.py`) → `INVOKE_STIGMER_<KEY>` variables →
the guide's own variables (`STIGMER_SANDBOX_IMAGE`, `STIGMER_EXECUTION_MODE`, and
Stigmer's `STIGMER_BOOTSTRAP_NPM_PACKAGES` / `STIGMER_BOOTSTRAP_PIP_PACKAGES`) →
command-line flags. Every key but `secrets` is a scalar so that the environment can
set it (Invoke cannot set lists from the environment); `secrets` maps names to where
their values come from, so it lives in a file (stigmer_sandbox/credentials.py).

The library loads this without Invoke (`load_settings`); under Invoke, the
collection carries the same defaults and `settings_from_invoke` validates what
Invoke merged.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

from .errors import ConfigError
from .isolation import CHOICES as ISOLATIONS

SECTION = "stigmer"
PROJECT_FILE = "invoke.yaml"
ENV_PREFIX = "INVOKE_STIGMER_"
GUIDE_ENV = {
    "STIGMER_SANDBOX_IMAGE": "image",
    "STIGMER_EXECUTION_MODE": "execution_mode",
    "STIGMER_BOOTSTRAP_NPM_PACKAGES": "bootstrap_npm_packages",
    "STIGMER_BOOTSTRAP_PIP_PACKAGES": "bootstrap_pip_packages",
}

# Patterns end in \Z, not $ (which also matches before a final newline: "name\n" passed).
_IMAGE_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_RE = re.compile(
    rf"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?{_IMAGE_COMPONENT}(?:/{_IMAGE_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?\Z"
)
# Docker wants two characters at least ("a" is refused by the engine).
CONTAINER_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{1,127}\Z")
# ASCII digits only: \d also matches other scripts' digits, which Docker and the kernel refuse.
SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([bkmg]?)b?\Z", re.IGNORECASE | re.ASCII)
# The largest per-call output cap: the channel sizes its frames from it.
MAX_OUTPUT_LIMIT = 64 * 1024 * 1024
# A week: long enough for any command, short enough for every clock and timer API.
MAX_TIMEOUT_S = 7 * 24 * 3600.0
# Docker reads sizes and counts as signed 64-bit integers.
MAX_SIZE = 2**63 - 1
# The kernel's ceiling for pid_max: no process limit can usefully be higher.
MAX_PIDS = 4_194_304
MAX_CPUS = 1024.0
MAX_LIFETIME_HOURS = 365 * 24.0
# How a wrong type is described: what the key wants, in words.
_TYPE_NAMES = {
    "str": "text",
    "bool": "true or false",
    "int": "a whole number",
    "float": "a number",
    "dict": "a mapping",
}
# Values longer than this are cut in error lines (one line, whatever was configured).
SHOWN_VALUE = 80
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
# Registry packages only, optionally with a version: each spec becomes one argv item of
# `npm install -g` or `uv tool install`, so paths, URLs and options are refused. No commas
# (the list separator), hence one extra and one version clause at most for PyPI.
PACKAGE_SPECS = {
    "npm-packages": (
        re.compile(r"(?:@[a-z0-9][a-z0-9._~-]*/)?[A-Za-z0-9][A-Za-z0-9._~-]*(?:@[\w.*+^~<>=-]+)?"),
        "an npm package spec (name or @scope/name, optionally @version)",
    ),
    "pip-packages": (
        re.compile(
            r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?(?:\[[A-Za-z0-9._-]+\])?"
            r"(?:(?:===|==|~=|!=|<=|>=|<|>|@)[\w.*+!-]+)?"
        ),
        "a PyPI package spec (name, name==version, name>=version or name@version)",
    ),
}
MAX_PACKAGE_SPEC = 256
# egress.MODES (a test keeps them equal); egress.py is imported only to check entries.
EGRESS_MODES = ("public", "allowlist", "open", "none")

GATEWAY_EGRESS = ("public", "allowlist")  # the modes with a gateway (and a broker)


def _key(
    help_text: str,
    default: Any,
    *,
    choices: tuple[str, ...] = (),
    kind: str = "",
    maximum: float | None = None,
    above: float | None = None,
) -> Any:
    """A setting: its help, default and what is allowed (`above`: the value must be more;
    a mapping default is copied for each Settings)."""
    metadata = {
        "help": help_text,
        "choices": choices,
        "kind": kind,
        "maximum": maximum,
        "above": above,
    }
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    """Every configurable value, validated. Build with `load_settings`."""

    image: str = _key("sandbox image to run", "stigmer-sandbox-basic:local", kind="image")
    execution_mode: str = _key(
        "where commands run: sandbox, local (this host, no isolation), or auto (sandbox when "
        "the engine answers and the image exists)",
        "sandbox",
        choices=("sandbox", "local", "auto"),
    )
    container_name: str = _key(
        "name of the long-lived sandbox container", "stigmer-sandbox", kind="container"
    )
    project_dir: str = _key("project folder (default: the folder of tasks.py, else cwd)", "")
    workspace: str = _key(
        "host folder mounted at /workspace (relative to project_dir)", "workspace"
    )
    logs: str = _key("host folder mounted at /logs (relative to project_dir)", "logs")
    state_dir: str = _key("host folder for the audit log and engine state; never mounted", ".state")
    base_image: str = _key(
        "project-built Debian base image", "stigmer-sandbox-debian:bookworm-slim", kind="image"
    )
    upstream_base: str = _key(
        "upstream base image, used when the engine can pull it",
        "debian:bookworm-slim",
        kind="image",
    )
    debian_mirror: str = _key("Debian mirror URL for bootstrap-base (default: debootstrap's)", "")
    ca_cert: str = _key("extra CA bundle trusted by builds (default: detected from env)", "")
    keep_extra_ca: bool = _key("final images keep trusting the extra CA", True)
    tools_mirror: str = _key("base URL replacing tool download hosts (full image)", "")
    compose: str = _key("compose flavour", "auto", choices=("auto", "v2", "v1"))
    engine_data_root: str = _key(
        "dockerd --data-root when this tool starts the engine (default: dockerd's own)", ""
    )
    memory: str = _key("sandbox memory limit (memory+swap is the same)", "2g", kind="size", above=0)
    cpus: float = _key("sandbox CPU limit (0: none)", 2.0, maximum=MAX_CPUS)
    pids_limit: int = _key("sandbox process limit (0: none)", 512, maximum=MAX_PIDS)
    tmp_size: str = _key(
        "size of the /tmp tmpfs (executable; counts against the memory limit)",
        "512m",
        kind="size",
        above=0,
    )
    network: str = _key("sandbox network", "bridge", choices=("bridge", "none"))
    read_only_root: bool = _key("mount the sandbox's root filesystem read-only", False)
    timeout: float = _key(
        "default command timeout in seconds", 600.0, maximum=MAX_TIMEOUT_S, above=0
    )
    output_limit: int = _key(
        "bytes kept per output stream (at most 64 MiB)",
        1024 * 1024,
        maximum=MAX_OUTPUT_LIMIT,
        above=1,  # a command's request needs room for at least two bytes
    )
    relay_idle_s: float = _key(
        "seconds a relay keeps `inv run`'s connection warm after its last command (0: no relay)",
        900.0,
        maximum=MAX_TIMEOUT_S,
    )
    pool_max_size: int = _key(
        "most sandboxes one SandboxPool runs at once (ready and acquired)",
        32,
        maximum=512,
        above=0,
    )
    snapshot_max_size: str = _key(
        "most a sandbox's commands may add outside /workspace for a fork or snapshot of it",
        "8g",
        kind="size",
    )
    max_lifetime_hours: float = _key(
        "sandbox lifetime before cleanup may reap it (0: none)", 24.0, maximum=MAX_LIFETIME_HOURS
    )
    mount_aws: bool = _key("mount ~/.aws read-only into the sandbox", False)
    mount_kube: bool = _key("mount ~/.kube read-only into the sandbox", False)
    allow_root_shell: bool = _key("allow `sandbox.shell --root`", False)
    git_name: str = _key("git author and committer name in the sandbox", "Stigmer Sandbox")
    git_email: str = _key(
        "git author and committer email in the sandbox", "sandbox@stigmer-sandbox.invalid"
    )
    bootstrap_npm_packages: str = _key(
        "npm packages (MCP servers) `npm install -g`'d when a sandbox starts, comma-separated "
        "(Stigmer's STIGMER_BOOTSTRAP_NPM_PACKAGES)",
        "",
        kind="npm-packages",
    )
    bootstrap_pip_packages: str = _key(
        "PyPI packages (MCP servers) `uv tool install`'d when a sandbox starts, comma-separated "
        "(Stigmer's STIGMER_BOOTSTRAP_PIP_PACKAGES)",
        "",
        kind="pip-packages",
    )
    # The egress policy (stigmer_sandbox/egress.py, docs/egress.md): parsed and checked
    # here; list keys are comma-separated text like the bootstrap packages, so that an
    # INVOKE_STIGMER_ALLOW variable can set them (Invoke cannot set a list from one).
    isolation: str = _key(
        "how the sandbox is kept from the host's kernel: container (the engine's runc) or "
        "gvisor (gVisor's user-space kernel; `inv engine.install --gvisor`)",
        "container",
        choices=ISOLATIONS,
    )
    egress: str = _key(
        "egress policy: public (public addresses; private, local and metadata ones refused), "
        "allowlist (only `allow`), open (everything), none (no network; `network: none` too)",
        "public",
        choices=EGRESS_MODES,
    )
    allow: str = _key(
        "destinations a sandbox may reach, comma-separated: name, *.name, address or CIDR, "
        "each with an optional :port ([IPv6]:port)",
        "",
        kind="egress-entries",
    )
    deny: str = _key(
        "destinations a sandbox may never reach (same form as allow; deny always wins)",
        "",
        kind="egress-entries",
    )
    allow_presets: str = _key(
        "named sets of allow entries, comma-separated: python, node, debian",
        "",
        kind="egress-presets",
    )
    egress_subnets: str = _key(
        "the IPv4 range each sandbox's egress network (a /29) is taken from; keep it clear of "
        "the LAN's and the engine's own networks",
        "10.231.0.0/16",
        kind="subnet-pool",
    )
    egress_spares: int = _key(
        "egress gateways a process keeps started for its next ephemeral sandbox or fork under "
        "the same policy, so it starts like one without a gateway (0: none; each is a small "
        "running container, removed when the process ends)",
        0,
        maximum=8,
    )
    # Credentials (stigmer_sandbox/credentials.py, issue 26): definitions name sources,
    # never values; a sandbox gets only the ones `use_secrets` names.
    secrets: dict = _key(  # noqa: RUF009 (_key gives a mapping its default_factory)
        "secrets a sandbox may use without reading them: NAME: {from_env | from_file | "
        "from_command | from_aws_profile, hosts: [destinations], header: 'Name: ...{value}...' "
        "| sign: aws-sigv4}",
        {},
        kind="secrets",
    )
    use_secrets: str = _key(
        "the secrets a sandbox gets (placeholders in its environment), comma-separated "
        "names from `secrets` (default: none)",
        "",
        kind="secret-names",
    )

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            _validate(item, getattr(self, item.name), "settings")
        if self.use_secrets:
            names = ", ".join(secret.name for secret in self.secrets_in_use)
            if self.network == "none" or self.egress not in GATEWAY_EGRESS:
                mode = "none" if self.network == "none" else self.egress
                raise ConfigError(
                    f"use_secrets: egress {mode} has no gateway to carry secrets ({names})",
                    "use egress public or allowlist, or give the sandbox no secrets",
                )

    def __hash__(self) -> int:  # `secrets` is a mapping; its canonical text stands in
        import json

        return hash(json.dumps(self.as_dict(), sort_keys=True, default=str))

    def replace(self, source: str = "flags", **changes: Any) -> Settings:
        """A copy with `changes` applied (None values ignored), validated."""
        given = {k: v for k, v in changes.items() if v is not None}
        return _build({**self.as_dict(), **given}, source)

    def with_egress(
        self,
        egress: str | None = None,
        allow: Sequence[str] = (),
        deny: Sequence[str] = (),
        allow_presets: Sequence[str] = (),
        *,
        source: str = "arguments",
        secrets: Sequence[str] = (),
    ) -> Settings:
        """A copy with the egress mode replaced and entries, presets or secrets (names the
        `secrets` key defines) added to the configured ones (a deny in the configuration is
        never dropped by a caller), checked: a bad entry or an unknown secret is one
        ConfigError naming it."""
        added = {
            "allow": allow,
            "deny": deny,
            "allow_presets": allow_presets,
            "use_secrets": secrets,
        }
        changes: dict[str, Any] = {"egress": egress}
        for key, given in added.items():
            extra = [given] if isinstance(given, str) else list(given)  # one entry given bare
            if any(not str(item).strip() for item in extra):
                raise ConfigError(f"{source}: key {key!r} has an empty entry")
            if extra:
                joined = [*split_packages(getattr(self, key)), *extra]
                changes[key] = ",".join(dict.fromkeys(joined))
        return self.replace(source, **changes)

    @property
    def secrets_in_use(self) -> list[Any]:
        """The `credentials.Secret`s that `use_secrets` names, checked."""
        if not self.use_secrets:
            return []
        from . import credentials

        return credentials.chosen(self.secrets, split_packages(self.use_secrets), "use_secrets")

    @property
    def secret_hosts(self) -> list[str]:
        """Where the secrets in use may be sent: the egress policy allows them implicitly."""
        return list(dict.fromkeys(host for s in self.secrets_in_use for host in s.hosts))

    def as_dict(self) -> dict[str, Any]:
        """All keys and values, as the `stigmer:` config section holds them."""
        return dataclasses.asdict(self)

    @property
    def root(self) -> Path:
        """The project folder everything relative is resolved against."""
        return Path(self.project_dir or os.getcwd()).resolve()

    def path(self, key: str) -> Path:
        """A folder setting (`workspace`, `logs`, `state_dir`) as an absolute path."""
        written = self.path_unresolved(key)
        try:
            return written.resolve()
        except (OSError, RuntimeError) as exc:  # a loop, or a symlink swapped while read
            raise ConfigError(f"{key}: {written} cannot be resolved: {exc}") from None

    def path_unresolved(self, key: str) -> Path:
        """A folder setting as written, made absolute: its symlinks not yet followed."""
        return self.root / os.path.expanduser(getattr(self, key))

    @property
    def memory_bytes(self) -> int:
        return parse_size(self.memory)


def parse_size(text: str) -> int:
    """`2g`, `512m`, `1024` → bytes (binary units, as Docker reads them)."""
    match = SIZE_RE.match(str(text).strip())
    if not match:
        raise ValueError(text)
    # Exact: a float turns a long number into inf (and int(inf) raises OverflowError).
    return int(Fraction(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def split_image(reference: str) -> tuple[str, str]:
    """`repo/name:tag` → (`repo/name`, `tag`); the tag defaults to `latest`."""
    name, sep, tag = reference.rpartition(":")
    if not sep or "/" in tag:
        return reference, "latest"
    return name, tag


def split_packages(text: str) -> list[str]:
    """`a, b@1,` → `['a', 'b@1']`: a comma-separated package list, blanks and repeats dropped."""
    return list(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))


def bad_package(kind: str, text: str) -> str | None:
    """The first item of the package list `text` that is not a spec of `kind`, if any."""
    pattern = PACKAGE_SPECS[kind][0]
    for spec in split_packages(text):
        if len(spec) > MAX_PACKAGE_SPEC or not spec.isascii() or not pattern.fullmatch(spec):
            return spec
    return None


def key_help() -> dict[str, str]:
    """One help line per key, for docs and the example config."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(Settings)}


def defaults() -> dict[str, Any]:
    """The default `stigmer:` section (what the Invoke collection carries)."""
    return Settings().as_dict()


def _validate(item: dataclasses.Field, value: Any, source: str) -> None:
    expected = _TYPES[str(item.type)]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
        wanted = _TYPE_NAMES[str(item.type)]
        raise ConfigError(f"{source}: key '{item.name}' must be {wanted}, got {_shown(value)}")
    if isinstance(value, dict):  # `secrets`: its own errors name the secret and the fix
        if value:
            from . import credentials  # only when secrets are defined

            credentials.parse_all(value, source)
        return
    problem = _text_problem(item, value) if isinstance(value, str) else _number_problem(item, value)
    if problem:
        raise ConfigError(f"{source}: key '{item.name}' {problem}, got {_shown(value)}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_VALUE else text[: SHOWN_VALUE - 1] + "…"


def _text_problem(item: dataclasses.Field, value: str) -> str | None:
    choices, kind = item.metadata["choices"], item.metadata["kind"]
    if "\0" in value or not _encodable(value):
        return "must be text without NUL or unencodable characters"
    if choices and value not in choices:
        return f"must be one of {', '.join(choices)}"
    if kind == "image" and not IMAGE_RE.match(value):
        return "must be an image reference like name:tag (lowercase name)"
    if kind == "container" and not CONTAINER_NAME_RE.match(value):
        return "must be letters, digits, '_', '.', '-' (starting with a letter or digit)"
    if kind == "size":
        return _size_problem(value, item.metadata["above"])
    if kind in PACKAGE_SPECS and (bad := bad_package(kind, value)) is not None:
        return f"has {bad!r}, which is not {PACKAGE_SPECS[kind][1]}"
    if kind.startswith("egress-") and value:
        return _egress_problem(kind, value)
    if kind == "subnet-pool":
        return _subnet_pool_problem(value)
    if kind == "secret-names":
        from .credentials import NAME_RE

        bad = next((n for n in split_packages(value) if not NAME_RE.match(n)), None)
        return None if bad is None else f"has {bad!r}, which is not a secret name"
    return None


def _subnet_pool_problem(value: str) -> str | None:
    import ipaddress

    try:
        pool = ipaddress.IPv4Network(value)
    except ValueError:
        return "must be an IPv4 network like 10.231.0.0/16"
    return None if pool.prefixlen <= 29 else "must hold at least one /29 (a prefix of 29 or less)"


def _egress_problem(kind: str, value: str) -> str | None:
    from . import egress  # only when entries are set: the warm `run` path stays light

    problem = egress.entry_problem(value) if kind == "egress-entries" else None
    problem = problem or (egress.preset_problem(value) if kind == "egress-presets" else None)
    if not problem:
        return None
    return f"has {'an' if problem[0] in 'aeiou' else 'a'} {problem}"


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no file name, label or variable holds it
        return False
    return True


def _size_problem(value: str, above: float | None) -> str | None:
    try:
        size = parse_size(value)
    except ValueError:  # not a size, or more digits than Python converts
        return "must be a size like 512m or 2g"
    if above is not None and size <= above:
        return f"must be more than {_figure(above)} (a size like 512m or 2g)"
    if size > MAX_SIZE:
        return f"must be at most {MAX_SIZE} bytes"
    return None


def _number_problem(item: dataclasses.Field, value: Any) -> str | None:
    if isinstance(value, bool):
        return None  # a bool key: its type is all there is to check

    maximum, above = item.metadata["maximum"], item.metadata["above"]
    if not math.isfinite(value):
        return "must be a finite number"
    if above is not None and value <= above:
        limit = f" and at most {_figure(maximum)}" if maximum is not None else ""
        return f"must be more than {_figure(above)}{limit}"
    if value < 0:
        return "must not be negative"
    if maximum is not None and value > maximum:
        return f"must be at most {_figure(maximum)}"
    return None


def _figure(number: float) -> str:
    """A limit as people write it: 604800, 0.5."""
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


_TYPES = {"str": str, "bool": bool, "int": int, "float": float, "dict": dict}
_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _build(values: Mapping[str, Any], source: str) -> Settings:
    unknown = sorted((str(key) for key in set(values) - set(_FIELDS)), key=str)
    if unknown:
        close = difflib.get_close_matches(unknown[0], _FIELDS, n=1)
        guess = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(
            f"{source}: unknown key {_shown(unknown[0])} in the '{SECTION}' section",
            f"{guess}see invoke.example.yaml for every key",
        )
    coerced: dict[str, Any] = {}
    for name, value in values.items():
        item = _FIELDS[name]
        _validate(item, value, source)
        coerced[name] = float(value) if _TYPES[str(item.type)] is float else value
    return Settings(**coerced)


def _from_env_string(name: str, raw: str, source: str) -> Any:
    kind = _TYPES[str(_FIELDS[name].type)]
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off", ""}:
                raise ValueError(raw)
            return lowered in {"1", "true", "yes", "on"}
        return kind(raw)
    except ValueError:
        wanted = _TYPE_NAMES[kind.__name__]
        raise ConfigError(f"{source}: must be {wanted}, got {_shown(raw)}") from None


def read_project_file(path: Path) -> dict[str, Any]:
    """The `stigmer:` section of a project `invoke.yaml`, validated; {} if absent."""
    if not path.is_file():
        return {}
    import yaml  # ~15 ms: only when there is a file (the warm `run` path counts them)

    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from None
    except (ValueError, RecursionError) as exc:  # a number too long to convert; deep nesting
        raise ConfigError(f"{path}: cannot be loaded: {_shown(str(exc))}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: must be a mapping of sections, got {type(document).__name__}")
    section = document.get(SECTION) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: section '{SECTION}' must be a mapping of keys")
    _build(section, str(path))
    return section


def _env_overrides(environ: Mapping[str, str], with_invoke_vars: bool) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if with_invoke_vars:
        for name, item in _FIELDS.items():
            var = ENV_PREFIX + name.upper()
            if var in environ and _TYPES[str(item.type)] is dict:
                raise ConfigError(
                    f"{var}: key '{name}' cannot be set from the environment",
                    f"write it under '{SECTION}:' in {PROJECT_FILE}",
                )
            if var in environ:
                found[name] = _from_env_string(name, environ[var], var)
                _validate(item, found[name], var)
    for var, name in GUIDE_ENV.items():
        if environ.get(var):
            _validate(_FIELDS[name], environ[var], var)
            found[name] = environ[var]
    return found


def check_environment(environ: Mapping[str, str]) -> None:
    """One ConfigError naming the first bad `INVOKE_STIGMER_*` or guide variable. Invoke
    casts its variables itself, with a traceback for `INVOKE_STIGMER_TIMEOUT=abc` and any
    word as true for a bool: check them before it does."""
    _env_overrides(environ, with_invoke_vars=True)


def settings_from_dict(values: Mapping[str, Any], source: str) -> Settings:
    """Settings from `Settings.as_dict()` output (e.g. passed to another process), checked."""
    return _build(values, source)


def load_settings(
    project_dir: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Settings for library use: defaults, project file, environment, then `overrides`."""
    environ = os.environ if environ is None else environ
    root = Path(project_dir) if project_dir else Path.cwd()
    values: dict[str, Any] = {"project_dir": str(root)}
    values.update(read_project_file(root / PROJECT_FILE))
    values.update(_env_overrides(environ, with_invoke_vars=True))
    base = _build(values, "environment")
    return base.replace(source="arguments", **overrides)


class ConfigSource(Protocol):
    """What is read of Invoke's `Config` (a mapping does as well)."""

    def get(self, key: str, default: Any = None) -> Any: ...


def settings_from_invoke(
    config: ConfigSource, environ: Mapping[str, str] | None = None, **flags: Any
) -> Settings:
    """Settings from Invoke's merged config (file and INVOKE_ vars applied), then flags."""
    environ = os.environ if environ is None else environ
    _check_invoke_files(config)
    check_environment(environ)  # names the variable, where the merged value could not
    section = dict(config.get(SECTION) or {})
    section.update(_env_overrides(environ, with_invoke_vars=False))
    return _build(section, "configuration").replace(**flags)


def _check_invoke_files(config: ConfigSource) -> None:
    """Validate each configuration file Invoke loaded on its own, so that an error names
    the file that holds the bad key (the merged result no longer knows)."""
    for level in ("system", "user", "project", "runtime"):
        data = getattr(config, f"_{level}", None)
        if not isinstance(data, Mapping) or SECTION not in data:
            continue
        where = str(getattr(config, f"_{level}_path", None) or f"the {level} configuration")
        section = data[SECTION]
        if not isinstance(section, Mapping):
            raise ConfigError(f"{where}: section '{SECTION}' must be a mapping of keys")
        _build(section, where)
