"""The sandbox container and the commands run in it: the agent runner's API.

    from stigmer_sandbox import Sandbox

    with Sandbox() as sandbox:
        result = sandbox.exec("python --version", timeout=30)
        print(result.exit_code, result.stdout)

A `Sandbox` is a long-lived container found again by name and labels, created
with secure defaults (no capabilities, no new privileges, pid/memory/CPU
limits, sized /tmp, never privileged or on host namespaces, never the Docker
socket). Commands are strings run by bash inside the sandbox, or argument
lists; nothing passes through a host shell. See `channel` for how they travel.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from .. import engine, images, labels
from ..config import Settings, load_settings
from ..errors import ConfigError, SandboxError, SandboxNotReady, UsageError
from . import agent
from .channel import (
    AgentChannel,
    AgentDied,
    DirectRunner,
    LocalRunner,
    OutputCallback,
    RawResult,
    Request,
)
from .history import AuditLog

WORKSPACE = "/workspace"
SANDBOX_HOME = "/home/sandbox"
SANDBOX_UID = 1000
READY_TIMEOUT_S = 60.0
HEALTHCHECK = {"interval": 5_000_000_000, "timeout": 5_000_000_000, "retries": 3, "start_period": 0}


class ExecOptions(TypedDict, total=False):
    """The options `Sandbox.exec` and `run_local` share, to pass them along as one."""

    timeout: float | None
    env: dict[str, str] | None
    cwd: str | None
    on_stdout: OutputCallback | None
    on_stderr: OutputCallback | None


SENSITIVE_HOST_PATHS = {
    "/",
    "/etc",
    "/proc",
    "/sys",
    "/dev",
    "/boot",
    "/root",
    "/run",
    "/var",
    "/var/run",
    "/var/lib",
    "/var/lib/docker",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/home",
}
DOCKER_SOCKETS = ("/var/run/docker.sock", "/run/docker.sock")
MAX_FILE_BYTES = 64 * 1024 * 1024
AGENT_RETRY_S = 30.0
CREDENTIALS = {"mount_aws": ".aws", "mount_kube": ".kube"}


@dataclass(frozen=True)
class ExecResult:
    """A command's faithful result."""

    exit_code: int
    stdout: str
    stderr: str
    duration_s: float
    timed_out: bool = False
    oom_killed: bool = False
    signal: int | None = None
    truncated: dict[str, bool] = field(default_factory=dict)
    output_bytes: dict[str, int] = field(default_factory=dict)
    via: str = "agent"

    @property
    def cause(self) -> str:
        """Why it ended: `exit`, `timeout`, `oom` or `signal`."""
        return agent.exit_cause(self.exit_code, self.signal, self.timed_out, self.oom_killed)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.cause == "exit"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with `cause`."""
        return {**asdict(self), "cause": self.cause}


def command_argv(command: str | Sequence[str]) -> list[str]:
    """A command as an argument list: strings run through bash inside the sandbox."""
    if isinstance(command, str):
        if not command.strip():
            raise UsageError("empty command")
        argv = ["bash", "-c", command]
    else:
        argv = [str(part) for part in command]
        if not argv or not argv[0]:
            raise UsageError("empty command")
    if any("\0" in part for part in argv):
        raise UsageError("a command cannot contain NUL bytes")
    return argv


def check_env(env: dict[str, str] | None) -> dict[str, str]:
    """Environment for a command: names without `=`/NUL, values without NUL."""
    checked = {}
    for key, value in (env or {}).items():
        if not key or "=" in key or "\0" in key or "\0" in str(value):
            raise UsageError(f"invalid environment variable {key!r}")
        checked[str(key)] = str(value)
    return checked


def check_mount_source(path: Path, what: str) -> Path:
    """Refuse host folders that would expose the host (system folders, the Docker socket)."""
    resolved = path.expanduser().resolve()
    if str(resolved) in SENSITIVE_HOST_PATHS or resolved == Path.home().resolve():
        raise ConfigError(
            f"{what} {resolved} is a sensitive host folder; refusing to mount it",
            "point it at a project folder such as ./workspace",
        )
    for socket_path in DOCKER_SOCKETS:
        target = Path(socket_path).resolve()
        if target == resolved or resolved in target.parents:
            raise ConfigError(
                f"{what} {resolved} would expose the Docker socket to the sandbox",
                "the sandbox must never reach the Docker Engine",
            )
    return resolved


def _bind(source: Path, target: str, read_only: bool = False) -> Any:
    from docker.types import Mount

    return Mount(target, str(source), type="bind", read_only=read_only, propagation="rprivate")


def credential_mounts(settings: Settings) -> list[Any]:
    """Opt-in, read-only mounts of ~/.aws and ~/.kube; a missing folder is an error."""
    mounts = []
    for key, folder in CREDENTIALS.items():
        if not getattr(settings, key):
            continue
        source = Path.home() / folder
        if not source.is_dir():
            raise ConfigError(
                f"{key} is on but {source} does not exist", f"create it, or turn {key} off"
            )
        mounts.append(_bind(source, f"{SANDBOX_HOME}/{folder}", read_only=True))
    return mounts


def prepare_folders(settings: Settings, host_user: tuple[int, int]) -> None:
    """Create the workspace and logs folders before Docker would (as root) and make them
    writable for the sandbox user."""
    for key in ("workspace", "logs"):
        folder = settings.path(key)
        folder.mkdir(parents=True, exist_ok=True)
        if host_user[0] == 0 and folder.stat().st_uid == 0:
            # A root host user's folders would be read-only for the sandbox user.
            os.chown(folder, SANDBOX_UID, SANDBOX_UID, follow_symlinks=False)


def container_spec(settings: Settings, image: str, extra_labels: dict[str, str]) -> dict[str, Any]:
    """Everything `containers.create` gets: the secure defaults, from settings."""
    workspace = check_mount_source(settings.path("workspace"), "workspace")
    logs = check_mount_source(settings.path("logs"), "logs folder")
    command = ["sandbox-keepalive"]
    if settings.max_lifetime_hours:
        command = ["timeout", "-s", "TERM", f"{settings.max_lifetime_hours * 3600:.0f}", *command]
    memory = settings.memory_bytes
    return {
        "image": image,
        "command": command,
        "name": settings.container_name,
        "hostname": "sandbox",
        "working_dir": WORKSPACE,
        "detach": True,
        "init": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "privileged": False,
        "pids_limit": settings.pids_limit,
        "mem_limit": memory,
        "memswap_limit": memory,
        "nano_cpus": int(settings.cpus * 1e9) or None,
        "tmpfs": {"/tmp": f"rw,nosuid,nodev,size={settings.tmp_size}"},
        "read_only": settings.read_only_root,
        "network_mode": settings.network,
        "mounts": [_bind(workspace, WORKSPACE), _bind(logs, "/logs"), *credential_mounts(settings)],
        "environment": {"PYTHONUNBUFFERED": "1", "STIGMER_SANDBOX": "1"},
        "healthcheck": HEALTHCHECK,
        "restart_policy": {"Name": "no"},
        "labels": extra_labels,
    }


def spec_hash(spec: dict[str, Any], image_id: str) -> str:
    """Identity of a container's configuration, to notice when it must be recreated."""
    stable = {k: v for k, v in spec.items() if k != "labels"}
    stable["mounts"] = [dict(m) for m in stable["mounts"]]
    text = json.dumps([stable, image_id], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Sandbox:
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
    ) -> None:
        base = settings or load_settings()
        self.settings = base.replace(
            source="arguments", container_name=name, image=image, network=network
        )
        self.name = self.settings.container_name
        self.host_user = host_user or (os.getuid(), os.getgid())
        self.ephemeral = ephemeral
        self.extra_labels = dict(extra_labels or {})
        self.audit = AuditLog(self.settings.path("state_dir") / "audit.jsonl")
        self.notes: list[str] = []
        self._lock = threading.RLock()
        self._container: Any = None
        self._channel: AgentChannel | None = None
        self._agent_failed_at = 0.0

    @classmethod
    def create_ephemeral(cls, settings: Settings | None = None, **kwargs: Any) -> Sandbox:
        """A uniquely named sandbox, removed when its `with` block ends."""
        base = settings or load_settings()
        name = f"{base.container_name}-{uuid.uuid4().hex[:8]}"
        return cls(base, name=name, ephemeral=True, **kwargs)

    # -- lifecycle -------------------------------------------------------------------------

    def find(self) -> Any:
        """The container, if it exists; refuses one this project did not create."""
        import docker.errors

        with engine.engine_errors():
            try:
                container = engine.client().containers.get(self.name)
            except docker.errors.NotFound:
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
        """The uid/gid commands run as: the host user's, or the image's for a root host user."""
        return (SANDBOX_UID, SANDBOX_UID) if self.host_user[0] == 0 else self.host_user

    def up(self, timeout: float = READY_TIMEOUT_S) -> Sandbox:
        """Make sure the container exists, runs and is ready (idempotent)."""
        with self._lock:
            image = images.image_for_user(self.settings.image, *self.host_user)
            with engine.engine_errors():
                image_id = engine.client().images.get(image).id
            spec = container_spec(self.settings, image, {})
            wanted = spec_hash(spec, image_id)
            container = self.find()
            if (
                container is not None
                and container.labels.get(f"{labels.PREFIX}.config", wanted) != wanted
            ):
                self.notes.append(f"recreating {self.name}: its image or settings changed")
                self._discard(container)
                container = None
            if container is None:
                prepare_folders(self.settings, self.host_user)
                spec["labels"] = self._labels(wanted)
                with engine.engine_errors():
                    container = engine.client().containers.create(**spec)
            if container.status != "running":
                with engine.engine_errors():
                    container.start()
            self._container = container
            self._wait_ready(timeout)
        return self

    def _discard(self, container: Any) -> None:
        self._close_channel()
        with engine.engine_errors():
            container.remove(force=True)

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
                code, output = self._container.exec_run(["sandbox-healthcheck"])
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

    def stop(self) -> None:
        """Stop the container (the keep-alive exits at once on SIGTERM)."""
        self._close_channel()
        container = self.find()
        if container is not None:
            with engine.engine_errors():
                container.stop(timeout=5)

    def remove(self) -> bool:
        """Remove the container; the workspace on the host is never touched."""
        self._close_channel()
        container = self.find()
        if container is None:
            return False
        with engine.engine_errors():
            container.remove(force=True)
        self._container = None
        return True

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
            raise SandboxNotReady(
                f"sandbox {self.name} does not exist", "start it with `inv sandbox.up`"
            )
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

    def _runner(self) -> AgentChannel | DirectRunner:
        with self._lock:
            if self._channel is not None and self._channel.alive:
                return self._channel
            self._ensure_running()
            if time.monotonic() - self._agent_failed_at > AGENT_RETRY_S:
                try:
                    channel = AgentChannel(
                        self._container.id, max_line=4 * self.settings.output_limit + 65536
                    )
                    channel.ping()
                    self._channel = channel
                    return channel
                except SandboxError as exc:
                    self._agent_failed_at = time.monotonic()
                    self.notes.append(f"agent unavailable ({exc.message}); using docker exec")
            return DirectRunner(self._container.id)

    def _ensure_running(self) -> None:
        """Recover from a container stopped or removed behind our back."""
        if self._container is not None:
            try:
                with engine.engine_errors():
                    self._container.reload()
                if self._container.status == "running":
                    return
            except SandboxError:
                pass
            self.notes.append(f"sandbox {self.name} was not running; starting it again")
        self.up()

    def exec(
        self,
        command: str | Sequence[str],
        *,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        output_limit: int | None = None,
        keep_background: bool = False,
    ) -> ExecResult:
        """Run a command in the sandbox and return its result (never raises on its exit).

        Everything the command started ends with it (background and `setsid` children
        included) unless `keep_background` is set, e.g. for a server used by later commands.
        """
        request = Request(
            argv=command_argv(command),
            env=check_env(env),
            cwd=self._cwd(cwd),
            timeout=float(timeout if timeout is not None else self.settings.timeout),
            limit=max(int(output_limit or self.settings.output_limit), 2),
            stdin=stdin.encode() if isinstance(stdin, str) else stdin,
            keep_background=keep_background,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
        )
        if request.timeout <= 0:
            raise UsageError("timeout must be positive")
        raw = self._run(request)
        result = _result(raw)
        self.audit.record(audit_entry(self.name, command, request, result))
        return result

    def _run(self, request: Request) -> RawResult:
        runner = self._runner()
        try:
            return runner.run(request)
        except AgentDied as exc:
            self._close_channel()
            raise AgentDied(
                f"{exc.message}; the command's result is unknown",
                "the next command starts a new agent",
            ) from None

    @staticmethod
    def _cwd(cwd: str | None) -> str:
        if not cwd:
            return WORKSPACE
        return cwd if cwd.startswith("/") else posixpath.join(WORKSPACE, cwd)

    # -- files -----------------------------------------------------------------------------

    def _inside_workspace(self, path: str) -> str:
        """`path` (relative to /workspace) checked for `..`, absoluteness and symlink escapes."""
        parts = Path(path).parts
        if not path or Path(path).is_absolute() or ".." in parts:
            raise UsageError(f"path must be relative to {WORKSPACE} without '..': {path!r}")
        target = posixpath.join(WORKSPACE, path)
        resolved = self.exec(["realpath", "-m", "--", target], timeout=30).stdout.strip()
        if resolved != target:
            raise UsageError(f"{path!r} goes through a symlink ({resolved}); refusing to follow it")
        return target

    def put_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Write a file under /workspace (tar-based copy; owned by the sandbox user)."""
        target = self._inside_workspace(path)
        payload = data.encode() if isinstance(data, str) else data
        folder = posixpath.dirname(target)
        self.exec(["mkdir", "-p", "--", folder], timeout=30)
        uid, gid = self.sandbox_user
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            info = tarfile.TarInfo(posixpath.basename(target))
            info.size, info.mode, info.uid, info.gid = len(payload), mode, uid, gid
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(payload))
        with engine.engine_errors():
            if not self._container_obj().put_archive(folder, archive.getvalue()):
                raise SandboxError(f"could not write {target} in the sandbox")

    def get_file(self, path: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
        """Read a regular file under /workspace (no symlinks, at most `max_bytes`)."""
        target = self._inside_workspace(path)
        with engine.engine_errors():
            stream, stat = self._container_obj().get_archive(target)
        if stat.get("size", 0) > max_bytes:
            raise UsageError(f"{path} is {stat['size']} bytes; the limit is {max_bytes}")
        data = b"".join(stream)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = tar.next()
            if member is None or not member.isfile():
                raise UsageError(f"{path} is not a regular file")
            extracted = tar.extractfile(member)
            return extracted.read() if extracted else b""

    def _container_obj(self) -> Any:
        if self._container is None:
            self.up()
        return self._container


def interactive_shell(sandbox: Sandbox, root: bool = False) -> int:
    """An interactive bash in the sandbox with this terminal's stdio (no Invoke pty, which drops
    keys); without a terminal, stdin is still passed so it works in CI."""
    docker = shutil.which("docker")
    if docker is None:
        raise SandboxError("the docker CLI is needed for an interactive shell", "install docker")
    terminal = sys.stdin.isatty() and sys.stdout.isatty()
    argv = [docker, "exec", "-i", *(["-t"] if terminal else []), "-w", WORKSPACE]
    argv += [*(["-u", "root"] if root else []), sandbox.name, "bash"]
    return subprocess.run(argv, check=False).returncode


def audit_entry(
    sandbox: str, command: str | Sequence[str], request: Request, result: ExecResult
) -> dict[str, Any]:
    """What the audit trail keeps of one command."""
    return {
        "sandbox": sandbox,
        "command": command if isinstance(command, str) else request.argv,
        "cwd": request.cwd,
        "exit_code": result.exit_code,
        "cause": result.cause,
        "duration_s": round(result.duration_s, 4),
        "timed_out": result.timed_out,
        "oom_killed": result.oom_killed,
        "output_bytes": result.output_bytes,
        "via": result.via,
    }


def _result(raw: RawResult) -> ExecResult:
    return ExecResult(
        exit_code=raw.exit_code,
        stdout=raw.stdout.decode(errors="replace"),
        stderr=raw.stderr.decode(errors="replace"),
        duration_s=raw.duration_s,
        timed_out=raw.timed_out,
        oom_killed=raw.oom_killed,
        signal=raw.signal,
        truncated=raw.truncated,
        output_bytes=raw.totals,
        via=raw.via,
    )


def run_local(
    settings: Settings,
    command: str | Sequence[str],
    *,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    on_stdout: OutputCallback | None = None,
    on_stderr: OutputCallback | None = None,
) -> ExecResult:
    """Run a command on this host (`execution_mode: local`) with the sandbox's semantics:
    timeout kills the whole tree, output is capped, exit causes are told apart."""
    workspace = settings.path("workspace")
    workspace.mkdir(parents=True, exist_ok=True)
    request = Request(
        argv=command_argv(command),
        env=check_env(env),
        cwd=str(workspace / cwd) if cwd else str(workspace),
        timeout=float(timeout if timeout is not None else settings.timeout),
        limit=max(settings.output_limit, 2),
        on_stdout=on_stdout,
        on_stderr=on_stderr,
    )
    result = _result(LocalRunner().run(request))
    AuditLog(settings.path("state_dir") / "audit.jsonl").record(
        audit_entry("local", command, request, result)
    )
    return result
