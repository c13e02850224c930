"""The seam between the sandbox runtime and the platform that runs sandboxes.

Everything `Sandbox`, `SandboxPool` and the snapshots ask of a container platform goes
through a `Backend`: create and find a sandbox, open the byte stream the agent speaks
over, run one root command, freeze and capture a filesystem, and say how much memory
the platform has. `DockerBackend` is the one implementation. A Kubernetes backend
(docs/scale-out.md) is meant to be a new module implementing the same two protocols:
pods from the same images, the same agent over the pod exec stream. What stays above
this line (the agent and its protocol, the policy, sessions, processes, the pool's
bookkeeping, the audit trail) does not change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

# What `changes` reports of a path (the Engine API's kinds).
MODIFIED, ADDED, DELETED = 0, 1, 2
# The two output streams of a process in a sandbox, as an `AgentStream` tags them.
STDOUT, STDERR = 1, 2


class AgentStream(Protocol):
    """A byte stream to one root process in a sandbox: its stdin, its stdout and stderr."""

    def send(self, data: bytes) -> None:
        """Write to the process's stdin (raises OSError when the stream is gone)."""

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        """(STDOUT or STDERR, bytes) as they arrive, until the process's output ends."""

    def shutdown(self) -> None:
        """Close both directions; a reader blocked in `chunks` sees the end."""


class Backend(Protocol):
    """What the runtime needs from the platform that runs its sandboxes."""

    name: str

    def create(self, spec: dict[str, Any]) -> Any:
        """Create (not start) a sandbox from `policy.container_spec`'s description."""

    def find(self, name: str) -> Any | None:
        """The sandbox with this name or id, or None."""

    def open_agent(self, sandbox_id: str, argv: list[str]) -> AgentStream:
        """Start `argv` as root in the sandbox with stdin open; its stream."""

    def run_root(self, sandbox_id: str, argv: list[str], **options: Any) -> tuple[int, bytes]:
        """Run `argv` as root in the sandbox and wait: exit status and output."""

    def frozen(self, handle: Any) -> Any:
        """A context in which the sandbox's processes are frozen (consistent captures)."""

    def pause(self, handle: Any) -> None:
        """Freeze every process of the sandbox, memory kept, until `unpause`."""

    def unpause(self, handle: Any) -> None:
        """Let a frozen sandbox's processes run again, where they were."""

    def commit(self, handle: Any, image_ref: str, changes: list[str]) -> str:
        """Capture the sandbox's root filesystem as image `image_ref`; the image id."""

    def changed_bytes(self, handle: Any) -> int:
        """Bytes the sandbox's commands added to its root filesystem (what a commit copies)."""

    def changes(self, handle: Any, within: Callable[[str], bool]) -> list[tuple[str, int]]:
        """The paths of the root filesystem that differ from the image (what a commit
        would carry), as (path, kind), kind MODIFIED, ADDED or DELETED; only paths for
        which `within(path)` holds, a folder's contents only when it holds for the folder."""

    def path_mode(self, handle: Any, path: str) -> int | None:
        """The mode of `path` in the sandbox as Go's `fs.FileMode` bits (None when missing)."""

    def read_image_file(self, image: str, path: str, limit: int) -> bytes:
        """The bytes of the regular file `path` of `image` (at most `limit`), read without
        running anything from the image."""

    def is_paused(self, sandbox_id: str) -> bool:
        """Whether the sandbox is frozen on purpose right now (False when unknown)."""

    def sharing(self, handle: Any, source: str) -> list[str]:
        """Names of other running sandboxes or containers that mount the folder `source`."""

    def host_memory(self) -> int:
        """Bytes of memory the platform can give sandboxes (0 when unknown)."""

    def host_pid_max(self) -> int:
        """Process ids the platform's kernel can hand out (0 when unknown)."""

    def sandboxes(self) -> list[Any]:
        """Every sandbox this project made on the platform."""
