"""Installing and starting a Docker Engine on a machine that has none.

Only for hosts without a service manager running Docker (CI machines,
containers, fresh VMs). An engine this module starts is recorded in a pid file
so that `stop` never touches an engine somebody else runs.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .. import console, engine
from ..errors import EngineError, SandboxError

PACKAGES = ("docker.io", "docker-compose", "debootstrap")
MANUAL_STEPS = (
    "install Docker Engine for your OS (https://docs.docker.com/engine/install/), "
    "the compose plugin, and debootstrap; then run `inv engine.start`"
)
# Where dockerd notes its own pid (its default --pidfile), for an engine we did not start.
SYSTEM_PID_FILE = Path("/var/run/docker.pid")


@dataclass(frozen=True)
class EngineState:
    """Where an engine started by this tool keeps its pid and log."""

    state_dir: Path

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "dockerd.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "dockerd.log"


def is_debian_like() -> bool:
    """Whether this is a Linux whose packages come from Debian's or Ubuntu's archive."""
    try:
        text = Path("/etc/os-release").read_text(encoding="utf-8")
    except OSError:
        return False
    ids = {
        value.strip().strip('"')
        for line in text.splitlines()
        if line.startswith(("ID=", "ID_LIKE="))
        for value in line.split("=", 1)[1].split()
    }
    return bool(ids & {"debian", "ubuntu"})


def missing_packages() -> list[str]:
    """The engine packages dpkg does not have installed."""
    missing = []
    for name in PACKAGES:
        probe = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", name], capture_output=True, text=True, check=False
        )
        if "install ok installed" not in probe.stdout:
            missing.append(name)
    return missing


def install() -> list[str]:
    """Install the engine packages from the distribution; returns what was installed."""
    if platform.system() != "Linux" or not is_debian_like():
        raise SandboxError("automatic install supports Debian and Ubuntu only", MANUAL_STEPS)
    missing = missing_packages()
    if missing:
        apt_install(missing)
    return missing


def apt_install(names: list[str]) -> None:
    """Install Debian packages with apt-get as root; one clear error otherwise."""
    if os.geteuid() != 0:
        raise SandboxError(
            f"installing {', '.join(names)} needs root",
            f"run: sudo apt-get update && sudo apt-get install -y {' '.join(names)}",
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", *names],
    ):
        console.echo_command(argv)
        if subprocess.run(argv, env=env, check=False).returncode != 0:
            raise SandboxError(f"`{' '.join(argv)}` failed", "see the apt output above")


def engine_answers() -> bool:
    """Whether an engine answers at the configured address."""
    engine.reset_client()
    try:
        engine.ping()
    except EngineError:
        return False
    return True


def _service_manager_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def start(state: EngineState, timeout_s: float = 60, data_root: str | None = None) -> str:
    """Make sure an engine answers; start `dockerd` ourselves when nothing else would."""
    if engine_answers():
        return "already running"
    if _service_manager_running():
        raise EngineError(
            "the Docker Engine is not running", "start it with: sudo systemctl start docker"
        )
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise EngineError("Docker Engine is not installed", "run `inv engine.install`")
    if os.geteuid() != 0:
        raise EngineError(
            "starting dockerd needs root",
            f"run `sudo inv engine.start`, or use rootless Docker: {engine.ROOTLESS_DOCS}",
        )
    state.state_dir.mkdir(parents=True, exist_ok=True)
    argv = [dockerd] + (["--data-root", data_root] if data_root else [])
    with state.log_file.open("ab") as log:
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    state.pid_file.write_text(str(process.pid), encoding="utf-8")
    _wait_until_up(process, state, timeout_s)
    return f"started dockerd (pid {process.pid}, log {state.log_file})"


def _wait_until_up(process: subprocess.Popen[bytes], state: EngineState, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if engine_answers():
            return
        if process.poll() is not None:
            raise EngineError(
                f"dockerd exited with code {process.returncode}: {_last_line(state)}",
                f"see {state.log_file}",
            )
        time.sleep(0.25)
    raise EngineError(
        f"dockerd did not answer within {timeout_s:.0f} s: {_last_line(state)}",
        f"see {state.log_file}",
    )


def _last_line(state: EngineState) -> str:
    try:
        lines = state.log_file.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "no log"
    return lines[-1][:200] if lines else "empty log"


def _started_pid(state: EngineState) -> int | None:
    return _dockerd_pid(state.pid_file)


def _dockerd_pid(pid_file: Path) -> int | None:
    """The pid in `pid_file` when that process is alive and is a dockerd."""
    try:
        pid = int(pid_file.read_text(encoding="utf-8").strip())
        os.kill(pid, 0)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"dockerd" in cmdline else None


def reload(state: EngineState, system_pid_file: Path = SYSTEM_PID_FILE) -> str:
    """Make the running dockerd re-read its daemon.json (SIGHUP; never a restart).

    The engine `start` started comes first; then one run by systemd (`systemctl
    reload`); then the dockerd named by its own pid file. Returns what was done.
    """
    pid = _started_pid(state)
    if pid is None and _service_manager_running():
        argv = ["systemctl", "reload", "docker"]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise EngineError(
                f"`{' '.join(argv)}` failed: {(done.stderr or done.stdout).strip()[:160]}",
                "run it as root: sudo systemctl reload docker",
            )
        return "reloaded the engine (systemctl reload docker)"
    pid = pid or _dockerd_pid(system_pid_file)
    if pid is None:
        raise EngineError(
            "cannot find the running dockerd to reload",
            "reload it yourself (no restart needed): sudo kill -HUP <pid of dockerd>",
        )
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        raise EngineError(
            f"reloading dockerd (pid {pid}) needs root", "run it again with sudo"
        ) from None
    return f"reloaded dockerd (pid {pid}, SIGHUP; running containers untouched)"


def stop(state: EngineState, timeout_s: float = 30) -> str:
    """Stop the engine this tool started; never one started by anything else."""
    pid = _started_pid(state)
    if pid is None:
        state.pid_file.unlink(missing_ok=True)
        return "no engine started by this tool is running; nothing stopped"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.2)
    state.pid_file.unlink(missing_ok=True)
    engine.reset_client()
    return f"stopped dockerd (pid {pid})"
