"""Cleanup that only ever touches what this project created and labelled.

Tiers, each including the ones before it:
- default: the project's stopped containers that no live process owns, its dangling
  images, and orphans (sandboxes whose owning process is gone, or that outlived their
  lifetime and have no owner left to use them; fork images whose fork is gone and
  whose forking process is gone too);
- all: every project container, image (basic, full, base, hashed and derived
  tags, build intermediates) and network;
- volumes: the project's volumes too.
A sandbox whose owner process lives is in use, running or not (a pool creates
before it starts; an owner may stop and start its sandbox): only `all` removes it. So
is a fork image while the process forking lives (committed, its container not yet made).
An untagged image of one of our image kinds is ours only when the image record
says this tool built it: a user's image built FROM ours inherits our labels (see
images/record.py). Build stages need no record: no image a user builds FROM ours
can carry their kind.
A sandbox's egress gateway, its credentials broker and its network (labelled with the
sandbox's name as owner) go when that sandbox is gone or goes in the same cleanup; with
`all`, every one. The values the broker held (`<state_dir>/egress/<sandbox>/broker`) go
with it; the logs (`<state_dir>/egress/<sandbox>`, the egress audit) stay, like the
command audit.
Files on the host, the workspace above all, are never deleted, with one exception: the
private folders this tool made for pooled, forked and snapshot-born sandboxes
(`<state_dir>/sandboxes/<name>`, marked by `owner.json`) go with their sandbox, or
when the process that made them is gone and no container uses them; snapshots
(image and `<state_dir>/snapshots/<name>`) and checkpoints (image and
`<state_dir>/checkpoints/<name>`) go with `all`, and so do the host copies of
the command helper (`<state_dir>/helpers`, made again when needed). A fork's image goes
with its fork.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import engine, labels
from ..config import Settings
from ..errors import SandboxError
from ..images.record import ImageRecord, short_id
from ..runtime import broker, checkpoints, host_helper, snapshots, workspaces
from ..runtime.egress_gateway import STATE_FOLDER

STOPPED = ("created", "exited", "dead")
# Containers and images inherit their image's labels, so a label alone does not make a
# resource ours: a user's `docker run stigmer-sandbox-basic:local` or `FROM` it is theirs.
OUR_CONTAINER_KINDS = {"sandbox", "probe", "helper", "compose"}
OUR_IMAGE_KINDS = {
    *("base", "basic", "full", "user", "snapshot", "fork", "egress", "broker", "checkpoint"),
}
OUR_IMAGE_PREFIX = "stigmer-sandbox"
BUILD_STAGE_KIND = "build-stage"  # set in Dockerfile.sandbox.basic's first stage


@dataclass(frozen=True)
class Resource:
    """Something cleanup would remove, and why."""

    kind: str
    id: str
    name: str
    reason: str


def _containers(containers: list[Any], everything: bool) -> Iterable[Resource]:
    for container in containers:
        if container.labels.get(labels.KIND) not in OUR_CONTAINER_KINDS:
            continue
        reason = labels.orphan_reason(container.labels, stopped=container.status in STOPPED)
        if everything:
            reason = reason or "project container"
        elif container.status in STOPPED and not container.labels.get(labels.OWNER_PID):
            reason = reason or "stopped"
        if reason:
            yield Resource("container", container.id, container.name, reason)
            folder = workspaces.private_folder_of(container)
            if folder is not None:
                yield Resource("folder", str(folder), container.name, "its private workspace")


def _gateways(
    settings: Settings, containers: list[Any], staying: set[str], everything: bool
) -> Iterable[Resource]:
    """Egress gateways and credentials brokers whose sandbox is gone or leaving (every one
    with `all`); with a broker, the folder of the values it held."""
    beside = (labels.EGRESS_GATEWAY, labels.CREDENTIALS_BROKER)
    for container in containers:
        marks = container.labels
        if marks.get(labels.KIND) not in beside:
            continue
        if everything:
            reason = "project container"
        elif marks.get(labels.OWNER) not in staying and not _maker_lives(marks):
            reason = "its sandbox is gone"
        else:
            continue
        yield Resource("container", container.id, container.name, reason)
        values = _broker_values(settings, marks)
        if marks.get(labels.KIND) == labels.CREDENTIALS_BROKER and values is not None:
            yield Resource("folder", str(values), container.name, "the secret values it held")


def _broker_values(settings: Settings, marks: dict[str, str]) -> Path | None:
    """A broker's values folder, found from its sandbox's name under this project's state
    folder (never from a label's path), if it exists."""
    owner = marks.get(labels.OWNER, "")
    if not owner or "/" in owner or owner.startswith("."):
        return None
    folder = settings.path("state_dir") / STATE_FOLDER / owner / broker.STATE_FOLDER
    return folder if folder.is_dir() and not folder.is_symlink() else None


def _maker_lives(marks: dict[str, str]) -> bool:
    """Whether the process that made a gateway may still create its sandbox (a gateway
    comes up before its sandbox exists): its `owner-pid` label names a live process."""
    pid = marks.get(labels.OWNER_PID, "")
    return pid.isdigit() and not labels.owner_gone(int(pid), marks.get(labels.OWNER_HOST))


def _egress_networks(staying: set[str]) -> Iterable[Resource]:
    """Sandbox networks whose sandbox is gone or leaving (`all` removes every network)."""
    wanted = {"label": [f"{labels.MANAGED}=true", f"{labels.KIND}={labels.EGRESS_NETWORK}"]}
    for network in engine.client().networks.list(filters=wanted):
        marks = network.attrs.get("Labels") or {}
        if marks.get(labels.OWNER) not in staying and not _maker_lives(marks):
            yield Resource("network", network.id, network.name, "its sandbox is gone")


def _leftover_folders(
    settings: Settings, containers: set[str], everything: bool
) -> Iterable[Resource]:
    """Private folders no container uses: left by a crash, or every one with `all`; folders
    a killed process left half made; with `all`, the snapshots' and checkpoints' too."""
    kept = (workspaces.snapshots_root(settings), checkpoints.root(settings))
    for root in (workspaces.sandboxes_root(settings), *kept):
        for folder in sorted(root.iterdir()) if root.is_dir() else []:
            maker = workspaces.half_made_owner(folder, root)
            if maker is not None:
                if everything or workspaces.owner_gone(maker):
                    yield Resource("folder", str(folder), folder.name, "half made, its maker gone")
                continue
            if not workspaces.is_private(folder, root) or folder.name in containers:
                continue
            if root in kept:
                if everything:
                    yield Resource("folder", str(folder), folder.name, f"kept {root.name}")
                continue
            owner = workspaces.marker(folder) or {}
            if everything or workspaces.owner_gone(owner):
                yield Resource("folder", str(folder), folder.name, "left by a process now gone")


def _helper_copies(settings: Settings) -> Iterable[Resource]:
    """The folder of host copies of the command helper (`all` only)."""
    root = settings.path("state_dir") / host_helper.HELPERS
    if root.is_dir() and not root.is_symlink():
        yield Resource("folder", str(root), root.name, "host copies of the command helper")


def _images(
    everything: bool, recorded: Collection[str], containers: Collection[str]
) -> Iterable[Resource]:
    client = engine.client()
    filters: dict[str, Any] = {**labels.managed_filter()}
    found = [
        image
        for image in client.images.list(filters={**filters, "dangling": True})
        if is_our_image(image, recorded)
    ]
    if everything:
        found = [
            image
            for image in client.images.list(filters=filters)
            if is_our_image(image, recorded) or is_our_build_stage(image)
        ]
    else:
        found += [
            image
            for image in _fork_images(client)
            if _fork_of(image) not in containers
            and is_our_image(image, recorded)
            and not _forker_lives(image)
        ]
    # Newest first: a child image must go before the image it was built on. Build
    # intermediates go with the image they belong to (docker removes untagged parents).
    reason = "project image" if everything else "dangling"
    for image in sorted(found, key=lambda i: i.attrs.get("Created", ""), reverse=True):
        name = ", ".join(image.tags) or image.short_id
        why = "its fork is gone" if not everything and _fork_of(image) else reason
        yield Resource("image", image.id, name, why)
        folder = snapshots.workspace_of(image)
        if folder is not None:
            yield Resource("folder", str(folder), folder.name, "snapshot workspace")


def _fork_images(client: Any) -> list[Any]:
    wanted = {"label": [f"{labels.MANAGED}=true", f"{labels.KIND}=fork"]}
    return [image for image in client.images.list(filters=wanted) if _fork_of(image)]


def _forker_lives(image: Any) -> bool:
    """Whether the process that made a fork image may still start its fork (on another
    host it cannot be checked: it may)."""
    marks = image.labels or {}
    pid = marks.get(snapshots.FORKED_BY_PID, "")
    if not pid.isdigit():
        return False
    return not labels.owner_gone(int(pid), marks.get(snapshots.FORKED_BY_HOST))


def _fork_of(image: Any) -> str:
    """The sandbox a fork image was made for ('' when it is not one)."""
    for tag in image.tags or ():
        repository, _, name = tag.rpartition(":")
        if repository == snapshots.FORK_REPOSITORY:
            return name
    return ""


def is_our_image(image: Any, recorded: Collection[str]) -> bool:
    """Labelled as one of this project's image kinds and either tagged only under this
    project's names, or untagged and in the record of images this tool built."""
    if (image.labels or {}).get(labels.KIND) not in OUR_IMAGE_KINDS:
        return False
    if not image.tags:
        return short_id(image.id) in recorded
    names = [tag.rsplit(":", 1)[0].rsplit("/", 1)[-1] for tag in image.tags]
    return all(name.startswith(OUR_IMAGE_PREFIX) for name in names)


def is_our_build_stage(image: Any) -> bool:
    """An untagged stage our Dockerfiles left: build cache of the legacy builder. Its kind
    is `build-stage` (none on images from before that label); only an intermediate stage
    of our Dockerfiles carries either, never an image built FROM one of our images."""
    image_labels = image.labels or {}
    return (
        not image.tags
        and image_labels.get(labels.MANAGED) == "true"
        and image_labels.get(labels.KIND, BUILD_STAGE_KIND) == BUILD_STAGE_KIND
    )


def _networks() -> Iterable[Resource]:
    for network in engine.client().networks.list(filters=labels.managed_filter()):
        yield Resource("network", network.id, network.name, "project network")


def _volumes() -> Iterable[Resource]:
    for volume in engine.client().volumes.list(filters=labels.managed_filter()):
        yield Resource("volume", volume.id, volume.name, "project volume")


def plan(settings: Settings, everything: bool = False, volumes: bool = False) -> list[Resource]:
    """What a cleanup of this tier would remove; nothing is changed."""
    recorded = ImageRecord.of(settings).ids()
    with engine.engine_errors():
        containers = engine.client().containers.list(
            all=True, filters=labels.managed_filter(), ignore_removed=True
        )
        found = list(_containers(containers, everything))
        removed = {r.name for r in found if r.kind == "container"}
        staying = {c.name for c in containers} - removed
        found.extend(_gateways(settings, containers, staying, everything))
        found.extend(_leftover_folders(settings, {c.name for c in containers}, everything))
        found.extend(_images(everything, recorded, staying))
        found = list({(r.kind, r.id): r for r in found}.values())
        if everything:
            found.extend(_networks())
            found.extend(_helper_copies(settings))
        else:
            found.extend(_egress_networks(staying))
        if volumes:
            found.extend(_volumes())
    return found


def remove(resources: list[Resource]) -> tuple[list[Resource], list[tuple[Resource, str]]]:
    """Remove what `plan` listed; returns (removed, [(failed, why)])."""
    import docker.errors

    client = engine.client()
    removers = {
        "container": lambda r: client.containers.get(r.id).remove(force=True),
        "image": lambda r: client.images.remove(r.id, force=True),
        "network": lambda r: client.networks.get(r.id).remove(),
        "volume": lambda r: client.volumes.get(r.id).remove(force=True),
        "folder": lambda r: workspaces.remove(Path(r.id)),
    }
    removed, failed = [], []
    with engine.engine_errors():
        for resource in resources:
            try:
                removers[resource.kind](resource)
            except docker.errors.NotFound:
                pass  # already gone, e.g. with its parent
            except docker.errors.APIError as exc:
                failed.append((resource, str(exc.explanation or exc)[:160]))
                continue
            except SandboxError as exc:
                failed.append((resource, exc.message[:160]))
                continue
            removed.append(resource)
    return removed, failed


def system_prune() -> dict[str, Any]:
    """The guide's `docker system prune -a`: every unused resource on the machine."""
    client = engine.client()
    with engine.engine_errors():
        return {
            "containers": client.containers.prune(),
            "images": client.images.prune(filters={"dangling": False}),
            "networks": client.networks.prune(),
        }


def as_json(resources: list[Resource]) -> list[dict[str, str]]:
    """JSON-ready list."""
    return [asdict(r) for r in resources]
