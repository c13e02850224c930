"""A sandbox's state carried to new sandboxes: fork, snapshot, start from a snapshot.

The lifecycle's half that makes private sandboxes (each with its own workspace folder,
and for a fork its own image), mixed into `Sandbox`: the images and folders themselves
are `snapshots`' and `workspaces`' business.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from ..config import Settings, load_settings
from ..errors import SandboxError
from . import checkpoints, egress_spares, snapshots, workspaces

if TYPE_CHECKING:
    from .backends.base import Backend
    from .client.connection import Connection


class Forking:
    """Fork, snapshot and private sandboxes, for a class built like `Sandbox`."""

    if TYPE_CHECKING:  # what the class it is mixed into provides
        name: str
        settings: Settings
        backend: Backend
        connection: Connection

        def __init__(self, settings: Settings | None = None, **options: Any) -> None: ...
        def _existing(self) -> Any: ...
        def find(self) -> Any: ...
        def up(self) -> Self: ...
        def remove(self) -> bool: ...

    @classmethod
    def private(
        cls, settings: Settings, name: str, image: str | None, folder: Path, **options: Any
    ) -> Self:
        """A sandbox (not started) that mounts the private `folder`; removing it removes the
        folder too, and its image when `owned_image` is true. Ephemeral (this process owns
        it) unless `ephemeral=False`."""
        private = settings.replace(
            workspace=str(folder / "workspace"), logs=str(folder / "logs"), image=image
        )
        extra = {workspaces.PRIVATE_LABEL: str(folder), **(options.pop("extra_labels", {}))}
        owned = image if options.pop("owned_image", False) else None
        ephemeral = options.pop("ephemeral", True)
        return cls(
            private, name=name, ephemeral=ephemeral, extra_labels=extra, private_folder=folder,
            owned_image=owned, **options,
        )  # fmt: skip

    @contextmanager
    def paused(self) -> Iterator[Any]:
        """The running sandbox frozen (its container, yielded), so its filesystem and
        workspace can be read at one instant; the agent's silence meanwhile is not death."""
        container = self._existing()  # just fetched: its status is current
        if container.status != "running":
            raise SandboxError(
                f"sandbox {self.name} is {container.status}; only a running sandbox can be "
                "forked or snapshotted",
                "start it with `inv sandbox.up`",
            )
        with self.connection.frozen(), self.backend.frozen(container):
            yield container

    def fork(self, extra_labels: dict[str, str] | None = None) -> Self:
        """A new started sandbox with this one's filesystem (packages installed, files under
        /) and a copy of its workspace, which then diverge; `extra_labels` on its container.
        Running processes, /tmp and sessions are not carried. Remove it with `remove()` or
        a `with` block."""
        name = egress_spares.name_for(self.settings)
        image_ref = snapshots.fork_image(name)
        root = workspaces.sandboxes_root(self.settings)
        folder = snapshots.capture(self, image_ref, "fork", root / name)
        return type(self)._started(
            self.settings, name, image_ref, folder, owned_image=True, backend=self.backend,
            extra_labels=dict(extra_labels or {}),
        )  # fmt: skip

    def snapshot(self, name: str, replace: bool = False) -> dict[str, Any]:
        """Keep this sandbox's filesystem and workspace as snapshot `name` (processes, /tmp
        and sessions are not kept); `replace` overwrites one of that name."""
        return snapshots.take(self, name, replace)

    @classmethod
    def from_snapshot(cls, name: str, settings: Settings | None = None, **options: Any) -> Self:
        """A new started sandbox from snapshot `name`, with its own copy of the workspace."""
        settings = settings or load_settings()
        image_ref, source = snapshots.find(name)
        new = egress_spares.name_for(settings, options)
        folder = workspaces.create(workspaces.sandboxes_root(settings), new, source / "workspace")
        return cls._started(settings, new, image_ref, folder, **options)

    def checkpoint(self, name: str) -> dict[str, Any]:
        """Keep this running gVisor sandbox whole as checkpoint `name`: its processes with
        their memory, filesystem and workspace (needs an engine in experimental mode and
        egress none; see `checkpoints`). It runs on afterwards, on a new agent channel."""
        return checkpoints.create(self, name)

    @classmethod
    def from_checkpoint(cls, name: str, settings: Settings | None = None, **options: Any) -> Self:
        """A new started sandbox from checkpoint `name`: its processes running on with their
        memory, its own copy of the workspace."""
        return checkpoints.restore(name, settings, sandbox_class=cls, **options)

    @classmethod
    def _started(
        cls, settings: Settings, name: str, image: str, folder: Path, **options: Any
    ) -> Self:
        options.setdefault("prepared_image", True)
        sandbox = cls.private(settings, name, image, folder, **options)
        try:
            return sandbox.up()
        except BaseException:
            sandbox.remove()
            raise
