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

import errno
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import egress, isolation
from .config import parse_size
from .errors import ConfigError, SandboxError

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
# The configuration key behind each mount target, for errors that name what to fix.
MOUNT_KEYS = {
    WORKSPACE: "workspace",
    LOGS: "logs",
    **{f"{SANDBOX_HOME}/{name}": key for key, name in CREDENTIAL_MOUNTS.items()},
}
# Symlinks followed while resolving a path before it counts as a loop (the kernel's limit).
MAX_SYMLINK_HOPS = 40
# Host folders are opened one component at a time, never through a symlink. O_PATH (Linux)
# also passes folders the user may search but not list.
_FOLDER_FLAGS = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_PATH", os.O_RDONLY)
# Sizes the kernel's tmpfs takes as they are (its memparse: digits and one k/m/g).
_KERNEL_SIZE = re.compile(r"\d+[kmgKMG]?", re.ASCII)
_IDENTITY = re.compile(r"\d+:\d+", re.ASCII)
# A mount check whose answer came back empty or cut is asked again (it only reads).
MOUNT_CHECK_ATTEMPTS = 3
# What opening a component answers when it is a symlink or not a folder (any more).
_SWAPPED = (errno.ELOOP, errno.ENOTDIR)


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
    try:
        resolved = resolved_path(path)
    except ValueError as exc:
        return str(exc)
    return resolved_problem(resolved, protected, credentials, read_only)


def resolved_path(path: Path) -> Path:
    """`path` with `~` expanded and every symlink followed; ValueError saying why not."""
    try:
        return path.expanduser().resolve()
    except (ValueError, RuntimeError, OSError) as exc:  # NUL, a loop, a swap while read
        raise ValueError(f"is not a usable path ({exc})") from None


def resolved_problem(
    resolved: Path, protected: Protected, credentials: bool = False, read_only: bool = False
) -> str | None:
    """`mount_problem` of a path already resolved (checked as it is, not resolved again)."""
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
    """`path` resolved, or a ConfigError naming the key and the reason. The path returned
    is exactly the one checked: resolved once, never again."""
    try:
        resolved = resolved_path(path)
        problem = resolved_problem(resolved, Protected.of(settings), credentials)
    except ValueError as exc:
        resolved, problem = path, str(exc)
    if problem:
        raise ConfigError(
            f"{key}: {resolved} {problem}; refusing to mount it",
            f"set `{key}` to a folder of its own, such as ./{key}",
        )
    return resolved


def resolution_trail(path: Path) -> list[Path]:
    """Every directory entry looked up while resolving the absolute `path`, in order,
    symlinks followed as the kernel would (the entries, not just the end point)."""
    pending = list(path.parts[1:])
    current, trail, hops = Path("/"), [], 0
    while pending and hops <= MAX_SYMLINK_HOPS:
        name = pending.pop(0)
        if name == "..":
            current = current.parent
            continue
        entry = current / name
        trail.append(entry)
        try:
            target = os.readlink(entry)
        except (OSError, ValueError):  # not a symlink, missing, unreadable: a plain step
            current = entry
            continue
        hops += 1
        if target.startswith("/"):
            current = Path("/")
        pending = [part for part in Path(target).parts if part not in ("/", ".")] + pending
    return trail


def planted_problem(path: Path, writable: dict[str, Path]) -> str | None:
    """Why `path` could be redirected by a sandbox, or None: resolving it looks up an entry
    inside a folder a sandbox writes to (`writable`: key -> resolved folder), where a
    command can swap in a symlink to any host folder before the next start."""
    for entry in resolution_trail(path):
        for key, folder in writable.items():
            if folder in entry.parents:
                return f"goes through {entry}, inside the {key} folder {folder}"
    return None


