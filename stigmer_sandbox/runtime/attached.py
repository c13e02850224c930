"""A sandbox started another way (compose), reached like any other but never managed.

`Sandbox.attach(name)` gives commands through the same agent, helper and audit trail to a
running container this project started through compose; it is never created, recreated,
stopped or removed from here (those belong to `inv compose.*`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

from ..config import Settings
from ..errors import SandboxNotReady, UsageError
from . import containers


class Attaching:
    """`attach` and what an attached sandbox refuses, for a class built like `Sandbox`."""

    if TYPE_CHECKING:  # what the class it is mixed into provides
        name: str
        attached: bool
        _container: Any

        def __init__(self, settings: Settings | None = None, **options: Any) -> None: ...
        def _existing(self) -> Any: ...

    @classmethod
    def attach(cls, name: str, settings: Settings | None = None, **kwargs: Any) -> Self:
        """A running container this project started another way (compose), reached through
        the same agent, helper and audit trail; it is never created, recreated or removed here."""
        sandbox = cls(settings, name=name, **kwargs)
        sandbox.attached = True
        return sandbox

    def _attach_running(self, timeout: float) -> Self:
        container = self._existing()
        if container.status != "running":
            raise SandboxNotReady(
                f"sandbox {self.name} is {container.status}", "start it (e.g. `inv compose.up`)"
            )
        self._container = container
        containers.wait_ready(container, self.name, timeout)
        return self

    def _refuse_if_attached(self, action: str) -> None:
        if self.attached:
            raise UsageError(
                f"sandbox {self.name} was started by compose; {action} it there "
                "(`inv compose.down`)"
            )
