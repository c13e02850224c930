"""Pause and resume a sandbox with its memory: every process frozen where it is (a
background server, a session's shell, a command half done) and let go again later.

The engine's cgroup freezer does it: nothing in the sandbox runs or is scheduled while it
is paused, its memory stays where it was (not written anywhere), and `resume` continues
every process as it was. Channels to the agent treat a paused sandbox's silence as a
pause, not as death (`Channel._held`). Commands sent to a paused sandbox wait until it is
resumed, their timeouts running meanwhile; `Sandbox.up` resumes a paused sandbox.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import engine
from ..errors import SandboxNotReady

if TYPE_CHECKING:
    from .backends.base import Backend


class Suspending:
    """`pause`/`resume`, for a class built like `Sandbox` (mixed into it)."""

    if TYPE_CHECKING:  # what the class it is mixed into provides
        name: str
        backend: Backend
        notes: list[str]

        def _existing(self) -> Any: ...

    def pause(self) -> bool:
        """Freeze the running sandbox with its memory; False when it was paused already."""
        container = self._existing()
        if container.status == "paused":
            return False
        if container.status != "running":
            raise SandboxNotReady(
                f"sandbox {self.name} is {container.status}; only a running sandbox can be paused",
                "start it with `inv sandbox.up`",
            )
        self.backend.pause(container)
        return True

    def resume(self) -> bool:
        """Let a paused sandbox run on where it was; False when it was not paused."""
        container = self._existing()
        if container.status != "paused":
            return False
        self.backend.unpause(container)
        return True

    def _resumed(self, container: Any) -> Any:
        """`container` running again if it was paused (`up` on a paused sandbox)."""
        if container is not None and container.status == "paused":
            self.backend.unpause(container)  # its processes go on where they were
            with engine.engine_errors():
                container.reload()
            self.notes.append(f"sandbox {self.name} was paused; resumed")
        return container

    @property
    def is_paused(self) -> bool:
        """Whether the sandbox is paused now."""
        container = self.backend.find(self.name)
        return container is not None and container.status == "paused"
