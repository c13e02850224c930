"""Fork and snapshot: a sandbox's filesystem state, kept or branched.

What a sandbox's commands changed under `/` (installed packages, files in the home
folder) is committed to an image; its workspace, a host folder, is copied beside it.
The container is paused for both, so the image and the workspace show the same instant.
Running processes, the tmpfs mounts (`/tmp`, the sessions and process records under
`/run/stigmer`) and the memory of the sandbox are not carried: a sandbox started from a
snapshot or a fork starts with no process of its own.

- A snapshot is the image `stigmer-sandbox-snapshot:<name>` (kind `snapshot`) and the
  folder `<state_dir>/snapshots/<name>/workspace`; both go with `inv clean --all`.
- A fork is a new sandbox from the image `stigmer-sandbox-fork:<its name>` (kind
  `fork`), removed with the fork.

A committed image would inherit the container's labels, owner and expiry included, and
so would every container started from it: the commit overrides them.

Nothing that runs as root passes through a capture (`root_guard`, checked while paused,
before the commit); the image names the image it was checked against, and a snapshot
whose label does not name its parent image (one committed by hand, even from a sandbox
born of a snapshot, whose labels it inherits) is refused.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from .. import engine, labels
from ..config import Settings, parse_size
from ..errors import SandboxError, UsageError
from ..images.record import ImageRecord
from . import host_helper, root_guard, workspaces
from .backends.base import Backend


class Source(Protocol):
    """What a capture needs of the sandbox it copies (a `Sandbox` is one)."""

    name: str
    settings: Settings
    backend: Backend

    def paused(self) -> AbstractContextManager[Any]:
        """The running sandbox frozen, its container yielded."""


SNAPSHOT_REPOSITORY = "stigmer-sandbox-snapshot"
FORK_REPOSITORY = "stigmer-sandbox-fork"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
UNIQUE_SUFFIX = re.compile(r"(-[0-9a-f]{8})+$")
# Labels a container carries that must not pass to the image, nor from it to containers.
PER_CONTAINER = ("owner-pid", "owner-host", "expires", "sandbox", "config", "pool", "private")
# On a snapshot image: the private folder that holds its workspace.
WORKSPACE_LABEL = f"{labels.PREFIX}.snapshot-workspace"
# On a fork or snapshot image: the image its changes were checked against (its parent).
CHECKED_LABEL = f"{labels.PREFIX}.checked-against"
# On a fork image: the process that made it, which starts its fork next (cleanup waits).
FORKED_BY_PID = f"{labels.PREFIX}.forked-by-pid"
FORKED_BY_HOST = f"{labels.PREFIX}.forked-by-host"


def check_name(name: object, kind: str = "snapshot") -> str:
    """A valid name of a snapshot (or of another `kind` named by the same rules)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid {kind} name {name!r}: use lower-case letters, digits, '_', '.' and '-' "
            "(at most 63, starting with a letter or digit)"
        )
    return name


def snapshot_image(name: str) -> str:
    """The image that holds snapshot `name`."""
    return f"{SNAPSHOT_REPOSITORY}:{check_name(name)}"


def fork_image(sandbox_name: str) -> str:
    """The image a fork named `sandbox_name` starts from."""
    return f"{FORK_REPOSITORY}:{sandbox_name}"


def _image_labels(kind: str, source: Source, folder: Path, parent: Any) -> dict[str, str]:
    """The labels a capture of `source` (running the image `parent`) commits."""
    cleared = {f"{labels.PREFIX}.{key}": "" for key in PER_CONTAINER}
    return {
        **cleared,
        labels.KIND: kind,
        f"{labels.PREFIX}.source": source.name,
        WORKSPACE_LABEL: str(folder) if kind == "snapshot" else "",
        CHECKED_LABEL: str(parent.id),
        host_helper.PROJECT_IMAGE_LABEL: host_helper.project_image(parent),
        FORKED_BY_PID: str(os.getpid()) if kind == "fork" else "",
        FORKED_BY_HOST: os.uname().nodename if kind == "fork" else "",
    }


