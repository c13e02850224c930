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
# The sandbox a resource serves (its container name): an egress gateway and its network.
OWNER = f"{PREFIX}.owner"
EGRESS_GATEWAY = "egress-gateway"  # kind of a sandbox's egress gateway container
EGRESS_NETWORK = "egress-network"  # kind of a sandbox's own network behind that gateway
CREDENTIALS_BROKER = "credentials-broker"  # kind of the broker beside a gateway


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


def orphan_reason(
    container_labels: dict[str, str],
    stopped: bool,
    now: float | None = None,
    hostname: str | None = None,
) -> str | None:
    """Why a labelled container is an orphan, or None. Its owner process is gone; or it
    outlived its lifetime with no owner and is stopped. A sandbox in use, i.e. running
    with its owner alive (or on another host, where that cannot be checked), never is."""
    if _owner_gone(container_labels, hostname):
        return f"its owner (pid {container_labels[OWNER_PID]}) is gone"
    ownerless = not container_labels.get(OWNER_PID)  # "" on a snapshot's containers
    if expired(container_labels, now) and ownerless and stopped:
        return "past its maximum lifetime"
    return None


def _owner_gone(container_labels: dict[str, str], hostname: str | None) -> bool:
    """Whether the owner process named by the labels is known to have ended."""
    pid = container_labels.get(OWNER_PID, "")
    host = container_labels.get(OWNER_HOST)
    return pid.isdigit() and owner_gone(int(pid), host, hostname)
