"""gVisor on this host: install `runsc`, register it with the engine, tell whether it works.

`inv engine.install --gvisor` installs Debian's `runsc` package and merges the runtimes
`isolation.RUNTIME` and `isolation.OFFLINE_RUNTIME` into dockerd's daemon.json (every other
key and runtime kept; the file replaced atomically), then makes a running engine re-read
it with SIGHUP. It never restarts the engine: running containers keep running. Where no
engine runs yet, dockerd reads the file when it starts (`inv engine.start` runs it with its default
`--config-file`, /etc/docker/daemon.json).

Never registered here: gVisor's own network stack (its start fails on these kernels and
leaves runsc processes behind) and `--platform=kvm` (hangs the engine). Dockerd 20.10
passes runtime arguments through a wrapper script with an unquoted `$@`, so an argument
with a space would be split: refused.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import engine, isolation, labels
from ..checks import CheckResult
from ..errors import EngineError, SandboxError
from . import daemon

DAEMON_JSON = Path("/etc/docker/daemon.json")
PACKAGE = "runsc"
MANUAL_STEPS = (
    "install gVisor's runsc as /usr/bin/runsc (https://gvisor.dev/docs/user_guide/install/), "
    "then run `inv engine.install --gvisor` again"
)
SMOKE_COMMAND = ("uname", "-r")


def runsc_installed(runsc: str = isolation.RUNSC) -> bool:
    """Whether the runsc binary the runtime entry names is there."""
    return os.access(runsc, os.X_OK)


def runsc_version() -> str:
    """runsc's own version line (`0.0~20221219.0`), or "unknown"."""
    return isolation.runsc_version() or "unknown"


def install_runsc() -> bool:
    """Install Debian's runsc package when the binary is missing; True when it was."""
    if runsc_installed():
        return False
    if platform.system() != "Linux" or not daemon.is_debian_like():
        raise SandboxError(
            "automatic install of runsc supports Debian and Ubuntu only", MANUAL_STEPS
        )
    daemon.apt_install([PACKAGE])
    if not runsc_installed():
        raise SandboxError(f"the {PACKAGE} package did not provide {isolation.RUNSC}", MANUAL_STEPS)
    return True


# --- daemon.json ---------------------------------------------------------------------


def read_config(path: Path) -> dict[str, Any]:
    """daemon.json as a dict ({} when missing or empty); one clear error when unusable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise SandboxError(
            f"cannot read {path}: {exc.strerror}", "run it again with sudo"
        ) from None
    if not text.strip():
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SandboxError(
            f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})",
            "fix it by hand first: dockerd refuses it too",
        ) from None
    if not isinstance(config, dict):
        raise SandboxError(f"{path} is not a JSON object", "fix it by hand first")
    return config


def merged(
    config: Mapping[str, Any], name: str, entry: Mapping[str, Any], source: Path
) -> dict[str, Any] | None:
    """`config` with the runtime `name` added under `runtimes` (everything else kept), or
    None when it is already there as `entry`. Refuses an entry of that name with other
    content: it belongs to someone else."""
    for arg in entry.get("runtimeArgs", []):
        if not arg or any(ch.isspace() for ch in arg):
            # dockerd's runtime wrapper passes the arguments through an unquoted $@.
            raise SandboxError(f"runtime argument {arg!r} is empty or has a space")
    runtimes = config.get("runtimes", {})
    if not isinstance(runtimes, dict):
        raise SandboxError(f"{source}: the key runtimes is not a JSON object", "fix it by hand")
    current = runtimes.get(name)
    if current == dict(entry):
        return None
    if current is not None:
        raise SandboxError(
            f"{source}: runtimes.{name} already exists with other content "
            f"({json.dumps(current)}); not overwritten",
            "remove or rename that entry, then run `inv engine.install --gvisor` again",
        )
    return {**config, "runtimes": {**runtimes, name: dict(entry)}}


def write_config(path: Path, config: Mapping[str, Any]) -> None:
    """Replace `path` atomically (a temporary file beside it, renamed over it), keeping
    its mode; a dockerd reading it at that moment sees the old file or the new one."""
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except PermissionError:
        raise SandboxError(
            f"writing {path} needs root", "run `sudo inv engine.install --gvisor`"
        ) from None
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(config, indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        temporary.chmod(mode)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def register(path: Path = DAEMON_JSON, checkpoints: bool = False) -> bool:
    """Merge the gVisor runtimes into daemon.json at `path` (with `checkpoints`, also
    `"experimental": true`, which checkpoints need); True when the file changed."""
    config = original = read_config(path)
    for name, entry in isolation.runtime_entries().items():
        config = merged(config, name, entry, path) or config
    if checkpoints and config.get("experimental") is not True:
        config = {**config, "experimental": True}
    if config == original:
        return False
    write_config(path, config)
    return True


def registered_in(path: Path = DAEMON_JSON) -> bool:
    """Whether daemon.json at `path` holds this project's runtime entries (False when
    unreadable)."""
    try:
        config = read_config(path)
    except SandboxError:
        return False
    runtimes = config.get("runtimes")
    return isinstance(runtimes, dict) and all(
        runtimes.get(name) == entry for name, entry in isolation.runtime_entries().items()
    )


# --- the running engine ----------------------------------------------------------------


def engine_lists_runtime() -> bool:
    """Whether the engine's `docker info` lists the gVisor runtimes."""
    with engine.engine_errors():
        info = engine.client().info()
    return all(isolation.unusable_reason(info, name) is None for name in isolation.RUNTIME_ARGS)