def workspace_of(image: Any) -> Path | None:
    """The private folder holding a snapshot image's workspace (its label, checked: a
    folder named after the snapshot, in a `snapshots` folder, with our marker)."""
    named = (image.labels or {}).get(WORKSPACE_LABEL, "")
    folder = Path(named) if named.startswith("/") else None
    tags = [tag.rpartition(":")[2] for tag in image.tags or ()]
    if folder is None or folder.name not in tags or folder.parent.name != workspaces.SNAPSHOTS:
        return None
    return folder if workspaces.is_private(folder, folder.parent) else None


def capture(
    sandbox: Source, image_ref: str, kind: str, folder: Path, final: Path | None = None
) -> Path:
    """Commit `sandbox`'s filesystem to `image_ref` and copy its workspace into the new
    private `folder` (the image names `final`, where the folder will end up, if it is not
    `folder`); the folder. Nothing is left behind when it fails."""
    with sandbox.paused() as container:
        parent = engine.image(str(container.attrs["Image"]))
        marks = _image_labels(kind, sandbox, final or folder, parent)
        changes = [f"LABEL {key}={json.dumps(value)}" for key, value in marks.items()]
        _check_size(sandbox, container)
        _check_unshared(sandbox, container)
        with ThreadPoolExecutor(max_workers=1) as background:
            # The check may need the engine's diff (~0.7 s): it runs while the workspace copies.
            checked = background.submit(_check_root_side, sandbox, container)
            made = workspaces.create(folder.parent, folder.name, sandbox.settings.path("workspace"))
            try:
                checked.result()
                image_id = sandbox.backend.commit(container, image_ref, changes)
            except BaseException:
                workspaces.remove(made)
                raise
    ImageRecord.of(sandbox.settings).add(kind, [image_id])
    return made


def _check_root_side(sandbox: Source, container: Any) -> None:
    """Refuse a capture that would carry a change to what runs as root (`root_guard`)."""
    backend = sandbox.backend
    root_guard.check(
        sandbox.name,
        backend.changes(container, root_guard.is_relevant),
        lambda path: backend.path_mode(container, path),
    )


def _check_size(sandbox: Source, container: Any) -> None:
    """Refuse to copy a root filesystem a command bloated (a disk filler, by accident or
    not) before the engine spends minutes and the disk on it (checked while paused, so
    it cannot grow after the check)."""
    limit = parse_size(sandbox.settings.snapshot_max_size)
    changed = sandbox.backend.changed_bytes(container)
    if changed > limit:
        raise UsageError(
            f"sandbox {sandbox.name}'s commands added {changed / 2**20:.0f} MiB outside "
            f"/workspace; a fork or snapshot copies at most snapshot_max_size "
            f"({sandbox.settings.snapshot_max_size})",
            "delete what is not needed (caches under /home/sandbox, /opt/venv), or raise "
            "snapshot_max_size",
        )


def _check_unshared(sandbox: Source, container: Any) -> None:
    """The workspace is copied while its sandbox is paused; another running container that
    mounts it could swap a folder for a symlink mid-copy and point the copy elsewhere on
    the host. Refuse then (a pooled or forked sandbox's workspace is never shared)."""
    others = sandbox.backend.sharing(container, str(sandbox.settings.path("workspace")))
    if others:
        raise SandboxError(
            f"the workspace of {sandbox.name} is also mounted by the running "
            f"container(s) {', '.join(others)}; a copy now would not be safe",
            "stop them first (`inv compose.down`, `inv sandbox.ls`), or fork a pooled sandbox",
        )


def take(sandbox: Source, name: str, replace: bool = False) -> dict[str, Any]:
    """Keep `sandbox`'s state as snapshot `name`; refuses to overwrite one unless `replace`.
    A replacement is made aside first: the old snapshot goes only once the new one exists."""
    image_ref = snapshot_image(name)
    root = workspaces.snapshots_root(sandbox.settings)
    exists = engine.image_id(image_ref) or (root / name).exists()
    if exists and not replace:
        raise UsageError(f"snapshot {name} already exists", "pick another name, or replace it")
    started = time.monotonic()
    if not exists:
        folder = capture(sandbox, image_ref, "snapshot", root / name)
    else:
        folder = _replace(sandbox, name, root)
    return {
        "name": name,
        "image": image_ref,
        "workspace": str(folder / "workspace"),
        "seconds": round(time.monotonic() - started, 3),
    }


