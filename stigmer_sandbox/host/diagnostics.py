"""`doctor`: everything that decides whether the sandbox can work on this host.

Each check yields a `CheckResult` with a status (pass, warn, fail), a detail and a
fix. Low disk space and an unreadable extra CA are not `required`: they show as
failures but do not decide the exit status; every other failure does.
"""

from __future__ import annotations

import platform
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from .. import engine, isolation, labels, policy
from ..checks import CheckResult, Status, verdict
from ..config import Settings
from ..errors import SandboxError
from ..images import ca
from ..runtime import checkpoints
from . import compose, gvisor

MIN_FREE_DISK = 5 * 1000**3
CRITICAL_FREE_DISK = 1 * 1000**3


def _version_of(distribution: str) -> str | None:
    from importlib import metadata  # slow to import; only `doctor` needs it

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _python_checks() -> Iterator[CheckResult]:
    ok = sys.version_info >= (3, 11)
    yield CheckResult(
        "python",
        verdict(ok),
        platform.python_version(),
        "use Python 3.11 or newer",
    )
    for name, minimum in (
        ("invoke", (2, 2)),
        ("docker", (7, 1)),
        ("pyyaml", (6, 0)),
        ("colorama", (0, 4)),
    ):
        version = _version_of(name)
        good = version is not None and compose.version_tuple(version) >= minimum
        yield CheckResult(
            f"{name} (Python)",
            verdict(good),
            version or "not installed",
            "inv deps.install (the locked versions), or pip install -e '.[dev]'",
        )


