"""The sandbox policy: what a sandbox may touch and how it is confined, in one place.

Every path that starts or prepares a sandbox reads it: `Sandbox.up`, the compose
validator and its folder preparation, `fix-permissions`, `doctor`, the derived-uid
image and `sandbox.audit`. Checks run before anything on disk changes.

Privilege separation: the container's PID 1 and its command agent run as uid 0
holding only CAP_SETUID, CAP_SETGID and CAP_KILL (no-new-privileges, every other
capability dropped). Each command runs as the sandbox user with no capabilities
through a root-owned helper that is its subreaper, so a command can neither
signal, trace nor read the agent, and cannot leave its own process tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Settings

SANDBOX_UID = 1000
SANDBOX_GID = 1000
WORKSPACE = "/workspace"
LOGS = "/logs"
# Root-only tmpfs for the agents' shared state: sessions, background processes. Its own
# size limit (it counts against the memory limit too).
RUN_DIR = "/run/stigmer"
RUN_DIR_SIZE = "256m"
SANDBOX_HOME = "/home/sandbox"
# Root-owned files the agent starts by absolute path, never through PATH.
PYTHON = "/usr/bin/python3"
EXEC_HELPER = "/usr/local/libexec/stigmer-sandbox/stigmer-exec"
KEEPALIVE = "/usr/local/bin/sandbox-keepalive"
HEALTHCHECK_COMMAND = "/usr/local/bin/sandbox-healthcheck"
# PATH for anything run as root in a sandbox: the sandbox user owns /opt/venv/bin.
ROOT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# What the agent keeps: switch each command to the sandbox user, and end its processes.
AGENT_CAPABILITIES = ("SETUID", "SETGID", "KILL")
# Never granted to a sandbox (compose files are checked against this list).
DANGEROUS_CAPABILITIES = frozenset(
    {"ALL", "SYS_ADMIN", "SYS_PTRACE", "SYS_MODULE", "NET_ADMIN", "DAC_READ_SEARCH", "SYS_RAWIO"}
)
HOST_NAMESPACE_KEYS = ("network_mode", "pid", "ipc", "uts", "userns_mode")
HEALTHCHECK = {"interval": 5_000_000_000, "timeout": 5_000_000_000, "retries": 3, "start_period": 0}

# Folders a sandbox must never see, nor anything inside them.
SYSTEM_FOLDERS = (
    "/etc", "/proc", "/sys", "/dev", "/boot", "/run", "/var", "/usr",
    "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/snap",
)  # fmt: skip
# Scratch folders inside a system folder that may hold a workspace.
SCRATCH_FOLDERS = ("/var/tmp",)
# Shared top-level folders: a subfolder may be a workspace, the folder itself may not.
SHARED_FOLDERS = ("/", "/home", "/root", "/tmp", "/var/tmp", "/opt", "/srv", "/mnt", "/media")
# Credentials under a home folder: mounted only read-only, by their own opt-in keys.
CREDENTIAL_FOLDERS = (".ssh", ".aws", ".kube", ".docker", ".gnupg", ".config")
DOCKER_SOCKETS = ("/var/run/docker.sock", "/run/docker.sock")
CREDENTIAL_MOUNTS = {"mount_aws": ".aws", "mount_kube": ".kube"}


def host_user() -> tuple[int, int]:
    """The invoking user: under sudo, the user who ran sudo."""
    if os.getuid() == 0 and os.environ.get("SUDO_UID", "").isdigit():
        return int(os.environ["SUDO_UID"]), int(os.environ.get("SUDO_GID", os.environ["SUDO_UID"]))
    return os.getuid(), os.getgid()


def sandbox_user(user: tuple[int, int] | None = None) -> tuple[int, int]:
    """The uid/gid commands run as: the host user's, so workspace files stay theirs; the
    image's sandbox user (1000) for a root host user, whose files a sandbox must not own."""
    uid, gid = user or host_user()
    return (SANDBOX_UID, SANDBOX_GID) if uid == 0 else (uid, gid)


@dataclass(frozen=True)
class Protected:
    """Host folders no mount may be or contain."""

    project: Path
    state: Path
    home: Path

    @classmethod
    def of(cls, settings: Settings) -> Protected:
        return cls(settings.root, settings.path("state_dir"), Path.home().resolve())

    def named(self) -> tuple[tuple[str, Path], ...]:
        return (
            ("the project folder", self.project),
            ("the tool's state folder", self.state),
            ("your home folder", self.home),
        )


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def mount_problem(
    path: Path, protected: Protected, credentials: bool = False, read_only: bool = False
) -> str | None:
    """Why `path` must not be mounted into a sandbox, or None. `credentials` allows the
    folders under home that hold credentials (mounted read-only by their own keys); a
    `read_only` mount may show system and credential folders, never the Docker socket nor
    a folder that holds the project, the tool's state or a home folder."""
    resolved = path.expanduser().resolve()
    problem = _exposure(resolved, protected)
    if problem or read_only:
        return problem
    return _system_folder(resolved) or (None if credentials else _credentials(resolved, protected))


