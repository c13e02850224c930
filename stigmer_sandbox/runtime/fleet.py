"""Every sandbox of this project on the engine, as `inv sandbox.ls` shows them.

Pooled, forked, snapshot-born, ephemeral and long-lived sandboxes alike: their name,
state, image, age, owner (the pool and host process, and whether that process lives)
and the host folder mounted at /workspace.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from .. import labels, policy
from .backends.base import Backend
from .backends.docker import DOCKER
from .workspaces import PRIVATE_LABEL


def listing(backend: Backend = DOCKER, now: float | None = None) -> list[dict[str, Any]]:
    """One entry per sandbox container, oldest first."""
    now = time.time() if now is None else now
    found = [_entry(container, now) for container in backend.sandboxes()]
    return sorted(found, key=lambda entry: -entry["age_s"])


def _entry(container: Any, now: float) -> dict[str, Any]:
    attrs = container.attrs
    marks = container.labels
    created = _timestamp(attrs.get("Created", ""))
    mounts = attrs.get("Mounts", [])
    workspace = next(
        (m.get("Source", "") for m in mounts if m.get("Destination") == policy.WORKSPACE), ""
    )
    return {
        "name": container.name,
        "state": container.status,
        "image": attrs.get("Config", {}).get("Image", ""),
        "age_s": round(max(now - created, 0.0), 1) if created else 0.0,
        "owner": _owner(marks, container.status),
        "pool": marks.get(f"{labels.PREFIX}.pool", ""),
        "private": bool(marks.get(PRIVATE_LABEL)),
        "workspace": workspace,
    }


def _owner(marks: dict[str, str], status: str) -> str:
    pid = marks.get(labels.OWNER_PID, "")
    if not pid:
        return "-"
    owner = f"pid {pid}@{marks.get(labels.OWNER_HOST, '?')}"
    if labels.orphan_reason(marks, stopped=status != "running"):
        owner += " (gone: `inv clean` removes it)"
    return owner


def _timestamp(text: str) -> float:
    """Docker's RFC 3339 time with nanoseconds, as seconds since the epoch (0 if unreadable)."""
    try:
        trimmed = text[:26].rstrip("Z") if "." in text else text.rstrip("Z")
        return datetime.fromisoformat(trimmed + "+00:00").timestamp()
    except ValueError:
        return 0.0


def age_text(seconds: float) -> str:
    """`42s`, `7m`, `3h`, `2d`."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:.0f}s"
