"""Install an agent's MCP server packages when its sandbox starts, as Stigmer does.

Stigmer's cloud sandbox reads `STIGMER_BOOTSTRAP_NPM_PACKAGES` (installed with
`npm install -g`) and `STIGMER_BOOTSTRAP_PIP_PACKAGES` (`uv tool install`), comma-separated,
when it starts. Here they are the settings `bootstrap_npm_packages` and
`bootstrap_pip_packages`, so `invoke.yaml` and `INVOKE_STIGMER_*` set them too. Packages
install one at a time as the sandbox user, each spec a single argv item (never a shell
string), so a failed package is reported and the others still install. Nothing here prints:
`on_start` returns the lines to show, which `Sandbox.up` adds to its `notes`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import config, policy
from ..errors import UsageError

if TYPE_CHECKING:
    from .client.connection import Connection

# On the /tmp tmpfs, so it is gone whenever the container starts again: a sandbox started
# behind `up()`'s back (docker start, a reboot of the engine) bootstraps at the next `up()`.
MARKER = "/tmp/.stigmer-bootstrap"
MARKER_TIMEOUT_S = 30.0
REASON_CHARS = 300
# Installers' lines that say where or which code, not why.
_NOISE = re.compile(
    r"(?:code|errno|syscall|path|A complete log|notarget (?:In most cases|a package version))\b"
)
_ERROR_PREFIX = re.compile(r"(?:npm (?:error|ERR!)|error:)\s*")


@dataclass(frozen=True)
class Registry:
    """One package source: the settings key listing its packages and how one installs."""

    name: str
    key: str
    kind: str  # the spec grammar, a key of config.PACKAGE_SPECS
    install: tuple[str, ...]  # the argv before `--` and the spec


NPM = Registry(
    "npm",
    "bootstrap_npm_packages",
    "npm-packages",
    ("npm", "install", "--global", "--no-audit", "--no-fund", "--loglevel=error"),
)
PIP = Registry("pip", "bootstrap_pip_packages", "pip-packages", ("uv", "tool", "install", "-q"))
REGISTRIES = (NPM, PIP)


@dataclass(frozen=True)
class Outcome:
    """What installing one registry's packages did, and how long it took."""

    registry: str
    installed: tuple[str, ...]
    failed: tuple[tuple[str, str], ...]  # (spec, why)
    seconds: float

    def lines(self) -> list[str]:
        """A progress line for the registry, then one line per failed package."""
        total = len(self.installed) + len(self.failed)
        head = (
            f"bootstrap {self.registry}: {len(self.installed)} of {total} "
            f"package{'s' if total != 1 else ''} installed in {self.seconds:.1f} s"
        )
        if self.installed:
            head += f" ({', '.join(self.installed)})"
        failures = [
            f"bootstrap {self.registry}: {spec} failed, skipped: {why}" for spec, why in self.failed
        ]
        return [head, *failures]


def requested(settings: config.Settings) -> dict[Registry, list[str]]:
    """The packages each registry is to install, as the settings list them."""
    return {r: config.split_packages(getattr(settings, r.key)) for r in REGISTRIES}


def check(registry: Registry, specs: Sequence[str]) -> list[str]:
    """`specs`, if each is a package spec of `registry`; else one error naming the first
    that is not (settings are checked when they load: this guards direct callers)."""
    for spec in specs:
        one_spec = config.split_packages(spec) == [spec]  # no comma, blank or padding
        if not one_spec or config.bad_package(registry.kind, spec) is not None:
            form = config.PACKAGE_SPECS[registry.kind][1]
            raise UsageError(f"{registry.key}: {spec!r} is not {form}")
    return list(specs)


def install_argv(registry: Registry, spec: str) -> list[str]:
    """The argv that installs `spec` (checked first; `--` so it can never be an option)."""
    check(registry, [spec])
    return [*registry.install, "--", spec]


def install(connection: Connection, packages: Mapping[Registry, Sequence[str]]) -> list[Outcome]:
    """Install `packages` in `sandbox` as the sandbox user, one registry after the other; a
    package that fails is recorded in its registry's outcome and the rest carry on."""
    outcomes = []
    for registry, specs in packages.items():
        if not specs:
            continue
        started = time.monotonic()
        installed: list[str] = []
        failed: list[tuple[str, str]] = []
        for spec in check(registry, specs):
            why = _install_one(connection, registry, spec)
            if why is None:
                installed.append(spec)
            else:
                failed.append((spec, why))
        seconds = time.monotonic() - started
        outcomes.append(Outcome(registry.name, tuple(installed), tuple(failed), seconds))
    return outcomes


def _install_one(connection: Connection, registry: Registry, spec: str) -> str | None:
    """None when `spec` installed, else why not."""
    # The home folder, not /workspace: a project's .npmrc or uv.toml there must not steer
    # what the sandbox installs for every agent.
    result = connection.exec(
        install_argv(registry, spec),
        cwd=policy.SANDBOX_HOME,
        timeout=connection.settings.timeout,
        merge_output=True,
    )
    if result.cause != "exit":
        return result.error or f"ended by {result.cause} after {result.duration_s:.0f} s"
    if result.exit_code == 0:
        return None
    return failure_reason(result.stdout) or f"exit code {result.exit_code}"


def failure_reason(output: str) -> str:
    """The line of an installer's output that says why it failed: uv's last cause, else
    the first error line (npm's message, not its error code or log file)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    first_error = next((i for i, line in enumerate(lines) if _ERROR_PREFIX.match(line)), 0)
    reasons = [_ERROR_PREFIX.sub("", line, count=1) for line in lines[first_error:]]
    reasons = [line for line in reasons if line and not _NOISE.match(line)]
    causes = [line for line in reasons if line.lower().startswith(("cause:", "caused by:"))]
    chosen = causes[-1] if causes else reasons[0] if reasons else ""
    return chosen[:REASON_CHARS]


def digest(packages: Mapping[Registry, Sequence[str]]) -> str:
    """Identity of a package request, to tell whether a running sandbox already had it."""
    text = json.dumps({r.name: list(specs) for r, specs in packages.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def on_start(connection: Connection, started: bool) -> list[str]:
    """Install the configured packages if `up()` just created or started the sandbox, or if
    the running sandbox has not had this package list yet; the lines to show (none when
    there was nothing to do)."""
    packages = requested(connection.settings)
    if not any(packages.values()):
        return []
    wanted = digest(packages)
    if not started and _marker(connection) == wanted:
        return []
    if connection.settings.network == "none":
        lines = [f"bootstrap skipped: {connection.name} has no network (network: none)"]
    else:
        lines = [line for outcome in install(connection, packages) for line in outcome.lines()]
    _write_marker(connection, wanted)
    return lines


def _marker(connection: Connection) -> str:
    result = connection.exec(["cat", "--", MARKER], timeout=MARKER_TIMEOUT_S)
    return result.stdout.strip() if result.exit_code == 0 else ""


def _write_marker(connection: Connection, wanted: str) -> None:
    script = 'printf "%s\\n" "$2" > "$1"'  # the values travel as arguments, not in the script
    connection.exec(["/bin/sh", "-c", script, "sh", MARKER, wanted], timeout=MARKER_TIMEOUT_S)