def _exposure(resolved: Path, protected: Protected) -> str | None:
    for socket_path in DOCKER_SOCKETS:
        if _within(Path(socket_path).resolve(), resolved):
            return "would expose the Docker socket (the sandbox must never reach the engine)"
    for name, folder in protected.named():
        if _within(folder, resolved):
            return f"is or contains {name} ({folder})"
    return None


def _system_folder(resolved: Path) -> str | None:
    if str(resolved) in SHARED_FOLDERS:
        return f"is the shared folder {resolved}"
    if any(_within(resolved, Path(folder)) for folder in SCRATCH_FOLDERS):
        return None
    for folder in SYSTEM_FOLDERS:
        if _within(resolved, Path(folder)):
            return f"is inside the system folder {folder}"
    return None


def _credentials(resolved: Path, protected: Protected) -> str | None:
    for name in CREDENTIAL_FOLDERS:
        if _within(resolved, protected.home / name):
            return f"is inside the credentials folder {protected.home / name}"
    return None


def checked_mount(settings: Settings, key: str, path: Path, credentials: bool = False) -> Path:
    """`path` resolved, or a ConfigError naming the key and the reason."""
    problem = mount_problem(path, Protected.of(settings), credentials)
    if problem:
        raise ConfigError(
            f"{key}: {path.expanduser().resolve()} {problem}; refusing to mount it",
            f"set `{key}` to a folder of its own, such as ./{key}",
        )
    return path.expanduser().resolve()


def sandbox_folders(settings: Settings) -> dict[str, Path]:
    """The host folders a sandbox mounts read-write (workspace, logs), checked."""
    return {key: checked_mount(settings, key, settings.path(key)) for key in ("workspace", "logs")}


def credential_folders(settings: Settings) -> dict[str, Path]:
    """The opt-in credential folders (mounted read-only), checked; missing ones are errors."""
    found = {}
    for key, name in CREDENTIAL_MOUNTS.items():
        if not getattr(settings, key):
            continue
        source = Path.home() / name
        if not source.is_dir():
            raise ConfigError(
                f"{key} is on but {source} does not exist", f"create it, or turn {key} off"
            )
        found[name] = checked_mount(settings, key, source, credentials=True)
    return found


def prepare_folders(settings: Settings, user: tuple[int, int] | None = None) -> dict[str, Path]:
    """Check the sandbox's host folders, then create them and make them the sandbox user's.

    Nothing changes on disk before every check passed. Only a folder this created or
    that root owns is given away (a root host user's folders would be read-only for
    the sandbox user); the chown never follows a symlink.
    """
    folders = sandbox_folders(settings)
    credential_folders(settings)
    uid, gid = sandbox_user(user)
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
        if (user or host_user())[0] == 0 and folder.stat().st_uid == 0:
            os.chown(folder, uid, gid, follow_symlinks=False)
    return folders


def _bind(source: Path, target: str, read_only: bool = False) -> Any:
    from docker.types import Mount

    return Mount(target, str(source), type="bind", read_only=read_only, propagation="rprivate")


def container_spec(settings: Settings, image: str, labels: dict[str, str]) -> dict[str, Any]:
    """Everything `containers.create` gets: the confinement, limits and mounts."""
    folders = sandbox_folders(settings)
    credentials = credential_folders(settings)
    command = [KEEPALIVE]
    if settings.max_lifetime_hours:
        lifetime = f"{settings.max_lifetime_hours * 3600:.0f}"
        command = ["/usr/bin/timeout", "-s", "TERM", lifetime, *command]
    memory = settings.memory_bytes
    return {
        "image": image,
        "command": command,
        "name": settings.container_name,
        "hostname": "sandbox",
        "user": "0:0",
        "working_dir": WORKSPACE,
        "detach": True,
        "init": True,
        "cap_drop": ["ALL"],
        "cap_add": list(AGENT_CAPABILITIES),
        "security_opt": ["no-new-privileges:true"],
        "privileged": False,
        "pids_limit": settings.pids_limit,
        "mem_limit": memory,
        "memswap_limit": memory,
        "nano_cpus": int(settings.cpus * 1e9) or None,
        # exec: builds and venvs in /tmp must run; the tmpfs counts against mem_limit.
        "tmpfs": {
            "/tmp": f"rw,exec,nosuid,nodev,size={settings.tmp_size}",
            # Root-only: session state and background processes' records and output.
            RUN_DIR: f"rw,noexec,nosuid,nodev,mode=0700,size={RUN_DIR_SIZE}",
        },
        "read_only": settings.read_only_root,
        "network_mode": settings.network,
        "mounts": [
            _bind(folders["workspace"], WORKSPACE),
            _bind(folders["logs"], LOGS),
            *(_bind(path, f"{SANDBOX_HOME}/{name}", True) for name, path in credentials.items()),
        ],
        "environment": {
            "PYTHONUNBUFFERED": "1",
            "STIGMER_SANDBOX": "1",
            "GIT_AUTHOR_NAME": settings.git_name,
            "GIT_AUTHOR_EMAIL": settings.git_email,
            "GIT_COMMITTER_NAME": settings.git_name,
            "GIT_COMMITTER_EMAIL": settings.git_email,
        },
        "healthcheck": HEALTHCHECK,
        "restart_policy": {"Name": "no"},
        "labels": labels,
    }
