"""An inspect_ai sandbox provider: `sandbox="stigmer"` runs each sample in a pooled sandbox.

    from inspect_ai import Task
    Task(dataset=..., solver=..., sandbox="stigmer")                      # the defaults
    Task(..., sandbox=("stigmer", "stigmer-sandbox.yaml"))                 # a config file
    Task(..., sandbox=SandboxEnvironmentSpec(
        "stigmer", StigmerSandboxConfig(memory="1g", egress="allowlist", allow=["pypi.org"])))

Registered under the `inspect_ai` entry point (extra `inspect`), so inspect finds the type
`stigmer` once the package is installed. A configuration (a `StigmerSandboxConfig`, or a
YAML file of the same keys) names the image, the limits, the egress policy and any other
setting; the project's `invoke.yaml` and `INVOKE_STIGMER_*` apply underneath.

Lifecycle: `task_init` starts a `SandboxPool` per configuration, so samples start on a
sandbox that is already up; `sample_init` acquires one, `sample_cleanup` releases it
(destroyed in the background, a fresh one takes its place), `task_cleanup` closes the pool
and every sandbox it made goes with it. They all carry the pool's labels and
`INSPECT_LABEL`; `cli_cleanup` (`inspect sandbox cleanup stigmer [NAME]`) removes, by that
label only, the ones whose owner process is gone, or the one named.

Commands run as the sandbox user, never root: `exec(user=...)` accepts that user (by name
or uid) and raises `SandboxUserUnsupportedError` for any other (see docs/agent-runner.md).
A timeout raises TimeoutError with the partial output; output past inspect's limit raises
OutputLimitExceededError carrying the head and tail kept; a command the kernel refuses to
execute raises PermissionError; a sandbox that cannot answer raises
SandboxUnavailableError. Files go through the batched transfers, with Python's own errors.
"""

from __future__ import annotations

import errno
import os
import shlex
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

from inspect_ai._util.error import PrerequisiteError
from inspect_ai.util import (
    ExecResult,
    OutputLimitExceededError,
    SandboxConnection,
    SandboxEnvironment,
    SandboxEnvironmentConfigType,
    SandboxEnvironmentLimits,
    SandboxUnavailableError,
    SandboxUserUnsupportedError,
    sandboxenv,
)
from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import override

from .. import config as config_module
from .. import engine, labels, policy
from ..config import Settings, load_settings
from ..errors import ConfigError, SandboxError, UsageError
from ..host.cleanup import STOPPED
from ..runtime import ExecOptions, Sandbox, SandboxPool, workspaces
from ..runtime import ExecResult as StigmerResult
from ..runtime.client.files import MAX_FILE_BYTES
from . import adapter

# Marks every sandbox this provider starts (beside the pool's own labels).
INSPECT_LABEL = f"{labels.PREFIX}.inspect"
POOL_LABEL = f"{labels.PREFIX}.pool"
CONFIG_FILES = ["stigmer-sandbox.yaml", "stigmer-sandbox.yml"]
# Settings that have a field of their own in the config; `settings` may not set them too.
LIMIT_KEYS = ("memory", "cpus", "pids_limit", "tmp_size", "timeout")
OWN_KEYS = (*LIMIT_KEYS, "image", "egress", "isolation", "allow", "deny", "allow_presets")
T = TypeVar("T")


