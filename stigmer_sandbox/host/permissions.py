"""`fix-permissions`: the guide's "Permission denied" fixes, done safely.

Ownership is changed by a throwaway helper container that has only
CAP_CHOWN, no network, and nothing but the one folder mounted; `find -P`
never follows a symlink and `chown -h` changes the link itself, so nothing
outside the folder can change, whatever the sandbox planted in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import engine, labels, policy
from ..config import Settings
from ..errors import SandboxError, UsageError

TARGET = "/target"
MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to chown


@dataclass(frozen=True)
class OwnershipChange:
    """What happened (or would happen) to one folder."""

    folder: Path
    entries: int
    problems: str


def target_owner(to_host: bool, uid: int | None, gid: int | None) -> tuple[int, int]:
    """The owner to give: explicit uid/gid, the host user, or the user the sandbox runs as
    (the host user's ids, or 1000 for a root host user: `policy.sandbox_user`)."""
    default = policy.host_user() if to_host else policy.sandbox_user()
    if uid is not None or gid is not None:
        base = uid if uid is not None else default[0]
        owner = base, gid if gid is not None else base
        if not all(0 <= value <= MAX_ID for value in owner):
            # find reads `-uid -5` as "below 5": a bad id must never reach the script
            raise UsageError(f"--uid/--gid must be between 0 and {MAX_ID}, got {uid}:{gid}")
        return owner
    return default


def _script(uid: int, gid: int, dry_run: bool) -> str:
    action = "" if dry_run else f"-exec chown -h {uid}:{gid} {{}} + "
    return f"find -P {TARGET} \\( ! -uid {uid} -o ! -gid {gid} \\) {action}-printf x | wc -c"


def _helper_image(settings: Settings) -> str:
    for candidate in (settings.base_image, settings.image):
        if engine.image_id(candidate):
            return candidate
    raise SandboxError(
        "no image to run the helper from",
        "run `inv sandbox.bootstrap-base` or `inv sandbox.build-basic`",
    )


def fix_ownership(settings: Settings, uid: int, gid: int, dry_run: bool) -> list[OwnershipChange]:
    """Give the workspace and logs folders (and everything in them) to uid:gid."""
    from docker.types import Mount

    folders = policy.sandbox_folders(settings)  # every folder checked before any change
    image = _helper_image(settings)
    changes = []
    for folder in folders.values():
        if not folder.is_dir():
            continue
        with engine.engine_errors():
            container = engine.client().containers.run(
                image,
                ["sh", "-c", _script(uid, gid, dry_run)],
                user="0:0",
                cap_drop=["ALL"],
                cap_add=["CHOWN"],
                security_opt=["no-new-privileges:true"],
                network_mode="none",
                mounts=[Mount(TARGET, str(folder), type="bind")],
                labels=labels.project_labels("helper"),
                detach=True,
            )
            try:
                container.wait(timeout=600)
                out = container.logs(stdout=True, stderr=False).decode().strip()
                err = container.logs(stdout=False, stderr=True).decode(errors="replace").strip()
            finally:
                container.remove(force=True)
        count = int(out) if out.isdigit() else 0
        changes.append(OwnershipChange(folder, count, err.splitlines()[0][:160] if err else ""))
    return changes