def _cli_version() -> CheckResult:
    docker_cli = shutil.which("docker")
    if not docker_cli:
        return CheckResult(
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
    return CheckResult("docker CLI", "pass", f"{version} ({docker_cli})")


def _engine_checks(settings: Settings) -> Iterator[CheckResult]:
    try:
        report = engine.ping()
    except SandboxError as exc:
        yield CheckResult("docker engine", "fail", exc.message, exc.hint)
        return
    yield CheckResult(
        "docker engine",
        "pass",
        f"{report.get('Version')} (API {report.get('ApiVersion')}, "
        f"{report.get('Os')}/{report.get('Arch')}) at {engine.engine_url()}",
    )
    yield from _disk_check()
    yield _gvisor_check()
    yield _checkpoint_check()
    yield _registry_check(settings)
    yield from _image_checks(settings)
    yield _disk_usage_check()
    yield _network_check(settings)


def _disk_check() -> Iterator[CheckResult]:
    with engine.engine_errors():
        root = engine.client().info().get("DockerRootDir", "")
    if not root or not Path(root).exists():
        yield CheckResult("disk", "pass", f"data root {root or '?'} is remote; not checked")
        return
    free = shutil.disk_usage(root).free
    status: Status = (
        "pass" if free >= MIN_FREE_DISK else "warn" if free >= CRITICAL_FREE_DISK else "fail"
    )
    yield CheckResult(
        "disk",
        status,
        f"{free / 1000**3:.1f} GB free under {root}",
        "free space: `inv clean --all`, see `docker system df`",
        required=False,
    )


def _gvisor_check() -> CheckResult:
    """Whether sandboxes can run under gVisor here (optional: a warning at worst)."""
    with engine.engine_errors():
        info = engine.client().info()
    return gvisor.check(info)


def _checkpoint_check() -> CheckResult:
    """Whether sandboxes can be checkpointed with their memory here (optional: a warning
    at worst, saying what is missing)."""
    runtime = isolation.runtime_for("gvisor", "none") or isolation.RUNTIME
    _info, why = checkpoints.engine_verdict(runtime)
    if why:
        return CheckResult("checkpoints", "warn", f"not available: {why}", required=False)
    return CheckResult(
        "checkpoints", "pass", f"available (gVisor, runtime {runtime})", required=False
    )


def _registry_check(settings: Settings) -> CheckResult:
    try:
        with engine.engine_errors():
            engine.client().images.get_registry_data(settings.upstream_base)
    except SandboxError as exc:
        return CheckResult(
            "registry",
            "warn",
            f"cannot reach the registry for {settings.upstream_base}: {exc.message[:120]}",
            "fine offline: images build from `inv sandbox.bootstrap-base`",
        )
    return CheckResult("registry", "pass", f"{settings.upstream_base} can be pulled")


def _image_checks(settings: Settings) -> Iterator[CheckResult]:

    wanted = (
        ("base image", settings.base_image, "inv sandbox.bootstrap-base"),
        ("sandbox image", settings.image, "inv sandbox.build-basic"),
    )
    for label, name, fix in wanted:
        found = engine.find_image(name)
        if found is None:
            yield CheckResult(label, "warn", f"{name} not built yet", f"run `{fix}`")
            continue
        size = found.attrs.get("Size", 0) / 1000**2
        yield CheckResult(
            label, "pass", f"{name} ({found.short_id.removeprefix('sha256:')}, {size:.0f} MB)"
        )


def _compose_check(settings: Settings) -> CheckResult:
    try:
        tool = compose.detect(settings.compose)
    except SandboxError as exc:
        return CheckResult("compose", "warn", exc.message, exc.hint)
    return CheckResult(
        "compose", "pass", f"{tool.flavour} {tool.version} ({' '.join(tool.prefix)})"
    )


def _buildkit_check() -> CheckResult:
    if _succeeds(["docker", "buildx", "version"]):
        return CheckResult("buildkit", "pass", "buildx plugin available")
    return CheckResult(
        "buildkit",
        "pass",
        "no buildx; builds use the engine's classic builder through the SDK, which this tool needs",
    )


def _succeeds(argv: list[str]) -> bool:
    if not shutil.which(argv[0]):
        return False
    done = subprocess.run(argv, capture_output=True, timeout=20, check=False)
    return done.returncode == 0


def _workspace_check(settings: Settings) -> CheckResult:
    path = settings.path("workspace")
    try:
        policy.sandbox_folders(settings)
    except SandboxError as exc:  # the same policy every sandbox path applies
        return CheckResult("workspace", "fail", exc.message, exc.hint)
    if not path.is_dir():
        return CheckResult(
            "workspace",
            "warn",
            f"{path} does not exist",
            "it is created by `inv sandbox.up`, or mkdir it",
        )
    info = path.stat()
    sandbox_uid = policy.sandbox_user()[0]
    detail = f"{path} owner {info.st_uid}:{info.st_gid}, sandbox runs as uid {sandbox_uid}"
    writable = info.st_uid == sandbox_uid or bool(info.st_mode & stat.S_IWOTH)
    if not writable:
        return CheckResult(
            "workspace",
            "warn",
            detail + ": the sandbox cannot write here",
            "run `inv fix-permissions` (or `--to-host` to take the files back)",
        )
    return CheckResult("workspace", "pass", detail)


def _disk_usage_check() -> CheckResult:
    with engine.engine_errors():
        usage = engine.client().df()
        ours = engine.client().images.list(filters=labels.managed_filter())
    images_size = sum(int(i.get("Size") or 0) for i in usage.get("Images") or [])
    cache = sum(int(c.get("Size") or 0) for c in usage.get("BuildCache") or [])
    largest = sorted(ours, key=lambda i: -int(i.attrs.get("Size") or 0))[:3]
    names = ", ".join(
        f"{(i.tags or [i.short_id])[0]} {i.attrs.get('Size', 0) / 1000**2:.0f} MB" for i in largest
    )
    return CheckResult(
        "disk usage",
        "pass",
        f"images {images_size / 1000**3:.1f} GB, build cache "
        f"{cache / 1000**3:.1f} GB; largest of ours: {names or 'none'}",
    )


NETWORK_PROBE = r"""
mirror=$(sed -n 's/^deb \(http[^ ]*\) .*/\1/p; s/^URIs: *//p' \
  /etc/apt/sources.list /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
host=${mirror#*://}; host=${host%%/*}
if getent hosts "$host" >/dev/null; then echo dns=ok; else echo dns=fail; fi
if curl -fsS -m 10 -o /dev/null "$mirror/dists/bookworm/Release"; then echo archive=ok
else echo archive=fail; fi
# No retries: a refused certificate is final (pip's five retries took 8 s).
pip_index() { pip --retries 0 --timeout 10 index versions pip >/dev/null 2>&1; }
if pip_index; then echo pypi=ok; else echo pypi=fail; fi
bundle=/tmp/public-cas.pem  # Debian's public CAs only, without any extra CA
cat /usr/share/ca-certificates/mozilla/*.crt > "$bundle" 2>/dev/null
if (unset REQUESTS_CA_BUNDLE SSL_CERT_FILE; export PIP_CERT="$bundle"; pip_index); then
  echo pypi_plain=ok; else echo pypi_plain=fail; fi
echo "mirror=$mirror"
"""
DNS_FIX = (
    'set the daemon\'s DNS in /etc/docker/daemon.json: {"dns": ["8.8.8.8", "8.8.4.4"]} '
    "and restart it, or build with --network host"
)


def _network_check(settings: Settings) -> CheckResult:
    from ..images.smoke import probe_container

    try:
        with probe_container(settings.image) as container, engine.engine_errors():
            _code, output = container.exec_run(["bash", "-c", NETWORK_PROBE])
    except SandboxError:
        return CheckResult(
            "build network",
            "warn",
            f"not probed: {settings.image} is not built",
            "run `inv sandbox.build-basic`, then `inv doctor` again",
        )
    found = dict(line.split("=", 1) for line in output.decode().splitlines() if "=" in line)
    return _network_verdict(found, ca.detect(settings.ca_cert) is not None)


def _network_verdict(found: dict[str, str], have_ca: bool) -> CheckResult:
    mirror = found.get("mirror") or "Debian's archive"
    if found.get("dns") != "ok":
        return CheckResult("build network", "warn", "containers cannot resolve names", DNS_FIX)
    if found.get("archive") != "ok":
        return CheckResult(
            "build network",
            "warn",
            f"containers cannot reach {mirror}",
            "set HTTP_PROXY/HTTPS_PROXY (passed to builds), build with --network host, "
            "or bootstrap with --mirror URL",
        )
    if found.get("pypi") != "ok":
        return CheckResult(
            "build network",
            "warn",
            "containers reach Debian but not the Python package index",
            "behind a TLS-inspecting proxy pass --ca-cert PATH",
        )
    if found.get("pypi_plain") != "ok":
        detail = "PyPI is reachable only with the extra CA (a TLS-inspecting proxy)"
        return CheckResult(
            "build network",
            "pass" if have_ca else "warn",
            detail,
            None if have_ca else "pass its CA with --ca-cert PATH",
        )
    return CheckResult("build network", "pass", f"containers reach {mirror} and the Python index")


def _ca_check(settings: Settings) -> CheckResult:
    try:
        found = ca.detect(settings.ca_cert)
    except SandboxError as exc:
        return CheckResult("extra CA", "fail", exc.message, exc.hint, required=False)
    if found is None:
        return CheckResult("extra CA", "pass", "none (builds use the image's default CAs)")
    return CheckResult("extra CA", "pass", f"{found.path} (from {found.source}); builds trust it")


def run_checks(settings: Settings) -> list[CheckResult]:
    """Every check, in report order."""
    checks: list[CheckResult] = [*_python_checks(), _cli_version()]
    checks.extend(_engine_checks(settings))
    extra: list[Callable[[], CheckResult]] = [
        lambda: _compose_check(settings),
        _buildkit_check,
        lambda: _workspace_check(settings),
        lambda: _ca_check(settings),
    ]
    checks.extend(step() for step in extra)
    return checks