def _replace(sandbox: Source, name: str, root: Path) -> Path:
    token = uuid.uuid4().hex[:8]
    # Named as `workspaces.create` names its staging folders: a kill leaves one `inv clean` removes.
    staging_root = root / f"{workspaces.STAGING}{name}-{token}.{os.getpid()}"
    staging_ref = f"{SNAPSHOT_REPOSITORY}:{name}.staging-{token}"
    try:
        staged = capture(sandbox, staging_ref, "snapshot", staging_root / name, root / name)
        delete(sandbox.settings, name)
        staged.rename(root / name)
        with engine.engine_errors():
            engine.client().images.get(staging_ref).tag(SNAPSHOT_REPOSITORY, name)
    finally:
        engine.remove_image(staging_ref)  # the tag only: the image keeps its final one
        workspaces.remove(staging_root)
    return root / name


def listing() -> list[dict[str, Any]]:
    """Every snapshot: name, image size, when, which sandbox it came from, workspace size."""
    filters = {"label": [f"{labels.MANAGED}=true", f"{labels.KIND}=snapshot"]}
    found = []
    with engine.engine_errors():
        images = engine.client().images.list(filters=filters)
    for image in images:
        folder = workspace_of(image)
        for tag in image.tags:
            repository, _, name = tag.rpartition(":")
            if repository != SNAPSHOT_REPOSITORY:
                continue
            found.append(
                {
                    "name": name,
                    "image": tag,
                    "created": image.attrs.get("Created", ""),
                    "size": int(image.attrs.get("Size") or 0),
                    "source": (image.labels or {}).get(f"{labels.PREFIX}.source", ""),
                    "workspace": str(folder / "workspace") if folder else "",
                    "workspace_bytes": workspaces.size_bytes(folder / "workspace") if folder else 0,
                }
            )
    return sorted(found, key=lambda entry: entry["created"])


def delete(settings: Settings, name: str) -> bool:
    """Remove snapshot `name` (its image and workspace); whether there was one. Sandboxes
    started from it keep running."""
    image = engine.find_image(snapshot_image(name))
    folders = [workspaces.snapshots_root(settings) / name]
    if image is not None:
        folders.insert(0, workspace_of(image) or folders[0])
        engine.remove_image(snapshot_image(name))  # by tag: untags one still in use
    gone = [folder for folder in folders if workspaces.is_private(folder, folder.parent)]
    for folder in gone:
        workspaces.remove(folder)
    return image is not None or bool(gone)


def find(name: str) -> tuple[str, Path]:
    """The image and workspace folder of snapshot `name`; a clear error when either is
    gone, or when the image is not one `capture` checked."""
    image = engine.find_image(snapshot_image(name))
    folder = workspace_of(image) if image is not None else None
    if image is None or folder is None:
        raise UsageError(
            f"no snapshot named {name}" + (" (its workspace is gone)" if image else ""),
            "see `inv sandbox.snapshots` for the ones there are",
        )
    if not checked(image):
        raise SandboxError(
            f"snapshot {name} was not made by `snapshot` (its image was committed or "
            "tagged another way), so nothing shows it carries no change to what runs as root",
            f"delete it (`inv sandbox.snapshots --delete {name}`) and take it again",
        )
    return snapshot_image(name), folder


def checked(image: Any) -> bool:
    """Whether `capture` checked this image's changes: its label names its parent image.
    A hand-made commit of a sandbox inherits the label of the image that sandbox ran,
    which is then its parent's parent, not its parent."""
    parent = str(image.attrs.get("Parent") or "")
    return bool(parent) and (image.labels or {}).get(CHECKED_LABEL) == parent


def new_name(settings: Settings) -> str:
    """A unique container name for a new private sandbox: the configured name and a random
    suffix (a fork of a fork gets one suffix, not one per generation)."""
    base = UNIQUE_SUFFIX.sub("", settings.container_name)
    return f"{base}-{uuid.uuid4().hex[:8]}"
