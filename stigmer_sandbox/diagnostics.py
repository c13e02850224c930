"""`doctor`: everything that decides whether the sandbox can work on this host.

Each check yields a `Check` with a status (pass, warn, fail), a detail and a
fix. Only checks marked `required` decide the exit status.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from . import ca, compose, engine
from .config import Settings
from .errors import SandboxError

MIN_FREE_DISK = 5 * 1000**3
CRITICAL_FREE_DISK = 1 * 1000**3


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report."""

    name: str
    status: str
    detail: str
    hint: str = ""
    required: bool = False

    @property
    def failed(self) -> bool:
        return self.required and self.status == "fail"


def _version_of(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _python_checks() -> Iterator[Check]:
    ok = sys.version_info >= (3, 11)
    yield Check(
        "python",
        "pass" if ok else "fail",
        platform.python_version(),
        "use Python 3.11 or newer",
        required=True,
    )
    for name, minimum in (
        ("invoke", (2, 2)),
        ("docker", (7, 1)),
        ("pyyaml", (6, 0)),
        ("colorama", (0, 4)),
    ):
        version = _version_of(name)
        good = version is not None and compose.version_tuple(version) >= minimum
        yield Check(
            f"{name} (Python)",
            "pass" if good else "fail",
            version or "not installed",
            "pip install -e '.[dev]'",
            required=True,
        )


def _cli_version() -> Check:
    docker_cli = shutil.which("docker")
    if not docker_cli:
        return Check(
            "docker CLI",
            "warn",
            "not found (the tool itself does not need it)",
            "install the docker client for `docker` commands in the guide",
        )
    done = subprocess.run(
        [docker_cli, "version", "--format", "{{.Client.Version}}"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    version = done.stdout.strip() or "unknown"
    return Check("docker CLI", "pass", f"{version} ({docker_cli})")


def _engine_checks(settings: Settings) -> Iterator[Check]:
    try:
        report = engine.ping()
    except SandboxError as exc:
        yield Check("docker engine", "fail", exc.message, exc.hint or "", required=True)
        return
    yield Check(
        "docker engine",
        "pass",
        f"{report.get('Version')} (API {report.get('ApiVersion')}, "
        f"{report.get('Os')}/{report.get('Arch')}) at {engine.engine_url()}",
        required=True,
    )
    yield from _disk_check()
    yield _registry_check(settings)
    yield from _image_checks(settings)


def _disk_check() -> Iterator[Check]:
    with engine.engine_errors():
        root = engine.client().info().get("DockerRootDir", "")
    if not root or not Path(root).exists():
        yield Check("disk", "pass", f"data root {root or '?'} is remote; not checked")
        return
    free = shutil.disk_usage(root).free
    status = "pass" if free >= MIN_FREE_DISK else "warn" if free >= CRITICAL_FREE_DISK else "fail"
    yield Check(
        "disk",
        status,
        f"{free / 1000**3:.1f} GB free under {root}",
        "free space: `inv clean --all`, see `docker system df`",
    )


def _registry_check(settings: Settings) -> Check:
    try:
        with engine.engine_errors():
            engine.client().images.get_registry_data(settings.upstream_base)
    except SandboxError as exc:
        return Check(
            "registry",
            "warn",
            f"cannot reach the registry for {settings.upstream_base}: {exc.message[:120]}",
            "fine offline: images build from `inv sandbox.bootstrap-base`",
        )
    return Check("registry", "pass", f"{settings.upstream_base} can be pulled")


def _image_checks(settings: Settings) -> Iterator[Check]:
    import docker.errors

    wanted = (
        ("base image", settings.base_image, "inv sandbox.bootstrap-base"),
        ("sandbox image", settings.image, "inv sandbox.build-basic"),
    )
    for label, name, fix in wanted:
        try:
            with engine.engine_errors():
                found = engine.client().images.get(name)
        except (docker.errors.ImageNotFound, SandboxError):
            yield Check(label, "warn", f"{name} not built yet", f"run `{fix}`")
            continue
        size = found.attrs.get("Size", 0) / 1000**2
        yield Check(
            label, "pass", f"{name} ({found.short_id.removeprefix('sha256:')}, {size:.0f} MB)"
        )


def _compose_check(settings: Settings) -> Check:
    try:
        tool = compose.detect(settings.compose)
    except SandboxError as exc:
        return Check("compose", "warn", exc.message, exc.hint or "")
    return Check("compose", "pass", f"{tool.flavour} {tool.version} ({' '.join(tool.prefix)})")


def _buildkit_check() -> Check:
    if _succeeds(["docker", "buildx", "version"]):
        return Check("buildkit", "pass", "buildx plugin available")
    return Check(
        "buildkit",
        "pass",
        "no buildx; builds use the engine's classic builder through the SDK, which this tool needs",
    )


def _succeeds(argv: list[str]) -> bool:
    if not shutil.which(argv[0]):
        return False
    done = subprocess.run(argv, capture_output=True, timeout=20, check=False)
    return done.returncode == 0


def _workspace_check(settings: Settings) -> Check:
    path = settings.path("workspace")
    if not path.is_dir():
        return Check(
            "workspace",
            "warn",
            f"{path} does not exist",
            "it is created by `inv sandbox.up`, or mkdir it",
        )
    info = path.stat()
    writable = os.access(path, os.W_OK)
    detail = f"{path} owner {info.st_uid}:{info.st_gid}, {'writable' if writable else 'read-only'}"
    if not writable:
        return Check("workspace", "fail", detail, "run `inv fix-permissions --to-host`")
    return Check("workspace", "pass", detail)


def _ca_check(settings: Settings) -> Check:
    try:
        found = ca.detect(settings.ca_cert)
    except SandboxError as exc:
        return Check("extra CA", "fail", exc.message, exc.hint or "")
    if found is None:
        return Check("extra CA", "pass", "none (builds use the image's default CAs)")
    return Check("extra CA", "pass", f"{found.path} (from {found.source}); builds trust it")


def run_checks(settings: Settings) -> list[Check]:
    """Every check, in report order."""
    checks: list[Check] = [*_python_checks(), _cli_version()]
    checks.extend(_engine_checks(settings))
    extra: list[Callable[[], Check]] = [
        lambda: _compose_check(settings),
        _buildkit_check,
        lambda: _workspace_check(settings),
        lambda: _ca_check(settings),
    ]
    checks.extend(step() for step in extra)
    return checks


def report(checks: list[Check]) -> dict[str, object]:
    """The JSON form of the report."""
    return {"ok": not any(c.failed for c in checks), "checks": [asdict(c) for c in checks]}