class StigmerSandboxConfig(BaseModel):
    """The `stigmer` sandbox's configuration (inspect keeps it in the eval log)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image: str | None = Field(default=None, description="sandbox image (default: the project's)")
    memory: str | None = Field(default=None, description="memory limit, e.g. 1g")
    cpus: float | None = Field(default=None, description="CPU limit (0: none)")
    pids_limit: int | None = Field(default=None, description="process limit (0: none)")
    tmp_size: str | None = Field(default=None, description="size of the /tmp tmpfs")
    timeout: float | None = Field(
        default=None, description="seconds a command may run when inspect gives no timeout"
    )
    egress: Literal["public", "allowlist", "open", "none"] | None = None
    isolation: Literal["container", "gvisor"] | None = Field(
        default=None, description="container (runc) or gvisor (`inv engine.install --gvisor`)"
    )
    allow: tuple[str, ...] = Field(default=(), description="destinations added to the allowlist")
    deny: tuple[str, ...] = Field(default=(), description="destinations never reached")
    allow_presets: tuple[str, ...] = Field(
        default=(), description="named allow sets: python, node..."
    )
    pool_size: int = Field(default=2, ge=0, description="sandboxes kept started ahead of samples")
    project_dir: str | None = Field(
        default=None,
        description="folder whose invoke.yaml applies underneath (default: the task's)",
    )
    labels: dict[str, str] = Field(default={}, description="extra labels on every sandbox")
    settings: dict[str, Any] = Field(default={}, description="any other stigmer-sandbox setting")

    def __hash__(self) -> int:  # inspect keeps configs in sets; `labels` is a mapping
        return hash(self.model_dump_json())


# -- configuration ---------------------------------------------------------------------------


def load_config(path: str | Path) -> StigmerSandboxConfig:
    """A config file (YAML or JSON, the config's keys at the top), checked: a ConfigError
    in one line naming the file and the key."""
    import yaml

    file = Path(path)
    try:
        document = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{file}: must be a mapping of keys, got {type(document).__name__}")
    return parse_config(document, str(file))


def parse_config(values: dict[str, Any], source: str) -> StigmerSandboxConfig:
    """A config from a mapping, checked: a ConfigError naming the first bad key."""
    config: StigmerSandboxConfig = adapter.validated(StigmerSandboxConfig, values, source)
    return config


def as_config(config: SandboxEnvironmentConfigType | dict[str, Any] | None) -> StigmerSandboxConfig:
    """What inspect passes (None, a file name, a config object or its dict), as a config."""
    if config is None:
        return StigmerSandboxConfig()
    if isinstance(config, StigmerSandboxConfig):
        return config
    if isinstance(config, str):
        return load_config(config)
    if isinstance(config, dict):
        return parse_config(config, "sandbox config")
    raise ConfigError(
        f"the stigmer sandbox takes a StigmerSandboxConfig or a YAML file, not a "
        f"{type(config).__name__}"
    )


def settings_for(config: StigmerSandboxConfig) -> Settings:
    """The sandbox settings a config gives: the project's, then the config's own keys."""
    own = {key: getattr(config, key) for key in LIMIT_KEYS}
    return adapter.configured_settings(
        config.project_dir, own, config.settings, OWN_KEYS, "sandbox config"
    )


def pool_options(config: StigmerSandboxConfig) -> dict[str, Any]:
    """The `SandboxPool` arguments a config gives."""
    return {
        "size": config.pool_size,
        "image": config.image,
        "settings": settings_for(config),
        "extra_labels": {**config.labels, INSPECT_LABEL: "true"},
        "egress": config.egress,
        "allow": config.allow,
        "deny": config.deny,
        "allow_presets": config.allow_presets,
        "isolation": config.isolation,
    }


# -- pools: one per configuration, shared by the tasks that use it ---------------------------


@dataclass
class _Pool:
    pool: SandboxPool
    tasks: int  # task_init calls not yet matched by a task_cleanup


_lock = threading.Lock()
_pools: dict[str, _Pool] = {}
# What inspect passed, as first resolved: a relative file name or project folder is read
# from the task's folder (where task_init runs), wherever later calls run from.
_resolved: dict[str, StigmerSandboxConfig] = {}


def _given_key(config: object) -> str:
    if isinstance(config, BaseModel):
        return f"{type(config).__name__}:{config.model_dump_json()}"
    return repr(config)


def resolved_config(config: SandboxEnvironmentConfigType | None) -> StigmerSandboxConfig:
    """The config inspect passed, parsed once, its project folder fixed at first use."""
    key = _given_key(config)
    with _lock:
        found = _resolved.get(key)
    if found is not None:
        return found
    parsed = as_config(config)
    folder = str(Path(parsed.project_dir or os.getcwd()).resolve())
    fixed = parsed.model_copy(update={"project_dir": folder})
    with _lock:
        return _resolved.setdefault(key, fixed)


def pool_for(config: StigmerSandboxConfig, task: bool) -> SandboxPool:
    """The pool of this config, started if need be; `task` counts a task_init."""
    key = config.model_dump_json()
    with _lock:
        entry = _pools.get(key)
        if entry is None:
            entry = _pools[key] = _Pool(SandboxPool(**pool_options(config)), 0)
        entry.tasks += 1 if task else 0
        return entry.pool


def end_task(config: StigmerSandboxConfig) -> SandboxPool | None:
    """The pool to close when the last task using this config ends, taken out of use."""
    key = config.model_dump_json()
    with _lock:
        entry = _pools.get(key)
        if entry is None:
            return None
        entry.tasks -= 1
        if entry.tasks > 0:
            return None
        return _pools.pop(key).pool


def _prerequisite(exc: SandboxError) -> PrerequisiteError:
    """A sandbox that cannot be had, as inspect shows a setup problem (one line)."""
    return PrerequisiteError(f"stigmer sandbox: {exc}")


# -- results ---------------------------------------------------------------------------------


def _limit_text(limit: int) -> str:
    """A byte count as inspect shows its limits (`10 MiB`)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if limit >= size and limit % size == 0:
            return f"{limit // size} {unit}"
    return f"{limit} bytes"


def exec_result(result: StigmerResult, seconds: float, limit: int) -> ExecResult[str]:
    """A stigmer result as inspect's `ExecResult`, or the exception inspect expects."""
    output = result.stdout + result.stderr
    if result.exit_code is None:
        raise SandboxUnavailableError(f"the sandbox did not answer: {result.error}")
    if result.timed_out:
        timed_out = TimeoutError(f"Command timed out after {seconds:g} seconds")
        if output:  # inspect's tools show it (its docker provider does the same)
            timed_out.truncated_output = output  # type: ignore[attr-defined]
        raise timed_out
    if adapter.truncated(result):
        raise OutputLimitExceededError(_limit_text(limit), truncated_output=output)
    stderr = result.stderr + (adapter.start_failure_text(result) or "")
    notice = adapter.ended_notice(result)  # an OOM kill: 137 alone does not say so
    if notice:
        stderr = adapter.with_notice(stderr, notice) + "\n"
    return ExecResult(result.exit_code == 0, result.exit_code, result.stdout, stderr)


EXEC_ERRORS = adapter.ErrorTypes(unavailable=SandboxUnavailableError)


def _read_too_large(path: str, why: str) -> Exception:
    """A file above what one transfer carries, as inspect's read limit error."""
    return OutputLimitExceededError(_limit_text(MAX_FILE_BYTES), truncated_output=None)


READ_ERRORS = adapter.ErrorTypes(too_large=_read_too_large, unavailable=SandboxUnavailableError)
WRITE_ERRORS = adapter.ErrorTypes(unavailable=SandboxUnavailableError)


def _read_limit_error() -> OutputLimitExceededError:
    return OutputLimitExceededError(
        SandboxEnvironmentLimits.MAX_READ_FILE_SIZE_STR, truncated_output=None
    )


# -- the provider ----------------------------------------------------------------------------


@sandboxenv(name="stigmer")
class StigmerSandboxEnvironment(SandboxEnvironment):
    """One sample's stigmer sandbox, acquired from its configuration's pool."""

    def __init__(self, sandbox: Sandbox, pool: SandboxPool | None = None) -> None:
        super().__init__()
        self.sandbox = sandbox
        self._pool = pool
        self._user_name: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def config_files(cls) -> list[str]:
        return list(CONFIG_FILES)

    @classmethod
    def config_deserialize(cls, config: dict[str, Any]) -> BaseModel:
        return parse_config(config, "sandbox config")

    @classmethod
    def default_concurrency(cls) -> int | None:
        """At most a pool's cap of samples at once (`pool_max_size`), so none waits for a
        sandbox the pool may not start."""
        try:
            return load_settings().pool_max_size
        except SandboxError:
            return None

    @classmethod
    async def task_init(cls, task_name: str, config: SandboxEnvironmentConfigType | None) -> None:
        """Start the configuration's pool (its sandboxes come up in the background)."""
        try:
            resolved = resolved_config(config)
            await adapter.in_thread(pool_for, resolved, True)
        except SandboxError as exc:
            raise _prerequisite(exc) from None

    @classmethod
    async def sample_init(
        cls,
        task_name: str,
        config: SandboxEnvironmentConfigType | None,
        metadata: dict[str, str],
    ) -> dict[str, SandboxEnvironment]:
        """A started sandbox from the pool (started now when none waits)."""
        try:
            resolved = resolved_config(config)
            pool = await adapter.in_thread(pool_for, resolved, False)
            sandbox = await adapter.in_thread(pool.acquire)
        except SandboxError as exc:
            raise _prerequisite(exc) from None
        return {"default": cls(sandbox, pool)}

    @classmethod
    async def sample_cleanup(
        cls,
        task_name: str,
        config: SandboxEnvironmentConfigType | None,
        environments: dict[str, SandboxEnvironment],
        interrupted: bool,
    ) -> None:
        """Give each sandbox back: it is destroyed in the background and replaced."""
        for environment in environments.values():
            if isinstance(environment, StigmerSandboxEnvironment):
                await adapter.in_thread(environment.release)

    @classmethod
    async def task_cleanup(
        cls, task_name: str, config: SandboxEnvironmentConfigType | None, cleanup: bool
    ) -> None:
        """Close the pool when the last task using it ends: every sandbox it made goes,
        but with `--no-sandbox-cleanup` the samples' ones stay (`inspect sandbox cleanup
        stigmer` removes them once this process is gone)."""
        try:
            resolved = resolved_config(config)
        except SandboxError:
            return  # task_init refused it: no pool was started
        pool = end_task(resolved)
        if pool is not None:
            await adapter.in_thread(pool.close, not cleanup)

    @classmethod
    async def cli_cleanup(cls, id: str | None) -> None:
        """Remove this provider's leftover sandboxes (owner gone), or the one named."""
        try:
            removed = await adapter.in_thread(remove_leftovers, id)
        except SandboxError as exc:
            print(f"stigmer sandbox cleanup: {exc}")
            return
        for name, why in removed:
            print(f"removed stigmer sandbox {name} ({why})")

    def release(self) -> None:
        """Give the sandbox back to its pool (removed when it has none); idempotent."""
        if self.sandbox.retired:
            return
        try:
            if self._pool is not None:
                self._pool.release(self.sandbox)
            else:
                self.sandbox.remove()
        except UsageError:
            pass  # its pool closed first, and removed it

    # -- commands ----------------------------------------------------------------------------

    @override
    async def exec(
        self,
        cmd: list[str],
        input: str | bytes | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        user: str | None = None,
        timeout: int | None = None,
        timeout_retry: bool = True,
        concurrency: bool = True,
    ) -> ExecResult[str]:
        """Run `cmd` (argv, resolved through the sandbox's PATH) as the sandbox user."""
        await self._check_user(user)
        limit = min(SandboxEnvironmentLimits.MAX_EXEC_OUTPUT_SIZE, config_module.MAX_OUTPUT_LIMIT)
        seconds, _given = adapter.command_timeout(timeout, self.sandbox.settings)
        options: ExecOptions = {
            "timeout": seconds,
            "cwd": cwd,
            "env": env,
            "stdin": input,
            "output_limit": limit,
        }
        try:
            result = await adapter.run_request(self.sandbox, list(cmd), options)
        except SandboxError as exc:
            raise adapter.sandbox_error(exc, EXEC_ERRORS) from None
        if adapter.refused_execution(result):
            raise PermissionError(errno.EACCES, "Permission denied", cmd[0])
        return exec_result(result, seconds, limit)

    async def _check_user(self, user: str | None) -> None:
        """Refuse a user other than the sandbox's own, the way inspect expects."""
        if user is None:
            return
        uid = self.sandbox.sandbox_user[0]
        if user == str(uid):
            return
        if user not in ("root", "0"):  # the sandbox user is never root
            if self._user_name is None:
                found = await adapter.run_request(self.sandbox, ["id", "-un"], {"timeout": 30})
                self._user_name = found.stdout.strip() if found.ok else ""
            if user == self._user_name:
                return
        raise SandboxUserUnsupportedError(
            f"stigmer sandboxes run every command as the sandbox user (uid {uid}); "
            f"they cannot run one as {user!r}"
        )

    # -- files -------------------------------------------------------------------------------

    async def write_file(self, file: str, contents: str | bytes) -> None:
        """Write a file as the sandbox user, its folders made (relative: under /workspace)."""
        data = (
            contents.encode("utf-8", "surrogateescape") if isinstance(contents, str) else contents
        )
        entry = (adapter.sandbox_path(file), bytes(data))
        done = await self._transfer(self.sandbox.upload_files, [entry], WRITE_ERRORS)
        if done[0].error:
            raise adapter.file_error(file, done[0].error, WRITE_ERRORS)

    @overload
    async def read_file(self, file: str, text: Literal[True] = True) -> str: ...

    @overload
    async def read_file(self, file: str, text: Literal[False]) -> bytes: ...

    async def read_file(self, file: str, text: bool = True) -> str | bytes:
        """Read a regular file as the sandbox user (relative: under /workspace)."""
        if adapter.names_a_directory(file):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", file)
        path = adapter.sandbox_path(file)
        done = await self._transfer(self.sandbox.download_files, [path], READ_ERRORS)
        if done[0].error:
            raise adapter.file_error(file, done[0].error, READ_ERRORS)
        content = done[0].content or b""
        if len(content) > SandboxEnvironmentLimits.MAX_READ_FILE_SIZE:
            raise _read_limit_error()
        return content.decode("utf-8") if text else content

    async def _transfer(
        self, method: Callable[[Any], T], argument: Sequence[Any], errors: adapter.ErrorTypes
    ) -> T:
        try:
            return await adapter.in_thread(method, argument)
        except SandboxError as exc:
            raise adapter.sandbox_error(exc, errors) from None

    # -- for people --------------------------------------------------------------------------

    async def connection(self, *, user: str | None = None) -> SandboxConnection:
        """How to open a shell in the sandbox, as its user."""
        uid, gid = self.sandbox.sandbox_user
        argv = ["docker", "exec", "-it", "-u", f"{uid}:{gid}", "-w", policy.WORKSPACE]
        return SandboxConnection(
            type="stigmer",
            command=shlex.join([*argv, self.sandbox.name, "bash", "-l"]),
            container=self.sandbox.name,
        )

    def default_polling_interval(self) -> float:
        return 0.2


# -- cleanup from the command line -----------------------------------------------------------


def remove_leftovers(name: str | None, settings: Settings | None = None) -> list[tuple[str, str]]:
    """Remove this provider's sandboxes (found by `INSPECT_LABEL` only) whose owner process
    is gone, or, given a `name` (a sandbox or a pool id), those it names; what went, and why.
    Each goes with its egress gateway and private folder."""
    settings = settings or load_settings()
    wanted = {"label": [f"{labels.MANAGED}=true", INSPECT_LABEL]}
    with engine.engine_errors():
        found = engine.client().containers.list(all=True, filters=wanted, ignore_removed=True)
    removed = []
    for container in found:
        marks = container.labels
        if marks.get(labels.KIND) != "sandbox":
            continue
        if name is not None:
            why = "named" if name in (container.name, marks.get(POOL_LABEL)) else None
        else:
            why = labels.orphan_reason(marks, stopped=container.status in STOPPED)
        if why is None:
            continue
        folder = workspaces.private_folder_of(container)
        if folder is not None:
            Sandbox.private(settings, container.name, None, folder).remove()
        else:
            Sandbox(settings, name=container.name).remove()
        removed.append((container.name, why))
    return removed
