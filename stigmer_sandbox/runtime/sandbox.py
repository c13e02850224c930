"""The sandbox container and the commands run in it: the agent runner's API.

    from stigmer_sandbox import Sandbox

    with Sandbox() as sandbox:
        result = sandbox.exec("python --version", timeout=30)
        print(result.exit_code, result.stdout)

A `Sandbox` is a long-lived container found again by name and labels, created with
the confinement `policy` describes. See `channel` for how commands travel and `agent`
for what runs them inside.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any, Unpack

from .. import config, engine, images, labels, policy
from ..config import Settings, load_settings
from ..errors import SandboxError, SandboxNotReady, UsageError
from ..images.record import ImageRecord
from . import bootstrap, host_helper, processes, snapshots, workspaces
from .backend import DOCKER, Backend
from .channel import AgentChannel, AgentLost, DirectRunner, RawResult, Request
from .commands import ExecOptions, ExecResult, audit_entry, lost, make_request
from .files import TRANSFER_TIMEOUT_S, FileTransfers
from .guest import BATCH_SOURCE
from .history import AuditLog
from .processes import Process
from .sessions import Session

READY_TIMEOUT_S = 60.0
MAX_FILE_BYTES = config.MAX_OUTPUT_LIMIT - 2
AGENT_RETRY_S = 30.0
# File transfers use root-owned tools only: the sandbox user owns /opt/venv/bin, first on
# its PATH.
SYSTEM_PATH = "/usr/bin:/bin"


def spec_hash(spec: dict[str, Any], image_id: str) -> str:
    """Identity of a container's configuration, to notice when it must be recreated."""
    stable = {k: v for k, v in spec.items() if k != "labels"}
    stable["mounts"] = [host_helper.stable_form(m) for m in stable["mounts"]]
    text = json.dumps([stable, image_id], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Sandbox(FileTransfers):
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
    ) -> None:
        base = settings or load_settings()
        if name is None and network and network != base.network:
            name = f"{base.container_name}-{network}"  # a sandbox per network setting
        self.settings = base.replace(
            source="arguments", container_name=name, image=image, network=network
        )
        self.name = self.settings.container_name
        self.host_user = host_user or policy.host_user()
        self.ephemeral = ephemeral
        self.use_agent = use_agent
        self.backend = backend
        self.extra_labels = dict(extra_labels or {})
        self.audit = AuditLog(self.settings.path("state_dir") / "audit.jsonl")
        self.notes: list[str] = []
        self._lock = threading.RLock()
        self._container: Any = None
        self._channel: AgentChannel | None = None
        self._agent_failed_at = 0.0
        # A pooled, forked or snapshot-born sandbox: its own workspace folder (and, for a
        # fork, its own image) go when it is removed, and it is never started again.
        self.private_folder = private_folder
        self.owned_image = owned_image
        self.prepared_image = prepared_image
        self.retired = False
        # A container started another way (compose): commands only, never created,
        # recreated, restarted or removed from here.
        self.attached = False

    @classmethod
    def create_ephemeral(cls, settings: Settings | None = None, **kwargs: Any) -> Sandbox:
        """A uniquely named sandbox, removed when its `with` block ends."""
        base = settings or load_settings()
        name = f"{base.container_name}-{uuid.uuid4().hex[:8]}"
        return cls(base, name=name, ephemeral=True, **kwargs)

    @classmethod
    def attach(cls, name: str, settings: Settings | None = None, **kwargs: Any) -> Sandbox:
        """A running container this project started another way (compose), reached through
        the same agent, helper and audit trail; it is never created, recreated or removed here."""
        sandbox = cls(settings, name=name, **kwargs)
        sandbox.attached = True
        return sandbox

    # -- lifecycle -------------------------------------------------------------------------

    def find(self) -> Any:
        """The container, if it exists; refuses one this project did not create."""
        container = self.backend.find(self.name)
        if container is None:
            return None
        if container.labels.get(labels.MANAGED) != "true":
            raise SandboxError(
                f"a container named {self.name} exists that stigmer-sandbox did not create",
                f"remove it (docker rm -f {self.name}) or set container_name",
            )
        return container

    def _labels(self, config_hash: str) -> dict[str, str]:
        extra = {"config": config_hash, "sandbox": self.name}
        if self.settings.max_lifetime_hours:
            extra["expires"] = str(int(time.time() + self.settings.max_lifetime_hours * 3600))
        if self.ephemeral:
            extra.update(owner_pid=str(os.getpid()), owner_host=os.uname().nodename)
        return {**labels.project_labels("sandbox", **extra), **self.extra_labels}

    @property
    def sandbox_user(self) -> tuple[int, int]:
        """The uid/gid commands run as (see `policy.sandbox_user`)."""
        return policy.sandbox_user(self.host_user)

    def up(self, timeout: float = READY_TIMEOUT_S) -> Sandbox:
        """Make sure the container exists, runs and is ready (idempotent)."""
        with self._lock:
            if self.retired:
                raise SandboxNotReady(
                    f"sandbox {self.name} was released or removed with its private workspace",
                    "start a new one (a pool's acquire(), fork() or from_snapshot())",
                )
            if self.attached:
                return self._attach_running(timeout)
            spec = policy.container_spec(self.settings, self.settings.image, {})
            image = self.settings.image
            if not self.prepared_image:  # a committed image already has the right user
                record = ImageRecord.of(self.settings)
                image = images.image_for_user(image, *self.sandbox_user, record)
            image_id = engine.image(image).id
            spec["image"] = image
            folders = list(spec["mounts"])
            # The helper every command runs through comes from the host, never the image.
            spec["mounts"].append(host_helper.mount(self.settings, image, self.backend))
            wanted = spec_hash(spec, image_id)
            container = self._reusable(self.find(), wanted)
            started = container is None or container.status != "running"
            if container is None:
                policy.prepare_folders(self.settings, self.host_user)
            # Pinned now and checked once started: a folder swapped for a symlink in between
            # (e.g. by a command of a running sandbox) must not be what gets mounted.
            pins = policy.pin_mounts(folders) if started else ()
            if container is None:
                spec["labels"] = self._labels(wanted)
                container = self.backend.create(spec)
            if container.status != "running":
                with engine.engine_errors():
                    container.start()
            policy.verify_mounts(pins, self.backend, container)
            self._container = container
            early = self._connect_early() if started and self.use_agent else None
            try:
                self._wait_ready(timeout)
            finally:
                channel = early.result() if early else None
            if channel is not None:
                self._close_channel()
                self._channel = channel
            self.notes.extend(bootstrap.on_start(self, started))
        return self

    def _attach_running(self, timeout: float) -> Sandbox:
        container = self._existing()
        if container.status != "running":
            raise SandboxNotReady(
                f"sandbox {self.name} is {container.status}", "start it (e.g. `inv compose.up`)"
            )
        self._container = container
        self._wait_ready(timeout)
        return self

    def _connect_early(self) -> EarlyChannel:
        """Start the agent while the health check runs (they are independent), so a new
        sandbox is connected when it is ready: ~100-300 ms sooner to its first command."""
        return EarlyChannel(self._open_channel)

    def _open_channel(self) -> AgentChannel:
        channel = AgentChannel(
            self._container.id,
            self.sandbox_user,
            max_line=2 * config.MAX_OUTPUT_LIMIT + 65536,
            backend=self.backend,
        )
        try:
            channel.ping()
        except BaseException:
            channel.close()
            raise
        return channel

    def _reusable(self, container: Any, wanted: str) -> Any:
        """The existing container if it can serve, else None (after removing it)."""
        if container is None:
            return None
        why = None
        if container.labels.get(f"{labels.PREFIX}.config", wanted) != wanted:
            why = "its image or settings changed"
        elif labels.expired(container.labels):
            why = "it outlived its maximum lifetime"
        if why is None:
            return container
        self.notes.append(f"recreating {self.name}: {why}")
        self._close_channel()
        with engine.engine_errors():
            container.remove(force=True)
        return None

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        detail = "not started"
        while time.monotonic() < deadline:
            with engine.engine_errors():
                self._container.reload()
                state = self._container.attrs["State"]
                if state["Status"] in ("exited", "dead"):
                    raise SandboxNotReady(
                        f"sandbox {self.name} exited with code {state.get('ExitCode')} before it "
                        f"was ready: {self._last_log_line()}",
                        f"see `docker logs {self.name}`",
                    )
                if state.get("Health", {}).get("Status") == "healthy":
                    return  # the engine's own check passed: skip a ~50 ms exec
                code, output = self._container.exec_run(
                    [policy.HEALTHCHECK_COMMAND], environment={"PATH": policy.ROOT_PATH}
                )
            if code == 0:
                return
            detail = output.decode(errors="replace").strip()[:200]
            time.sleep(0.1)
        raise SandboxNotReady(
            f"sandbox {self.name} did not become healthy within {timeout:.0f} s: {detail}",
            "run `inv doctor`; `inv fix-permissions` if the workspace is not writable",
        )

    def _last_log_line(self) -> str:
        with engine.engine_errors():
            lines = self._container.logs(tail=5).decode(errors="replace").strip().splitlines()
        return lines[-1][:200] if lines else "no output"

    def _refuse_if_attached(self, action: str) -> None:
        if self.attached:
            raise UsageError(
                f"sandbox {self.name} was started by compose; {action} it there "
                "(`inv compose.down`)"
            )

    def stop(self) -> None:
        """Stop the container (the keep-alive exits at once on SIGTERM)."""
        self._refuse_if_attached("stop")
        self._close_channel()
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
                self.retired = True
            self._close_channel()
        container = self.find()
        try:
            if container is not None:
                with engine.engine_errors():
                    container.remove(force=True)
                self._container = None
            if self.private_folder is not None:
                workspaces.remove(self.private_folder)
        finally:
            if self.owned_image:
                engine.remove_image(self.owned_image)
        return container is not None

    def status(self) -> dict[str, Any]:
        """State, health, image, limits and mounts, as `docker inspect` knows them."""
        container = self.find()
        if container is None:
            return {"name": self.name, "exists": False, "state": "missing"}
        attrs = container.attrs
        host = attrs["HostConfig"]
        return {
            "name": self.name,
            "exists": True,
            "id": container.short_id,
            "state": attrs["State"]["Status"],
            "health": (attrs["State"].get("Health") or {}).get("Status", "none"),
            "image": attrs["Config"]["Image"],
            "started_at": attrs["State"].get("StartedAt"),
            "memory": host.get("Memory"),
            "nano_cpus": host.get("NanoCpus"),
            "pids_limit": host.get("PidsLimit"),
            "network": host.get("NetworkMode"),
            "read_only": host.get("ReadonlyRootfs"),
            "mounts": [
                {"source": m["Source"], "target": m["Destination"], "rw": m["RW"]}
                for m in attrs.get("Mounts", [])
            ],
            "agent": bool(self._channel and self._channel.alive),
        }

    def _existing(self) -> Any:
        container = self.find()
        if container is None:
            start = "`inv compose.up`" if self.attached else "`inv sandbox.up`"
            raise SandboxNotReady(f"sandbox {self.name} does not exist", f"start it with {start}")
        return container

    def logs(self, follow: bool = False, tail: str | int = "all") -> Iterator[bytes]:
        """The container's output (the keep-alive's and the engine's view of it)."""
        if tail != "all" and not str(tail).isdigit():
            raise UsageError(f"--tail must be a number of lines or all, got {tail!r}")
        container = self._existing()
        with engine.engine_errors():
            yield from container.logs(
                stream=True, follow=follow, tail=tail if tail == "all" else int(tail)
            )

    def inspect(self) -> dict[str, Any]:
        """`docker inspect` of the container."""
        return dict(self._existing().attrs)

    def __enter__(self) -> Sandbox:
        return self.up()

    def __exit__(self, *_exc: object) -> None:
        if self.ephemeral:
            self.remove()
        else:
            self._close_channel()

    def close(self) -> None:
        """Drop the connection to the sandbox's agent; the container keeps running."""
        self._close_channel()

    def _close_channel(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None

    # -- commands --------------------------------------------------------------------------

    def retire(self) -> None:
        """Refuse every later use of this object (a pool does this on release)."""
        with self._lock:
            self.retired = True
            self._close_channel()

    def connect(self) -> Sandbox:
        """Open the agent connection now, so the first command does not pay for it."""
        self._runner()
        return self

    @property
    def connected(self) -> bool:
        """Whether the agent connection is open and its heartbeat alive."""
        channel = self._channel
        return channel is not None and channel.alive

    def _runner(self) -> AgentChannel | DirectRunner:
        with self._lock:
            if self.retired:
                raise SandboxNotReady(
                    f"sandbox {self.name} was released or removed", "acquire or start a new one"
                )
            if self._channel is not None and self._channel.alive:
                return self._channel
            self._ensure_running()
            retry = time.monotonic() - self._agent_failed_at > AGENT_RETRY_S
            if self.use_agent and retry:
                try:
                    self._channel = self._open_channel()
                    return self._channel
                except SandboxError as exc:
                    self._agent_failed_at = time.monotonic()
                    self.notes.append(f"agent unavailable ({exc.message}); using docker exec")
            return DirectRunner(self._container.id, self.sandbox_user)

    def _ensure_running(self) -> None:
        """Recover from a container stopped or removed behind our back."""
        if self._container is not None:
            try:
                with engine.engine_errors():
                    self._container.reload()
                if self._container.status in ("running", "paused"):  # paused: a fork, briefly
                    return
            except SandboxError:
                pass
            self.notes.append(f"sandbox {self.name} was not running; starting it again")
        self.up()

    def exec(self, command: str | Sequence[str], **options: Unpack[ExecOptions]) -> ExecResult:
        """Run a command in the sandbox and return its result (never raises on its exit).

        Options: timeout (s), env, cwd (relative to /workspace), stdin, on_stdout /
        on_stderr callbacks (the head of each stream, live), output_limit (bytes kept per
        stream, head and tail), keep_background, merge_output (stderr into stdout, in the
        order written). Everything the command started ends with it unless
        `keep_background` is set, e.g. for a server used by later commands.
        """
        request = make_request(self.settings, command, self._cwd(options.get("cwd")), options)
        return self._execute(command, request)[1]

    def _execute(
        self, command: str | Sequence[str], request: Request
    ) -> tuple[RawResult, ExecResult]:
        """Run a request, record it in the audit trail; the raw and the decoded result."""
        started = time.monotonic()
        runner = self._runner()
        try:
            raw = runner.run(request)
        except AgentLost as exc:
            self._close_channel()
            # The reset kills the agent; each helper it left sees its parent die and ends
            # its command's tree (PR_SET_PDEATHSIG), which the next command can check.
            reason = f"{exc.message}; the agent was reset, which ends the command's processes"
            raw = lost(request, reason, time.monotonic() - started, "agent")
        result = ExecResult.from_raw(raw, request.cid, request.session)
        self.audit.record(audit_entry(self.name, command, request, result))
        return raw, result

    # -- state: fork and snapshot (see `snapshots`) -----------------------------------------

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
        channel = self._channel
        with channel.frozen() if channel else nullcontext(), self.backend.frozen(container):
            yield container

    def fork(self) -> Sandbox:
        """A new started sandbox with this one's filesystem (packages installed, files under
        /) and a copy of its workspace, which then diverge. Running processes, /tmp and
        sessions are not carried. Remove it with `remove()` or a `with` block."""
        return snapshots.fork(self)

    def snapshot(self, name: str, replace: bool = False) -> dict[str, Any]:
        """Keep this sandbox's filesystem and workspace as snapshot `name` (processes, /tmp
        and sessions are not kept); `replace` overwrites one of that name."""
        return snapshots.take(self, name, replace)

    @classmethod
    def from_snapshot(cls, name: str, settings: Settings | None = None) -> Sandbox:
        """A new started sandbox from snapshot `name`, with its own copy of the workspace."""
        return snapshots.start_from(settings, name)

    def session(self, name: str = "default") -> Session:
        """A named shell session: cwd, exports and functions carry over (see `sessions`)."""
        return Session(self, name)

    def start(
        self,
        command: str | Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        output_limit: int | None = None,
    ) -> Process:
        """Start a command in the background; it runs until it ends, is killed, or the
        sandbox goes (see `processes`). `timeout` None: no limit."""
        return processes.start(
            self, command, env=env, cwd=cwd, timeout=timeout, output_limit=output_limit
        )

    def processes(self) -> list[dict[str, Any]]:
        """Every background process, running or recently ended, oldest first."""
        return processes.listing(self)

    def process(self, process_id: str) -> Process:
        """Reattach to a background process by id, from any host process."""
        return processes.find(self, process_id)

    def agent_call(self, op: str, fields: dict[str, Any]) -> dict[str, Any]:
        """A request to the sandbox's agent that is not a command (sessions, processes)."""
        runner = self._runner()
        if not isinstance(runner, AgentChannel):
            raise SandboxError(f"{op} needs the sandbox agent, which is unavailable here")
        try:
            return runner.call(op, fields)
        except AgentLost:
            self._close_channel()
            raise

    @staticmethod
    def _cwd(cwd: str | None) -> str:
        if not cwd:
            return policy.WORKSPACE
        return cwd if cwd.startswith("/") else posixpath.join(policy.WORKSPACE, cwd)

    # -- files -----------------------------------------------------------------------------

    @staticmethod
    def _workspace_path(path: str) -> str:
        """`path` (relative to /workspace) checked for `..` and absoluteness."""
        parts = posixpath.normpath(path).split("/") if path else []
        if not path or path.startswith("/") or ".." in path.split("/") or "\0" in path:
            raise UsageError(f"path must be relative to {policy.WORKSPACE} without '..': {path!r}")
        return posixpath.join(policy.WORKSPACE, *parts)

    def put_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Write a file under /workspace as the sandbox user, creating its folders; the path
        is resolved one name at a time without following a symlink (a folder swapped for
        one meanwhile fails the write, never redirects it). Text keeps undecodable bytes."""
        payload = data.encode(errors="surrogateescape") if isinstance(data, str) else data
        self.write_file(self._workspace_path(path), payload, mode)

    def get_file(self, path: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
        """Read a regular file under /workspace (no symlinks, at most `max_bytes`); the size
        is checked before a byte is read, so host memory stays bounded, and a FIFO is
        refused rather than waited on."""
        if not 0 <= max_bytes <= MAX_FILE_BYTES:
            raise UsageError(f"max_bytes must be between 0 and {MAX_FILE_BYTES}")
        return self.read_file(self._workspace_path(path), max_bytes)

    def _run_batch(self, argv: list[str], stdin: bytes, output_limit: int) -> RawResult:
        command = [policy.PYTHON, "-I", "-S", "-c", BATCH_SOURCE, *argv]
        options: ExecOptions = {"timeout": TRANSFER_TIMEOUT_S, "env": {"PATH": SYSTEM_PATH}}
        options["stdin"], options["output_limit"] = stdin, output_limit
        request = make_request(self.settings, command, "/", options)
        return self._execute(f"(file transfer: {argv[0]})", request)[0]


class EarlyChannel:
    """An agent connection being opened in a thread; `result()` waits for it (None when it
    failed: the first command tries again, or falls back to docker exec)."""

    def __init__(self, opener: Any) -> None:
        self._channel: AgentChannel | None = None
        self._thread = threading.Thread(target=self._open, args=(opener,), daemon=True)
        self._thread.start()

    def _open(self, opener: Any) -> None:
        with suppress(SandboxError):
            self._channel = opener()

    def result(self, timeout: float = AGENT_RETRY_S) -> AgentChannel | None:
        self._thread.join(timeout)
        return None if self._thread.is_alive() else self._channel


def interactive_shell(sandbox: Sandbox, root: bool = False) -> int:
    """An interactive bash in the sandbox with this terminal's stdio (no Invoke pty, which drops
    keys); without a terminal, stdin is still passed so it works in CI."""
    docker = shutil.which("docker")
    if docker is None:
        raise SandboxError("the docker CLI is needed for an interactive shell", "install docker")
    terminal = sys.stdin.isatty() and sys.stdout.isatty()
    uid, gid = (0, 0) if root else sandbox.sandbox_user
    argv = [docker, "exec", "-i", *(["-t"] if terminal else []), "-w", policy.WORKSPACE]
    if root:  # never the sandbox user's tools on root's PATH
        argv += ["-e", f"PATH={policy.ROOT_PATH}"]
    argv += ["-u", f"{uid}:{gid}", sandbox.name, "/bin/bash"]
    return subprocess.run(argv, check=False).returncode
