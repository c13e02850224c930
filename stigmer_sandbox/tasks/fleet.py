"""`sandbox.ls`, `sandbox.snapshot(s)`, `sandbox.checkpoint(s)`, `sandbox.from-checkpoint`:
every sandbox of this project (pooled, forked, long-lived), the snapshots sandboxes and
pools start from, and the checkpoints that keep running processes with their memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
    _list_or_delete(
        "snapshot",
        None if delete is None else lambda: kept.delete(current, kept.check_name(delete)),
        delete,
        kept.listing,
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


def _list_or_delete(
    kind: str,
    remove: Callable[[], bool] | None,
    name: str | None,
    listing: Callable[[], list[dict[str, Any]]],
    json: bool,
    empty: str,
    columns: tuple[str, ...],
    row: Callable[[dict[str, Any]], tuple[Any, ...]],
) -> None:
    """The body of the tasks that list what sandboxes start from, or delete one of it."""
    if remove is not None:
        if remove():
            console.success(f"removed {kind} {name}")
        else:
            console.warning(f"no {kind} named {name}")
        return
    console.listing(listing(), json, empty, columns, row)


@task(
    help={
        "name": "checkpoint name: lower-case letters, digits, _ . - (required, no default)",
        "json": "print the result as JSON (default: off)",
    }
)
def checkpoint(c: Context, name: str, json: bool = False) -> None:
    """Keep the running gVisor sandbox whole (processes and memory too) as a checkpoint."""
    taken = sandbox_for(c).checkpoint(name)
    if json:
        console.emit_json(taken)
        return
    console.success(
        f"checkpoint {taken['name']}: {console.human_bytes(taken['bytes'])} of memory in "
        f"{taken['seconds']:.2f} s ({taken['total_seconds']:.2f} s with its filesystem and "
        "workspace); the sandbox runs on, on a new agent channel"
    )


@task(
    help={
        "name": "the checkpoint to start from (required, no default)",
        "json": "print the new sandbox's name and id as JSON (default: off)",
    }
)
def from_checkpoint(c: Context, name: str, json: bool = False) -> None:
    """Start a new sandbox from a checkpoint: its processes run on with their memory."""
    from ..runtime import Sandbox

    box = Sandbox.from_checkpoint(name, settings(c), ephemeral=False)
    if json:
        console.emit_json({"name": box.name, "id": box.status().get("id"), "from": name})
        return
    console.success(
        f"sandbox {box.name} runs from checkpoint {name}, with its own copy of the "
        "workspace; `inv sandbox.ls` lists it, `inv clean --all` removes it"
    )


@task(
    help={
        "delete": "remove this checkpoint (image, memory, workspace) instead of listing "
        "(default: none)",
        "json": "print the checkpoints as JSON (default: off)",
    }
)
def checkpoints(c: Context, delete: str | None = None, json: bool = False) -> None:
    """List the checkpoints sandboxes can start from with their memory (or delete one)."""
    from ..runtime import checkpoints as kept

    current = settings(c)
    _list_or_delete(
        "checkpoint",
        None if delete is None else lambda: kept.delete(current, delete),
        delete,
        lambda: kept.listing(current),
        json,
        "no checkpoints (take one of a gVisor sandbox: inv sandbox.checkpoint NAME)",
        ("name", "memory", "workspace", "from sandbox"),
        lambda s: (
            s["name"],
            console.human_bytes(s["bytes"]),
            console.human_bytes(s["workspace_bytes"]),
            s["source"],
        ),
    )


TASKS = (ls, snapshot, snapshots, checkpoint, from_checkpoint, checkpoints)
