"""The labels that mark every Docker resource this project creates.

Cleanup touches only what carries `MANAGED`; nothing else on the machine is ours.
"""

from __future__ import annotations

import os
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


def owner_gone(pid: int, host: str | None, hostname: str | None = None) -> bool:
    """Whether the owner process `pid` on `host` is known to have ended: only a pid on this
    host can be checked; one that exists under another user still lives."""
    if host != (hostname or os.uname().nodename):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists, under another user
    return False