def wait_listed(timeout_s: float = 20) -> None:
    """Poll `docker info` until the engine lists the runtime; one error after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not engine_lists_runtime():
        if time.monotonic() > deadline:
            raise EngineError(
                f"the engine did not list the runtimes {' and '.join(isolation.RUNTIME_ARGS)} "
                f"within {timeout_s:.0f} s of the reload",
                "see the engine's log: dockerd keeps its old settings when it cannot read "
                "daemon.json",
            )
        time.sleep(0.2)


@dataclass(frozen=True)
class Smoke:
    """What a gVisor container said its kernel was, and how long its run took."""

    kernel: str
    seconds: float


def smoke(
    image: str, timeout_s: float = 60, extra_labels: Mapping[str, str] | None = None
) -> Smoke:
    """Run `uname -r` in a throwaway container of `image` under gVisor; the container is
    removed whatever happens, a hung one included (after `timeout_s`)."""
    import requests.exceptions

    client = engine.client()
    started = time.monotonic()
    with engine.engine_errors():
        container = client.containers.create(
            image,
            list(SMOKE_COMMAND),
            name=f"stigmer-gvisor-smoke-{uuid.uuid4().hex[:8]}",
            runtime=isolation.RUNTIME,
            labels={**labels.project_labels("probe"), **(extra_labels or {})},
        )
    try:
        with engine.engine_errors():
            container.start()
            try:
                status = container.wait(timeout=timeout_s)
            except requests.exceptions.RequestException:
                raise EngineError(
                    f"the gVisor smoke test did not finish within {timeout_s:.0f} s",
                    "see the engine's log; the container was removed",
                ) from None
            output = container.logs().decode(errors="replace").strip()
    finally:
        with engine.engine_errors():
            container.remove(force=True)
    seconds = time.monotonic() - started
    if status.get("StatusCode") != 0:
        last = output.splitlines()[-1][:160] if output else "no output"
        raise EngineError(
            f"the gVisor smoke test exited {status.get('StatusCode')}: {last}",
            "see the engine's log",
        )
    return Smoke(output.splitlines()[-1] if output else "", seconds)


def install(
    state: daemon.EngineState,
    image: str,
    config_path: Path = DAEMON_JSON,
    checkpoints: bool = False,
) -> Iterator[str]:
    """Install runsc, register it, reload a running engine and smoke-test it; yields a
    line for each step as it is done. Running it again changes nothing. `checkpoints`
    also turns on the engine's experimental mode, which takes effect at its next start
    (a reload does not apply it, and this never restarts an engine)."""
    yield (
        f"installed {PACKAGE} ({runsc_version()})"
        if install_runsc()
        else f"{PACKAGE} already installed ({runsc_version()})"
    )
    names = " and ".join(isolation.RUNTIME_ARGS)
    written = register(config_path, checkpoints)
    yield (
        f"registered the runtimes {names} in {config_path}"
        + (" with experimental mode (checkpoints)" if checkpoints else "")
        if written
        else f"{names} already registered in {config_path}"
    )
    if not daemon.engine_answers():
        yield "no engine runs: dockerd reads the runtimes when it starts (`inv engine.start`)"
        return
    if checkpoints and not engine.experimental():
        yield (
            "checkpoints need the engine restarted to enter experimental mode (this never "
            "restarts it): `inv engine.stop && inv engine.start` if this project started it"
        )
    if engine_lists_runtime():
        yield f"the engine already lists {names}"
    else:
        yield daemon.reload(state)
        wait_listed()
        yield f"the engine lists {names}"
    if engine.find_image(image) is None:
        yield f"smoke test skipped: {image} is not built (`inv sandbox.build-basic`)"
        return
    result = smoke(image)
    command = " ".join(SMOKE_COMMAND)
    yield f"smoke test: `{command}` under gVisor says {result.kernel} ({result.seconds:.1f} s)"


# --- inv doctor ------------------------------------------------------------------------


def check_verdict(
    info: Mapping[str, Any], runsc_present: bool, in_config: bool, config_path: Path = DAEMON_JSON
) -> CheckResult:
    """The doctor's "gvisor" line from `docker info`, whether runsc is installed and whether
    daemon.json registers it. Never a failure: gVisor is optional."""
    reason = isolation.unusable_reason(info)
    if reason is None:
        entry = (info.get("Runtimes") or {}).get(isolation.RUNTIME) or {}
        path = entry.get("path", "?")
        return CheckResult(
            "gvisor",
            "pass",
            f"usable: the engine runs {isolation.RUNTIME} with {path}",
            required=False,
        )
    if not runsc_present:
        detail = f"not usable: {isolation.RUNSC} is not installed"
        return CheckResult("gvisor", "warn", detail, isolation.INSTALL_HINT, required=False)
    if in_config:
        return CheckResult(
            "gvisor",
            "warn",
            f"not usable: {config_path} registers {isolation.RUNTIME} but the engine has not "
            "reloaded it",
            "run `inv engine.install --gvisor` (reloads the engine with SIGHUP; no restart)",
            required=False,
        )
    return CheckResult(
        "gvisor",
        "warn",
        f"not usable: {reason} (not registered in {config_path})",
        isolation.INSTALL_HINT,
        required=False,
    )


def check(info: Mapping[str, Any], config_path: Path = DAEMON_JSON) -> CheckResult:
    """The doctor's "gvisor" line for this host and the engine whose `docker info` this is."""
    present = runsc_installed()
    result = check_verdict(info, present, registered_in(config_path), config_path)
    if result.passed and present:
        detail = f"{result.detail} (runsc {runsc_version()})"
        return CheckResult(result.name, "pass", detail, required=False)
    return result