def sandbox_folders(settings: Settings) -> dict[str, Path]:
    """The host folders a sandbox mounts read-write (workspace, logs), checked: each on its
    own, and neither reached through the other (a sandbox could redirect it)."""
    folders = {
        key: checked_mount(settings, key, settings.path(key)) for key in ("workspace", "logs")
    }
    for key in folders:
        others = {other: path for other, path in folders.items() if other != key}
        problem = planted_problem(settings.path_unresolved(key), others)
        if problem:
            raise ConfigError(
                f"{key}: {settings.path_unresolved(key)} {problem}; refusing to mount it",
                "keep the workspace and logs folders side by side, neither inside the other",
            )
    return folders


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
    the sandbox user). Every folder is created and changed through descriptors opened
    one component at a time without following a symlink, so a symlink swapped in after
    the check fails the start instead of redirecting a mkdir or chown.
    """
    folders = sandbox_folders(settings)
    credential_folders(settings)
    give_away = (user or host_user())[0] == 0
    for key, folder in folders.items():
        with open_folder(key, folder, create=True) as fd:
            if give_away and os.fstat(fd).st_uid == 0:
                _chown_folder(fd, sandbox_user(user))
    return folders


def _chown_folder(fd: int, owner: tuple[int, int]) -> None:
    readable = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    try:  # "." of a pinned folder is that folder: no path is looked up again
        os.fchown(readable, *owner)
    finally:
        os.close(readable)


@contextmanager
def open_folder(key: str, folder: Path, create: bool = False) -> Iterator[int]:
    """A descriptor of the absolute, resolved `folder`, opened from `/` one component at a
    time without following a symlink (missing components made when `create`). A symlink
    or a file found on the way means the folder changed since it was checked: one error
    naming `key`."""
    fd = _open_folder(key, folder, create)
    try:
        yield fd
    finally:
        os.close(fd)


def _open_folder(key: str, folder: Path, create: bool) -> int:
    fd = os.open("/", _FOLDER_FLAGS)
    try:
        for name in folder.parts[1:]:
            child = _open_child(fd, name, create)
            os.close(fd)
            fd = child
    except OSError as exc:
        os.close(fd)
        raise _folder_error(key, folder, exc) from None
    return fd


def _open_child(parent: int, name: str, create: bool) -> int:
    try:
        return os.open(name, _FOLDER_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise
    with suppress(FileExistsError):  # made by someone else meanwhile: opened (and checked) below
        os.mkdir(name, dir_fd=parent)
    return os.open(name, _FOLDER_FLAGS, dir_fd=parent)


def _folder_error(key: str, folder: Path, exc: OSError) -> SandboxError:
    if exc.errno in _SWAPPED:
        return SandboxError(
            f"{key}: {folder} changed while the sandbox was starting (a symlink or a file "
            "replaced a folder on its path); refusing to mount it",
            "make sure nothing else renames or replaces that folder, then start again",
        )
    return SandboxError(f"{key}: {folder} cannot be opened: {exc.strerror}")


@dataclass(frozen=True)
class PinnedMount:
    """A bind mount's host folder as it was checked: the inode a sandbox must see there."""

    key: str
    source: Path
    target: str
    device: int
    inode: int


def pin_mounts(mounts: Iterable[Mapping[str, Any]]) -> tuple[PinnedMount, ...]:
    """The identity (device, inode) of each bind mount's source (`Source`, `Target`, as in
    `container_spec(...)["mounts"]`), taken through descriptors that never follow a
    symlink, so it is the folder the policy checked."""
    pins = []
    for mount in mounts:
        key, source = MOUNT_KEYS.get(mount["Target"], mount["Target"]), Path(mount["Source"])
        with open_folder(key, source) as fd:
            found = os.fstat(fd)
        pins.append(PinnedMount(key, source, mount["Target"], found.st_dev, found.st_ino))
    return tuple(pins)


def folder_mounts(folders: Mapping[str, Path]) -> list[dict[str, str]]:
    """`sandbox_folders`' result as the mounts `pin_mounts` reads (for compose's sandbox)."""
    targets = {key: target for target, key in MOUNT_KEYS.items()}
    return [{"Source": str(path), "Target": targets[key]} for key, path in folders.items()]


def mount_identities_command(pins: tuple[PinnedMount, ...]) -> list[str]:
    """The root command that prints `device:inode` of each mount target, one a line
    (bind mounts keep the host's device number); never follows a symlink at the target."""
    return ["/usr/bin/stat", "-c", "%d:%i", "--", *(pin.target for pin in pins)]


