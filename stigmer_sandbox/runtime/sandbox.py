"""The sandbox container's lifecycle: the agent runner's API.

    from stigmer_sandbox import Sandbox

    with Sandbox() as sandbox:
        result = sandbox.exec("python --version", timeout=30)
        print(result.exit_code, result.stdout)

A `Sandbox` is a long-lived container found again by name and labels, created with the
confinement `policy` describes; it creates, starts, stops, forks and removes it. Commands
travel through its `connection` (`client.connection`), on which sessions, background
processes and file transfers are built.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import engine, labels, policy
from ..config import Settings, load_settings
from ..errors import SandboxError, SandboxNotReady
from . import bootstrap, containers, egress_spares, network, workspaces
from .attached import Attaching
from .backends.base import Backend
from .backends.docker import DOCKER
from .client.command_methods import CommandMethods
from .client.connection import Connection
from .containers import ContainerViews
from .forking import Forking
from .suspend import Suspending


class Sandbox(CommandMethods, Forking, Suspending, Attaching, ContainerViews):
    """One sandbox container: create or find it, run commands in it, copy files."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        name: str | None = None,
        image: str | None = None,
        network: str | None = None,
        host_user: tuple[int, int] | None = None,
        ephemeral: bool = False,
        extra_labels: dict[str, str] | None = None,
        use_agent: bool = True,
        private_folder: Path | None = None,
        owned_image: str | None = None,
        prepared_image: bool = False,
        backend: Backend = DOCKER,
        egress: str | None = None,
        allow: Sequence[str] = (),
        deny: Sequence[str] = (),
        allow_presets: Sequence[str] = (),
        secrets: Sequence[str] = (),
        isolation: str | None = None,
    ) -> None:
        base = (settings or load_settings()).with_egress(
            egress, allow, deny, allow_presets, secrets=secrets
        )
        if name is None and network and network != base.network:
            name = f"{base.container_name}-{network}"  # a sandbox per network setting
        self.settings = base.replace(
            source="arguments",
            container_name=name,
            image=image,
            network=network,
            isolation=isolation,
        )
        self.name = self.settings.container_name
        self.host_user = host_user or policy.host_user()
        self.ephemeral = ephemeral
        self.backend = backend
        self.extra_labels = dict(extra_labels or {})
        self.notes: list[str] = []
        self._lock = threading.RLock()
        self._container: Any = None
        self.connection = Connection(
            self.name,
            self.settings,
            self.sandbox_user,
            locate=self._running_id,
            use_agent=use_agent,
            backend=backend,
            lock=self._lock,
            notes=self.notes,
        )
        self.audit = self.connection.audit
        # A pooled, forked or snapshot-born sandbox: its own workspace folder (and, for a
        # fork, its own image) go when it is removed, and it is never started again.
        self.private_folder = private_folder
        self.owned_image = owned_image
        self.prepared_image = prepared_image
        # A container started another way (compose): commands only, never created,
        # recreated, restarted or removed from here.
        self.attached = False

    @classmethod
    def create_ephemeral(cls, settings: Settings | None = None, **kwargs: Any) -> Sandbox:
        """A uniquely named sandbox, removed when its `with` block ends."""
        base = settings or load_settings()
        name = egress_spares.name_for(base, kwargs)  # a spare gateway's, when one is ready
        return cls(base, name=name, ephemeral=True, **kwargs)

    @property
    def sandbox_user(self) -> tuple[int, int]:
        """The uid/gid commands run as (see `policy.sandbox_user`)."""
        return policy.sandbox_user(self.host_user)

    @property
    def retired(self) -> bool:
        """Whether this object refuses every use (released to a pool, or removed)."""
        return self.connection.retired

    # -- lifecycle -------------------------------------------------------------------------

    def find(self) -> Any:
        """The container, if it exists; refuses one this project did not create."""
        container = self.backend.find(self.name)
        if container is not None and container.labels.get(labels.MANAGED) != "true":
            raise SandboxError(
                f"a container named {self.name} exists that stigmer-sandbox did not create",
                f"remove it (docker rm -f {self.name}) or set container_name",
            )
        return container

    def up(self, timeout: float = containers.READY_TIMEOUT_S) -> Sandbox:
        """Make sure the container exists, runs and is ready (idempotent)."""
        with self._lock:
            if self.retired:
                raise SandboxNotReady(
                    f"sandbox {self.name} was released or removed with its private workspace",
                    "start a new one (a pool's acquire(), fork() or from_snapshot())",
                )
            if self.attached:
                return self._attach_running(timeout)
            try:
                started = self._start_and_connect(timeout)
            except BaseException:
                self._after_failed_start()
                raise
            self.notes.extend(bootstrap.on_start(self.connection, started))
        if self.ephemeral and started:  # the next one like it may take a spare gateway
            owned = containers.owner_labels(self.ephemeral) | self.extra_labels
            egress_spares.refill(self.settings, owned, self.backend)
        return self

    def _start_and_connect(self, timeout: float) -> bool:
        """The container created or found, started, ready and connected; whether it was
        (re)started now."""
        container, started, placement = self._created()
        self._container = container
        use_agent = started and self.connection.use_agent
        early = containers.EarlyChannel(self._open_early) if use_agent else None
        try:
            containers.wait_ready(container, self.name, timeout)
            self.notes.extend(placement.finish(self.name))
        finally:
            channel = early.result() if early else None
        if channel is not None:
            self.connection.adopt(channel)
        return started

    def _after_failed_start(self) -> None:
        """Nothing left by a start that failed: an ephemeral sandbox goes whole (its caller
        never got it), any other keeps no gateway without a container."""
        with contextlib.suppress(Exception):  # the start's own error is the one to raise
            if self.ephemeral:
                self.remove()
            elif self.find() is None:
                network.release(self.settings, self.name, self.backend)()

    def _created(self) -> tuple[Any, bool, network.Placement]:
        """The container, created or recreated as the settings say, and started; whether it
        was (re)started now; where its network is being made ready."""
        base, folders = containers.wanted_spec(
            self.settings, self.sandbox_user, self.prepared_image, self.backend
        )  # checks the folders: nothing is made for a sandbox that may not start
        containers.check_runtime(self.settings)  # nor for one the engine cannot run
        owned = containers.owner_labels(self.ephemeral) | self.extra_labels
        placement = network.prepare(self.settings, self.name, owned, self.backend, base["image"])
        container = self.find()
        if container is not None:  # compared with where its network really is
            placement.network_ready()
            wanted = containers.placed(base, placement.options)[1]
            container = self._reusable(container, wanted, placement.gateway is not None)
        container = self._resumed(container)
        started = container is None or container.status != "running"
        if container is None:
            policy.prepare_folders(self.settings, self.host_user)
        # Pinned now and checked once started: a folder swapped for a symlink in between
        # (e.g. by a command of a running sandbox) must not be what gets mounted.
        pins = policy.pin_mounts(folders) if started else ()
        if container is None:  # while its gateway's network is made
            container = containers.create_placed(self.backend, base, placement, self._marks)
        if container.status != "running":
            with engine.engine_errors():
                container.start()
        policy.verify_mounts(pins, self.backend, container)
        return container, started, placement

    def _marks(self, wanted: str) -> dict[str, str]:
        return containers.container_labels(
            self.settings, self.name, wanted, self.ephemeral, self.extra_labels
        )

    def _open_early(self) -> Any:
        return self.connection.open_channel(self._container.id)

    def _reusable(self, container: Any, wanted: str, gated: bool) -> Any:
        """The existing container if it can serve, else None (after removing it, and its
        gateway unless the new one is `gated` too)."""
        why = containers.stale_reason(container, wanted) if container is not None else None
        if why is None:
            return container
        self.notes.append(f"recreating {self.name}: {why}")
        self.connection.close()
        with engine.engine_errors():
            container.remove(force=True)
        if not gated:  # moved off its gateway (to open or none): that gateway goes too
            network.release(self.settings, self.name, self.backend, container)()
        return None

    def _running_id(self) -> str:
        """The running container's id (the connection's `locate`), started again when it was
        stopped or removed behind our back."""
        if self._container is not None:
            try:
                with engine.engine_errors():
                    self._container.reload()
                if self._container.status in ("running", "paused"):  # paused: a fork, briefly
                    return str(self._container.id)
            except SandboxError:
                pass
            self.notes.append(f"sandbox {self.name} was not running; starting it again")
        self.up()
        return str(self._container.id)

    def stop(self) -> None:
        """Stop the container (the keep-alive exits at once on SIGTERM)."""
        self._refuse_if_attached("stop")
        self.connection.close()
        container = self.find()
        if container is not None:
            with engine.engine_errors():
                container.stop(timeout=5)

    def remove(self) -> bool:
        """Remove the container. The workspace on the host is never touched, unless it is
        this sandbox's private one (pooled, forked, snapshot-born), which goes with it."""
        self._refuse_if_attached("remove")
        with self._lock:  # retired first: no other thread may start it again meanwhile
            if self.private_folder is not None:
                self.connection.retire()
            self.connection.close()
        container = self.find()
        released = network.release(self.settings, self.name, self.backend, container)
        try:
            if container is not None:
                with engine.engine_errors():
                    container.remove(force=True)
                self._container = None
            released()
            if self.private_folder is not None:
                workspaces.remove(self.private_folder)
        finally:
            if self.owned_image:
                engine.remove_image(self.owned_image)
        return container is not None

    def retire(self) -> None:
        """Refuse every later use of this object (a pool does this on release)."""
        self.connection.retire()

    def __enter__(self) -> Sandbox:
        return self.up()

    def __exit__(self, *_exc: object) -> None:
        if self.ephemeral:
            self.remove()
        else:
            self.connection.close()

    def close(self) -> None:
        """Drop the connection to the sandbox's agent; the container keeps running."""
        self.connection.close()
