"""A warm pool: started, healthy, hardened sandboxes waiting to be handed out.

    from stigmer_sandbox import SandboxPool

    with SandboxPool(size=4) as pool:
        sandbox = pool.acquire()
        try:
            sandbox.exec("pip install rich")
        finally:
            pool.release(sandbox)   # destroyed; a fresh one takes its place

Each sandbox has a private workspace (see `workspaces`), its agent connection open, and
labels naming the pool and the host process that owns it, so a crashed owner leaves
nothing `inv clean` does not find. `acquire()` hands over a waiting sandbox without
touching the engine; `release()` destroys it in the background and starts a
replacement. A sandbox is never handed out twice. The pool never runs more than
`pool_max_size` sandboxes, and says so when their memory limits add up to more than the
host has. A pool can start its sandboxes from a snapshot, so work done once (packages,
MCP servers) is not paid at every start. With `pause_idle`, waiting sandboxes are paused
(`runtime.suspend`: no CPU, memory kept) and `acquire()` resumes the one it hands out.
"""

from __future__ import annotations

import atexit
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from .. import engine, isolation, labels
from ..config import Settings, load_settings
from ..errors import SandboxError, SandboxNotReady, UsageError
from . import snapshots, workspaces
from .backends.base import Backend
from .backends.docker import DOCKER
from .sandbox import Sandbox

ACQUIRE_TIMEOUT_S = 120.0
START_WORKERS = 4
RETRY_MAX_S = 30.0