def changed_mount(pins: tuple[PinnedMount, ...], output: bytes) -> PinnedMount | None:
    """The first pinned mount the sandbox does not see as pinned, from the command's output."""
    seen = output.decode(errors="replace").split()
    for index, pin in enumerate(pins):
        if index >= len(seen) or seen[index] != f"{pin.device}:{pin.inode}":
            return pin
    return None


def well_formed(pins: tuple[PinnedMount, ...], output: bytes) -> bool:
    """Whether `output` is one `device:inode` per pin: an answer to compare (under load the
    engine has returned an exec's status with its output missing, which is no answer)."""
    seen = output.decode(errors="replace").split()
    return len(seen) == len(pins) and all(_IDENTITY.fullmatch(item) for item in seen)


def _mount_identities(
    pins: tuple[PinnedMount, ...], backend: Any, container: Any
) -> tuple[int, bytes]:
    if isolation.of_container(container) == "gvisor":  # gVisor's stat shows its own numbers
        return isolation.host_identities(container.id, [pin.target for pin in pins])
    return backend.run_root(
        container.id,
        mount_identities_command(pins),
        user="0:0",
        environment={"PATH": ROOT_PATH},
    )


def verify_mounts(pins: tuple[PinnedMount, ...], backend: Any, container: Any) -> None:
    """Check from inside the started `container` that each mount is the pinned folder;
    on a mismatch (a folder swapped between the check and the mount) remove the
    container before any command runs and raise one error naming the key."""
    if not pins:
        return
    for _attempt in range(MOUNT_CHECK_ATTEMPTS):
        status, output = _mount_identities(pins, backend, container)
        if status == 0 and well_formed(pins, output):
            break
        time.sleep(0.1)
    changed = changed_mount(pins, output)
    if status == 0 and changed is None:
        return
    from . import engine  # the engine client is heavy: only a failed check needs it here

    with engine.engine_errors():
        container.remove(force=True)
    if status != 0 or not well_formed(pins, output):
        shown = output.decode(errors="replace").strip()[:160]
        raise SandboxError(f"the sandbox's mounts could not be checked ({shown}); it was removed")
    assert changed is not None
    raise SandboxError(
        f"{changed.key}: {changed.source} changed while the sandbox was starting (the "
        f"folder mounted at {changed.target} is not the one checked); the sandbox was removed",
        "make sure nothing else renames or replaces that folder, then start again",
    )


def tmpfs_size(size: str) -> str:
    """A configured size as the kernel's tmpfs reads it: `512m` as written; what only the
    settings accept (`2gb`, `1.5g`, ` 1g`) in bytes, which the mount would refuse."""
    return size if _KERNEL_SIZE.fullmatch(size) else str(parse_size(size))


def _bind(source: Path, target: str, read_only: bool = False) -> Any:
    from docker.types import Mount

    return Mount(target, str(source), type="bind", read_only=read_only, propagation="rprivate")


def _runtime(settings: Settings) -> str | None:
    """The engine runtime a sandbox runs under (None: the engine's default)."""
    return isolation.runtime_for(settings.isolation, egress.mode_of(settings))


def _process_ulimits(settings: Settings) -> dict[str, Any]:
    """The `ulimits` key holding a gVisor sandbox's commands to its process limit (none
    under runc: a runc sandbox's configuration hash stays what it was)."""
    from docker.types import Ulimit

    limits = isolation.process_ulimits(settings.isolation, settings.pids_limit)
    return {"ulimits": [Ulimit(**limit) for limit in limits]} if limits else {}


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
        "pids_limit": isolation.host_pids_limit(settings.isolation, settings.pids_limit),
        "mem_limit": memory,
        "memswap_limit": memory,
        "nano_cpus": int(settings.cpus * 1e9) or None,
        # exec: builds and venvs in /tmp must run; the tmpfs counts against mem_limit.
        "tmpfs": {
            "/tmp": f"rw,exec,nosuid,nodev,size={tmpfs_size(settings.tmp_size)}",
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
        **_process_ulimits(settings),
        # Only when chosen: a default sandbox's configuration hash stays what it was.
        **({"runtime": runtime} if (runtime := _runtime(settings)) else {}),
    }
