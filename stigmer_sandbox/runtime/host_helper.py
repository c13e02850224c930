"""The `stigmer-exec` helper every sandbox runs comes from the host, not from its image.

Each command runs through the root-owned helper (see `policy`). Its bytes are read once
per project image (the image a sandbox, or the first of a chain of forks and snapshots,
was started from) into `<state_dir>/helpers/<image id>/`, beside their sha256, and
bind-mounted read-only over the helper's path in every sandbox. Root in a running sandbox
cannot replace it (the mount is read-only and busy), and whatever a fork or snapshot
image holds at that path is never run. A copy whose bytes no longer match its sha256 is
read again from the image.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

from .. import engine, labels, policy
from ..config import Settings
from ..errors import SandboxError
from .backends.base import Backend
from .backends.docker import DOCKER

HELPERS = "helpers"
HELPER_NAME = policy.EXEC_HELPER.rpartition("/")[2]
MAX_HELPER_BYTES = 16 * 2**20
# On fork and snapshot images: the project image their chain started from.
PROJECT_IMAGE_LABEL = f"{labels.PREFIX}.project-image"
CAPTURED_KINDS = ("snapshot", "fork")


def project_image(image: Any) -> str:
    """The id of the project image `image` (an SDK image) descends from: its own id, or
    for a fork or snapshot image the one its label names."""
    marks = image.labels or {}
    if marks.get(labels.KIND) in CAPTURED_KINDS and marks.get(PROJECT_IMAGE_LABEL):
        return str(marks[PROJECT_IMAGE_LABEL])
    return str(image.id)


def copy_for(settings: Settings, image_ref: str, backend: Backend = DOCKER) -> Path:
    """The host copy of the helper of `image_ref`'s project image, read now if it is
    missing or does not match its sha256. When the project image is gone (rebuilt and
    cleaned), the helper is read from `image_ref` itself: a checked fork or snapshot
    holds its project image's helper unchanged (see `root_guard`)."""
    image = engine.image(image_ref)
    project = project_image(image)
    folder = settings.path("state_dir") / HELPERS / project.removeprefix("sha256:")[:12]
    copy = folder / HELPER_NAME
    if _intact(copy):
        return copy
    source = project if engine.find_image(project) is not None else str(image.id)
    data = backend.read_image_file(source, policy.EXEC_HELPER, MAX_HELPER_BYTES)
    _store(folder, data)
    return copy


def mount(settings: Settings, image_ref: str, backend: Backend = DOCKER) -> Any:
    """The read-only bind mount of the host's helper over the helper's path (for
    `containers.create`'s `mounts`)."""
    from docker.types import Mount

    source = copy_for(settings, image_ref, backend)
    return Mount(policy.EXEC_HELPER, str(source), type="bind", read_only=True)


def stable_form(mount: Any) -> dict[str, Any]:
    """A mount as a container's identity sees it: the helper by its sha256, not by where
    its copy lives (two callers with different state folders must not recreate each
    other's sandbox), any other mount as it is."""
    form = dict(mount)
    if form.get("Target") == policy.EXEC_HELPER:
        digest = _digest_file(Path(str(form["Source"])))
        form["Source"] = "sha256:" + digest.read_text(encoding="ascii").strip()
    return form


def _digest_file(copy: Path) -> Path:
    return copy.with_name(copy.name + ".sha256")


def _intact(copy: Path) -> bool:
    """A regular file (no link) whose sha256 is the one written beside it."""
    try:
        if copy.is_symlink() or not copy.is_file():
            return False
        expected = _digest_file(copy).read_text(encoding="ascii").strip()
        return hashlib.sha256(copy.read_bytes()).hexdigest() == expected
    except OSError:
        return False


def _store(folder: Path, data: bytes) -> None:
    """Write the helper and its sha256, each by rename (concurrent starts write the same
    bytes; a reader sees a whole file or none). Root-owned when this runs as root."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o755)
    copy = folder / HELPER_NAME
    for target, content, mode in (
        (copy, data, 0o755),
        (_digest_file(copy), hashlib.sha256(data).hexdigest().encode(), 0o644),
    ):
        staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        try:
            staging.write_bytes(content)
            os.chmod(staging, mode)
            os.replace(staging, target)
        except OSError as exc:
            staging.unlink(missing_ok=True)
            raise SandboxError(
                f"cannot keep the helper copy in {folder}: {exc.strerror}",
                "check the state folder's permissions and free space",
            ) from None
