"""Private workspaces: a folder of its own for each pooled, forked or snapshot-born sandbox.

Such a sandbox mounts `<state_dir>/sandboxes/<name>/workspace` (and `logs`) instead of the
project's workspace, so two of them never see each other's files. The folder is this
tool's state, not the user's workspace: it lives and dies with its sandbox. A marker file
beside the mounted folders (`owner.json`, out of the sandbox's reach) names the sandbox
and the host process that made it; nothing is ever deleted without it, so cleanup can
tell our folders from anything else and find those a crashed process left behind.
Snapshots keep their workspace the same way under `<state_dir>/snapshots/<name>/`.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from .. import labels
from ..config import Settings
from ..errors import SandboxError

SANDBOXES = "sandboxes"
SNAPSHOTS = "snapshots"
MARKER = "owner.json"
# `create` makes a folder under this prefix, its name and its maker's pid, then renames it.
STAGING = ".making-"
MOUNTED = ("workspace", "logs")
# On a pooled, forked or snapshot-born sandbox: the private folder that goes with it.
PRIVATE_LABEL = f"{labels.PREFIX}.private"


def sandboxes_root(settings: Settings) -> Path:
    """Where private sandbox folders live."""
    return settings.path("state_dir") / SANDBOXES


def snapshots_root(settings: Settings) -> Path:
    """Where snapshots keep their workspaces."""
    return settings.path("state_dir") / SNAPSHOTS


def create(root: Path, name: str, copy_from: Path | None = None) -> Path:
    """A new private folder `root/name` with its marker and empty `workspace` and `logs`,
    the workspace a copy of `copy_from` when given (symlinks copied as links, never
    followed). It is made whole under a staging name and then renamed, so `root/name`
    never exists without its marker, even when the process is killed midway (a kill
    while the marker was written once left a folder cleanup could not call ours); a
    half-made folder is removed before the error goes up."""
    folder = root / name
    root.mkdir(parents=True, exist_ok=True)
    if folder.exists() or folder.is_symlink():
        raise SandboxError(f"{folder} already exists", "pick another name")
    staging = root / f"{STAGING}{name}.{os.getpid()}"
    staging.mkdir(mode=0o755)
    try:
        _write_marker(staging, name)
        for mounted in MOUNTED:
            (staging / mounted).mkdir()
        if copy_from is not None:
            copy_tree(copy_from, staging / "workspace")
        try:  # onto a folder made meanwhile (never empty: it has a marker) it fails
            os.rename(staging, folder)
        except OSError:
            raise SandboxError(f"{folder} already exists", "pick another name") from None
    except BaseException:
        remove(staging)
        raise
    return folder


def half_made_owner(folder: Path, root: Path) -> dict[str, Any] | None:
    """The maker (pid, this host) of a folder `create` was killed while making, from its
    staging name; None for any other folder."""
    if folder.parent != root or folder.is_symlink() or not folder.is_dir():
        return None
    if not folder.name.startswith(STAGING):
        return None
    _, _, pid = folder.name.rpartition(".")
    return {"pid": int(pid), "host": os.uname().nodename} if pid.isdigit() else None


def _write_marker(folder: Path, name: str) -> None:
    marker = {"name": name, "pid": os.getpid(), "host": os.uname().nodename, "at": time.time()}
    (folder / MARKER).write_text(json.dumps(marker), encoding="utf-8")


def copy_tree(source: Path, target: Path) -> None:
    """Copy the contents of `source` into the existing folder `target`, owners, modes,
    links and sparse files kept (`cp -a`, reflinks where the filesystem has them)."""
    done = subprocess.run(
        ["cp", "-a", "--reflink=auto", "--", f"{source}/.", f"{target}/"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["cp failed"])[-1][:200]
        hint = None
        if "No space left" in why:
            hint = "free disk space on the host"
        elif "Permission denied" in why:
            hint = "a command made a file unreadable (chmod 000?); `inv fix-permissions` resets it"
        raise SandboxError(f"copying the workspace {source} failed: {why}", hint)


def marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a private folder, or None when it has none (then it is not ours)."""
    try:
        entry = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and entry.get("name") == folder.name else None


def is_private(folder: Path, root: Path) -> bool:
    """Whether `folder` is one of ours: a real folder directly in `root`, with its marker."""
    return (
        folder.parent == root
        and not folder.is_symlink()
        and folder.is_dir()
        and marker(folder) is not None
    )


def private_folder_of(container: Any) -> Path | None:
    """The private folder a sandbox container's `PRIVATE_LABEL` names, if it really is its
    own (named after it, directly in a sandboxes root, with our marker)."""
    named = container.labels.get(PRIVATE_LABEL, "")
    folder = Path(named) if named.startswith("/") else None
    if folder is None or folder.name != container.name or folder.parent.name != SANDBOXES:
        return None
    return folder if is_private(folder, folder.parent) else None


def remove(folder: Path) -> None:
    """Delete a private folder and everything a sandbox wrote in it, once no container
    uses it. Never follows a symlink; a tree deeper than PATH_MAX or than Python's
    recursion limit, or folders a command left without permissions, do not stop it
    (coreutils walk by descriptors; `chmod -R` fixes each folder before entering it)."""
    if folder.is_symlink():
        folder.unlink()
        return
    if not folder.exists():
        return
    if os.geteuid() != 0:  # root needs no permission bits to delete
        _coreutils(["chmod", "-R", "u+rwx", "--", str(folder)], folder, check=False)
    _coreutils(["rm", "-rf", "--one-file-system", "--", str(folder)], folder)


def _coreutils(argv: list[str], folder: Path, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"{argv[0]} failed"])[-1][:200]
        raise SandboxError(f"cannot remove {folder}: {why}")
    return done.stdout


def owner_gone(entry: dict[str, Any]) -> bool:
    """Whether the process that made a folder is known to have ended (this host only)."""
    pid = entry.get("pid")
    return isinstance(pid, int) and labels.owner_gone(pid, entry.get("host"))


def size_bytes(folder: Path) -> int:
    """Bytes `folder` takes on disk (blocks, so a sparse file counts what it uses; links
    not followed; 0 when missing). `du` walks trees of any depth."""
    if not folder.is_dir() or folder.is_symlink():
        return 0
    first = _coreutils(["du", "-s", "-B1", "--", str(folder)], folder, check=False).split()
    return int(first[0]) if first and first[0].isdigit() else 0
