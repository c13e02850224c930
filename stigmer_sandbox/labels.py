"""The labels that mark every Docker resource this project creates.

Cleanup touches only what carries `MANAGED`; nothing else on the machine is ours.
"""

from __future__ import annotations

import time

from . import __version__

PREFIX = "dev.stigmer.sandbox"
MANAGED = f"{PREFIX}.managed"
KIND = f"{PREFIX}.kind"
INPUTS = f"{PREFIX}.inputs"
VERSION = f"{PREFIX}.version"
OWNER_PID = f"{PREFIX}.owner-pid"
OWNER_HOST = f"{PREFIX}.owner-host"
EXPIRES = f"{PREFIX}.expires"


def project_labels(kind: str, **extra: str) -> dict[str, str]:
    """Labels for a new resource of `kind` (base, basic, full, sandbox, helper, test...)."""
    labels = {MANAGED: "true", KIND: kind, VERSION: __version__}
    labels.update({f"{PREFIX}.{key.replace('_', '-')}": value for key, value in extra.items()})
    return labels


def managed_filter() -> dict[str, list[str]]:
    """An engine-side filter matching resources carrying this project's label."""
    return {"label": [f"{MANAGED}=true"]}


def expired(container_labels: dict[str, str], now: float | None = None) -> bool:
    """Whether a sandbox has outlived the lifetime its `expires` label set (None: no limit)."""
    expires = container_labels.get(EXPIRES, "")
    return expires.isdigit() and int(expires) < (time.time() if now is None else now)
