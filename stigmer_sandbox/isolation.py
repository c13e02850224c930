"""How strongly a sandbox is kept from the host's kernel: `isolation: container | gvisor`.

- `container` (the default): the engine's own runtime (runc). Commands share the host's
  kernel behind namespaces, capabilities, seccomp and cgroups.
- `gvisor`: the same container run by gVisor's `runsc`, whose user-space kernel answers
  the commands' system calls; a kernel bug reachable from the sandbox is gVisor's, not the
  host's. Registered in the engine as the runtime `RUNTIME` by `inv engine.install
  --gvisor` (Debian's `runsc` package; gVisor passes network calls to the host's stack
  inside the container's own network namespace, `--network=host`, because its own stack
  refuses to start on these kernels). What holds under gVisor and what does not: SECURITY.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import ConfigError, SandboxError

CHOICES = ("container", "gvisor")
RUNTIME = "stigmer-gvisor"  # the engine's name for runsc as this project registers it
RUNSC = "/usr/bin/runsc"
RUNTIME_ARGS = ("--network=host",)
INSTALL_HINT = (
    "run `inv engine.install --gvisor` (Debian's runsc package, registered with the engine)"
)


def checked(value: object, source: str = "isolation") -> str:
    """The isolation named, or one ConfigError naming the choices."""
    if value not in CHOICES:
        raise ConfigError(
            f"{source}: unknown isolation {value!r}", f"choose one of {', '.join(CHOICES)}"
        )
    return str(value)


def runtime_for(isolation: str) -> str | None:
    """The engine runtime a sandbox of this isolation is created with (None: the default)."""
    return RUNTIME if isolation == "gvisor" else None


def runtime_entry() -> dict[str, Any]:
    """What `inv engine.install --gvisor` writes under daemon.json's `runtimes`."""
    return {"path": RUNSC, "runtimeArgs": list(RUNTIME_ARGS)}


def unusable_reason(info: Mapping[str, Any]) -> str | None:
    """Why gVisor sandboxes cannot start on the engine whose `docker info` this is (None
    when they can)."""
    if RUNTIME not in (info.get("Runtimes") or {}):
        return f"the engine has no {RUNTIME} runtime"
    return None


def require_usable(info: Mapping[str, Any]) -> None:
    """Raise one SandboxError with the fix when gVisor cannot be used here."""
    why = unusable_reason(info)
    if why:
        raise SandboxError(f"isolation gvisor is not available: {why}", INSTALL_HINT)
