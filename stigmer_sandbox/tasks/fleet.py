"""`sandbox.ls`, `sandbox.snapshot`, `sandbox.snapshots`: every sandbox of this project
(pooled, forked, long-lived), and the snapshots sandboxes and pools start from."""

from __future__ import annotations

from invoke import Context

from .. import console
from ._common import sandbox_for, settings, task


@task(help={"json": "print the sandboxes as JSON (default: off)"})
def ls(c: Context, json: bool = False) -> None:
    """List every sandbox of this project: name, state, image, age, owner, workspace."""
    from ..runtime import fleet

    console.listing(
        fleet.listing(),
        json,
        "no sandboxes (start one: inv sandbox.up)",
        ("name", "state", "image", "age", "owner", "workspace"),
        lambda s: (
            *(s[key] for key in ("name", "state", "image")),
            fleet.age_text(s["age_s"]),
            s["owner"],
            s["workspace"],
        ),
    )


@task(
    help={
        "name": "snapshot name: lower-case letters, digits, _ . - (required, no default)",
        "replace": "overwrite a snapshot of that name (default: off)",
        "json": "print the result as JSON (default: off)",
    }
)
def snapshot(c: Context, name: str, replace: bool = False, json: bool = False) -> None:
    """Keep the running sandbox's filesystem and workspace as a named snapshot."""
    taken = sandbox_for(c).snapshot(name, replace=replace)
    if json:
        console.emit_json(taken)
        return
    console.success(
        f"snapshot {taken['name']} ({taken['image']}) in {taken['seconds']:.2f} s; running "
        "processes, /tmp and sessions are not kept"
    )


@task(
    help={
        "delete": "remove this snapshot (image and workspace) instead of listing (default: none)",
        "json": "print the snapshots as JSON (default: off)",
    }
)
def snapshots(c: Context, delete: str | None = None, json: bool = False) -> None:
    """List the snapshots sandboxes and pools can start from (or delete one)."""
    from ..runtime import snapshots as kept

    current = settings(c)
    if delete is not None:
        if not kept.delete(current, kept.check_name(delete)):
            console.warning(f"no snapshot named {delete}")
            return
        console.success(f"removed snapshot {delete}")
        return
    console.listing(
        kept.listing(),
        json,
        "no snapshots (take one: inv sandbox.snapshot NAME)",
        ("name", "created", "image size", "workspace", "from sandbox"),
        lambda s: (
            s["name"],
            s["created"][:19].replace("T", " "),
            console.human_bytes(s["size"]),
            console.human_bytes(s["workspace_bytes"]),
            s["source"],
        ),
    )


TASKS = (ls, snapshot, snapshots)