class SandboxPool:
    """Keeps `size` sandboxes started and ready; hands them out once, destroys them on return."""

    def __init__(
        self,
        size: int = 2,
        image: str | None = None,
        settings: Settings | None = None,
        *,
        snapshot: str | None = None,
        extra_labels: dict[str, str] | None = None,
        backend: Backend = DOCKER,
        egress: str | None = None,
        allow: Sequence[str] = (),
        deny: Sequence[str] = (),
        allow_presets: Sequence[str] = (),
        secrets: Sequence[str] = (),
        pause_idle: bool = False,
        isolation: str | None = None,
    ) -> None:
        self.backend = backend
        # Waiting sandboxes paused (no CPU, memory kept), resumed by `acquire`.
        self.pause_idle = pause_idle
        chosen = (settings or load_settings()).with_egress(
            egress, allow, deny, allow_presets, secrets=secrets
        )
        self.settings = chosen.replace(source="arguments", image=image, isolation=isolation)
        self.max_size = self.settings.pool_max_size
        if not isinstance(size, int) or not 0 <= size <= self.max_size:
            raise UsageError(
                f"pool size must be a whole number from 0 to {self.max_size}, got {size!r}",
                "raise `pool_max_size` to allow bigger pools",
            )
        self.size = size
        self.snapshot = snapshot
        self.id = uuid.uuid4().hex[:8]
        self.notes: list[str] = []
        self._labels = {f"{labels.PREFIX}.pool": self.id, **(extra_labels or {})}
        self._check_source()
        self._check_limits()
        self._cond = threading.Condition()
        self._ready: deque[Sandbox] = deque()
        self._out: dict[str, Sandbox] = {}
        self._starting = 0
        self._removing = 0
        self._closed = False
        self._error: SandboxError | None = None
        self._failures = 0
        self._retry: threading.Timer | None = None
        self._workers = ThreadPoolExecutor(
            max_workers=START_WORKERS, thread_name_prefix=f"stigmer-pool-{self.id}"
        )
        atexit.register(self.close)  # a pool left open goes when the interpreter ends
        self._refill()

    # -- checks ----------------------------------------------------------------------------

    def _check_source(self) -> None:
        """A missing image or snapshot is one clear error now, not failures in the background."""
        if self.snapshot is None:
            engine.image(self.settings.image)
            return
        snapshots.find(snapshots.check_name(self.snapshot))

    def _check_limits(self) -> None:
        """Say when the sandboxes' limits add up to more than the host has (memory, process
        ids): they are ceilings, so this is a note, not a refusal."""
        memory, pids = self.backend.host_memory(), self.backend.host_pid_max()
        wanted = self.size * self.settings.memory_bytes
        if memory and wanted > memory:
            self.notes.append(
                f"{self.size} sandboxes with memory {self.settings.memory} may use "
                f"{wanted / 2**30:.1f} GiB; this host has {memory / 2**30:.1f} GiB: they cannot "
                "all use their limit at once (lower `memory` or the pool size)"
            )
        # Host tasks, not commands' processes: under gVisor its own tasks count too.
        each = isolation.host_pids_limit(self.settings.isolation, self.settings.pids_limit)
        processes = self.size * each
        if pids and processes > pids:
            self.notes.append(
                f"{self.size} sandboxes with pids_limit {self.settings.pids_limit} may hold "
                f"{processes} host tasks; the host allows {pids} (kernel.pid_max): a fork bomb "
                "in many of them at once could exhaust the host (lower `pids_limit`)"
            )

    # -- what callers use ------------------------------------------------------------------

    @property
    def ready(self) -> int:
        """How many sandboxes wait to be acquired now."""
        with self._cond:
            return len(self._ready)

    @property
    def in_use(self) -> int:
        """How many sandboxes are acquired and not yet released."""
        with self._cond:
            return len(self._out)

    def wait_ready(self, timeout: float = ACQUIRE_TIMEOUT_S) -> SandboxPool:
        """Block until the pool is full (`ready == size`); raises the start error if sandboxes
        cannot be started, or when `timeout` passes first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._ready) < self.size:
                self._check_open()
                if self._error is not None and self._starting == 0:
                    raise self._error
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SandboxNotReady(
                        f"the pool has {len(self._ready)} of {self.size} sandboxes ready after "
                        f"{timeout:.0f} s",
                        "see `inv doctor`; the engine may be slow or short of memory",
                    )
                self._cond.wait(min(remaining, 0.5))
        return self

    def acquire(self, timeout: float = ACQUIRE_TIMEOUT_S) -> Sandbox:
        """A ready sandbox, at once; if none waits, one started now. Waits up to `timeout`
        seconds only when the pool is at its cap and every sandbox is in use."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                self._check_open()
                sandbox = self._take_ready()
                if sandbox is not None:
                    self._out[sandbox.name] = sandbox
                    break
                if self._live() < self.max_size:
                    self._starting += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SandboxNotReady(
                        f"the pool is at its cap of {self.max_size} sandboxes, all in use",
                        "release one, or raise `pool_max_size`",
                    )
                self._cond.wait(remaining)
        if sandbox is None:
            sandbox = self._start_now()
        elif self.pause_idle:
            sandbox.resume()
        self._refill()
        return sandbox

    def release(self, sandbox: Sandbox) -> None:
        """Give a sandbox back: it is destroyed (container, private workspace) in the
        background and a fresh one takes its place. It cannot be used afterwards."""
        with self._cond:
            self._check_open()
            if self._out.get(str(getattr(sandbox, "name", ""))) is not sandbox:
                raise UsageError(
                    f"{getattr(sandbox, 'name', sandbox)!r} is not a sandbox acquired from "
                    "this pool (released twice?)"
                )
            del self._out[sandbox.name]
            self._removing += 1  # still running until removed: it counts against the cap
        sandbox.retire()
        self._submit(self._destroy_released, sandbox)
        self._refill()

    def close(self, keep_acquired: bool = False) -> None:
        """Remove every sandbox of this pool, waiting and acquired alike (idempotent); with
        `keep_acquired`, the acquired ones stay running for a look (`inv clean` removes
        them once this process is gone)."""
        atexit.unregister(self.close)
        with self._cond:
            if self._closed:
                return
            self._closed = True
            held = [*self._ready, *([] if keep_acquired else self._out.values())]
            self._ready.clear()
            self._out.clear()
            self._cond.notify_all()
        if self._retry is not None:
            self._retry.cancel()
        for sandbox in held:
            sandbox.retire()
        self._workers.shutdown(wait=True)  # starts in flight see `closed` and remove theirs
        # Plain threads, not an executor: at interpreter exit (atexit) executors refuse work.
        for start in range(0, len(held), START_WORKERS):
            removers = [
                threading.Thread(target=self._destroy, args=(sandbox,))
                for sandbox in held[start : start + START_WORKERS]
            ]
            for thread in removers:
                thread.start()
            for thread in removers:
                thread.join()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- inside ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("this sandbox pool is closed")

    def _live(self) -> int:
        return len(self._ready) + len(self._out) + self._starting + self._removing

    def _take_ready(self) -> Sandbox | None:
        """The oldest ready sandbox whose agent is still connected; dead ones are removed."""
        while self._ready:
            sandbox = self._ready.popleft()
            if sandbox.connected:
                return sandbox
            self.notes.append(f"{sandbox.name} died while it waited; replacing it")
            self._submit(self._destroy, sandbox)
        return None

    def _start_now(self) -> Sandbox:
        """Start one for an `acquire` that found none ready (a slot is already reserved)."""
        try:
            sandbox = self._start_sandbox()
        except BaseException:
            with self._cond:
                self._starting -= 1
                self._cond.notify_all()
            raise
        with self._cond:
            self._starting -= 1
            if self._closed:
                closed = True
            else:
                closed = False
                self._out[sandbox.name] = sandbox
        if closed:
            self._destroy(sandbox)
            self._check_open()
        return sandbox

    def _start_sandbox(self) -> Sandbox:
        if self.snapshot is not None:
            sandbox = Sandbox.from_snapshot(
                self.snapshot, self.settings, extra_labels=self._labels, backend=self.backend
            )
        else:
            name = snapshots.new_name(self.settings)
            folder = workspaces.create(workspaces.sandboxes_root(self.settings), name)
            sandbox = Sandbox.private(
                self.settings, name, None, folder, extra_labels=self._labels, backend=self.backend
            )
            try:
                sandbox.up()
            except BaseException:
                sandbox.remove()
                raise
        try:
            sandbox.connect()
        except BaseException:
            sandbox.remove()
            raise
        return sandbox

    def _refill(self) -> None:
        """Start as many sandboxes as the pool lacks, in the background, within the cap."""
        with self._cond:
            if self._closed:
                return
            missing = self.size - len(self._ready) - self._starting
            missing = min(missing, self.max_size - self._live())
            self._starting += max(missing, 0)
        for _ in range(max(missing, 0)):
            try:
                self._workers.submit(self._fill_one)
            except RuntimeError:  # shutting down: no new starts
                with self._cond:
                    self._starting -= 1

    def _fill_one(self) -> None:
        try:
            sandbox = self._start_sandbox() if not self._closed else None
            if sandbox is not None and self.pause_idle:
                self._pause_waiting(sandbox)
        except Exception as exc:
            if not isinstance(exc, SandboxError):
                exc = SandboxError(f"starting a pooled sandbox failed: {exc}")
            with self._cond:
                self._starting -= 1
                self._error, self._failures = exc, self._failures + 1
                self._cond.notify_all()
                # Back off before trying again, so a broken engine is not hammered; a timer,
                # so no worker sleeps (releases still get removed meanwhile).
                if not self._closed and (self._retry is None or not self._retry.is_alive()):
                    delay = min(RETRY_MAX_S, 0.5 * 2**self._failures)
                    self._retry = threading.Timer(delay, self._refill)
                    self._retry.daemon = True
                    self._retry.start()
            return
        with self._cond:
            self._starting -= 1
            keep = sandbox is not None and not self._closed
            if sandbox is not None and keep:
                self._ready.append(sandbox)
                self._error, self._failures = None, 0
            self._cond.notify_all()
        if sandbox is not None and not keep:
            self._destroy(sandbox)

    @staticmethod
    def _pause_waiting(sandbox: Sandbox) -> None:
        """Pause a sandbox that is to wait; one that cannot be paused is removed."""
        try:
            sandbox.pause()
        except BaseException:
            sandbox.remove()
            raise

    def _submit(self, job: object, *args: object) -> None:
        """Run a removal in the background (here, when the workers are shut down)."""
        try:
            self._workers.submit(job, *args)  # type: ignore[arg-type]
        except RuntimeError:
            job(*args)  # type: ignore[operator]

    def _destroy_released(self, sandbox: Sandbox) -> None:
        try:
            self._destroy(sandbox)
        finally:
            with self._cond:
                self._removing -= 1
                self._cond.notify_all()
        self._refill()

    def _destroy(self, sandbox: Sandbox) -> None:
        try:
            sandbox.remove()
        except Exception as exc:  # a worker must report, never vanish
            why = exc.message if isinstance(exc, SandboxError) else str(exc)
            self.notes.append(f"could not remove {sandbox.name}: {why} (`inv clean`)")
