"""What a fork or snapshot may carry: nothing that runs as root in the sandboxes born from it.

A sandbox's root side runs files of the container's own filesystem: the keep-alive and
the health check (bash scripts, with `id`, `setpriv`, `sleep` from root's PATH), the
agent (`/usr/bin/python3 -I -S` and its standard library), the `stigmer-exec` helper, the
loader and shared libraries all of them map, and the user database they read. Commands
run as the sandbox user, who cannot write any of it; but a command that somehow became
root (or anyone with `docker exec -u 0` or `docker cp`) could, and a fork or snapshot
would carry the change into every sandbox started from it: a helper that forges results,
a python3 or stdlib module that lies, an `/etc/ld.so.preload`.

So `capture` checks the engine's list of changes while the container is paused, before
anything is committed: a path in the trusted set that was added, changed or deleted, or a
folder on the way to it that was replaced or made writable by others, refuses the fork or
snapshot with one line naming the path. Normal work (packages in /opt/venv or
~/.local, npm globals in /opt/node, files in /home/sandbox and /workspace) never touches
the set. A setuid file elsewhere passes: no-new-privileges makes it worthless.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .. import policy
from ..errors import SandboxError
from .backends.base import ADDED, DELETED, MODIFIED

# Everything a sandbox's root side runs, loads or reads to decide who a command runs as.
TRUSTED = (
    policy.EXEC_HELPER.rpartition("/")[0],  # the helper's folder
    policy.KEEPALIVE,
    policy.HEALTHCHECK_COMMAND,
    "/usr/bin",  # root's PATH (policy.ROOT_PATH) and python3*; with merged /usr, /bin too
    "/usr/sbin",
    "/bin",
    "/sbin",
    "/usr/lib",  # python3.11's standard library, the loader, shared libraries, locales
    "/usr/lib32",
    "/usr/lib64",
    "/usr/libx32",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/usr/pyvenv.cfg",  # python3 reads it beside or above its binary: it moves the stdlib
    "/etc/ld.so.preload",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/ld.so.cache",
    "/etc/passwd",
    "/etc/group",
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/nsswitch.conf",
)
# `--init`'s mount point: the engine adds it to every container (docker-init is mounted
# from the host over it, read-only, in every sandbox started from the image).
ENGINE_MADE = frozenset({"/usr/sbin/docker-init", "/sbin/docker-init"})
# Go's fs.FileMode bits, as the archive endpoint reports a path's mode.
GO_DIR, GO_SYMLINK = 1 << 31, 1 << 27
WRITABLE_BY_OTHERS = 0o022
KIND_WORDS = {MODIFIED: "changed", ADDED: "added", DELETED: "deleted"}


def is_trusted(path: str) -> bool:
    """Whether `path` is in the trusted set or inside one of its folders."""
    return any(path == root or path.startswith(root + "/") for root in TRUSTED)


def leads_to_trusted(path: str) -> bool:
    """Whether `path` is a folder on the way to the trusted set (`/usr`, `/etc`...): whoever
    may replace or write it may swap what lies below."""
    prefix = path.rstrip("/") + "/"
    return any(root.startswith(prefix) for root in TRUSTED)


def is_relevant(path: str) -> bool:
    """Whether a change to `path` matters here (the rest is not even listed)."""
    return is_trusted(path) or leads_to_trusted(path)


def safe_folder(mode: int | None) -> bool:
    """A real folder nobody but its owner may write (the owner, root, cannot be changed by
    a sandbox: no CAP_CHOWN): a change to it is only a change below, checked apart."""
    return (
        mode is not None
        and bool(mode & GO_DIR)
        and not mode & GO_SYMLINK
        and not mode & WRITABLE_BY_OTHERS
    )


def first_violation(
    changes: Iterable[tuple[str, int]], mode_of: Callable[[str], int | None]
) -> str | None:
    """The first change that would carry privilege ("PATH added" ...), or None. `mode_of`
    is asked only about changed folders of the trusted set or on the way to it."""
    for path, kind in changes:
        if kind == ADDED and path in ENGINE_MADE:
            continue
        if not is_relevant(path):
            continue
        if kind == MODIFIED and safe_folder(mode_of(path)):
            continue
        return f"{path} {KIND_WORDS.get(kind, 'changed')}"
    return None


def check(
    name: str, changes: Iterable[tuple[str, int]], mode_of: Callable[[str], int | None]
) -> None:
    """Refuse to capture sandbox `name` when its changes touch what runs as root."""
    violation = first_violation(changes, mode_of)
    if violation is not None:
        raise SandboxError(
            f"sandbox {name} cannot be forked or snapshotted: {violation}, which runs as "
            "root in every sandbox started from it",
            "only root can change it: remove this sandbox (`inv sandbox.down`) and start a new one",
        )
