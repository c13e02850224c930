"""Cleanup that only ever touches what this project created and labelled.

Tiers, each including the ones before it:
- default: the project's stopped containers, its dangling images, and orphans
  (sandboxes whose owning process is gone, or that outlived their lifetime);
- all: every project container, image (basic, full, base, hashed and derived
  tags, build intermediates) and network;
- volumes: the project's volumes too.
Files on the host, the workspace above all, are never deleted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from .. import engine, labels

STOPPED = ("created", "exited", "dead")
# Containers and images inherit their image's labels, so a label alone does not make a
# resource ours: a user's `docker run stigmer-sandbox-basic:local` or `FROM` it is theirs.
OUR_CONTAINER_KINDS = {"sandbox", "probe", "helper", "compose"}
OUR_IMAGE_KINDS = {"base", "basic", "full", "user"}
OUR_IMAGE_PREFIX = "stigmer-sandbox"
BUILD_STAGE_KIND = "build-stage"  # set in Dockerfile.sandbox.basic's first stage


@dataclass(frozen=True)
class Resource:
    """Something cleanup would remove, and why."""

    kind: str
    id: str
    name: str
    reason: str


def orphan_reason(
    container_labels: dict[str, str], now: float | None = None, hostname: str | None = None
) -> str | None:
    """Why a labelled container is an orphan (owner gone, lifetime over), or None."""
    now = time.time() if now is None else now
    expires = container_labels.get(labels.EXPIRES)
    if expires and expires.isdigit() and int(expires) < now:
        return "past its maximum lifetime"
    pid = container_labels.get(labels.OWNER_PID)
    host = container_labels.get(labels.OWNER_HOST)
    if pid and pid.isdigit() and host == (hostname or os.uname().nodename):
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return f"its owner (pid {pid}) is gone"
        except PermissionError:
            return None
    return None


def _containers(everything: bool) -> Iterable[Resource]:
    for container in engine.client().containers.list(all=True, filters=labels.managed_filter()):
        if container.labels.get(labels.KIND) not in OUR_CONTAINER_KINDS:
            continue
        reason = orphan_reason(container.labels)
        if everything:
            reason = reason or "project container"
        elif container.status in STOPPED:
            reason = reason or "stopped"
        if reason:
            yield Resource("container", container.id, container.name, reason)


def _images(everything: bool) -> Iterable[Resource]:
    filters: dict[str, Any] = {**labels.managed_filter()}
    if not everything:
        filters = {**filters, "dangling": True}
    found = [
        image
        for image in engine.client().images.list(filters=filters)
        if is_our_image(image) or (everything and is_our_build_stage(image))
    ]
    # Newest first: a child image must go before the image it was built on. Build
    # intermediates go with the image they belong to (docker removes untagged parents).
    for image in sorted(found, key=lambda i: i.attrs.get("Created", ""), reverse=True):
        name = ", ".join(image.tags) or image.short_id
        yield Resource("image", image.id, name, "project image" if everything else "dangling")


def is_our_image(image: Any) -> bool:
    """Labelled by this project and, if tagged, only under this project's names."""
    if (image.labels or {}).get(labels.KIND) not in OUR_IMAGE_KINDS:
        return False
    names = [tag.rsplit(":", 1)[0].rsplit("/", 1)[-1] for tag in image.tags]
    return all(name.startswith(OUR_IMAGE_PREFIX) for name in names)


def is_our_build_stage(image: Any) -> bool:
    """An untagged stage our Dockerfiles left: build cache of the legacy builder. Its kind
    is `build-stage` (none on images from before that label)."""
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


def plan(everything: bool = False, volumes: bool = False) -> list[Resource]:
    """What a cleanup of this tier would remove; nothing is changed."""
    with engine.engine_errors():
        found = [*_containers(everything), *_images(everything)]
        if everything:
            found.extend(_networks())
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
