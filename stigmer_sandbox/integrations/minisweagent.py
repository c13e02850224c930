"""A mini-swe-agent 2.x environment: the agent's bash actions run in a stigmer sandbox.

    # mini-swe-agent's config (YAML), or `mini --environment-class <the path below>`
    environment:
      environment_class: stigmer_sandbox.integrations.minisweagent.StigmerEnvironment
      cwd: /workspace/repo
      timeout: 60
      memory: 2g
      egress: allowlist
      allow_presets: [python]

    # or in Python
    from stigmer_sandbox.integrations.minisweagent import StigmerEnvironment
    with StigmerEnvironment(timeout=60, memory="2g") as env:
        DefaultAgent(model, env, **agent_config).run(task)

mini-swe-agent finds an environment by its class path (`environment_class`; its short
names are a fixed table), so the path above is how a config selects this one. Needs the
`swe` extra: `pip install 'stigmer-sandbox[swe]'`.

Each environment starts an ephemeral, hardened sandbox of its own when it is made (as
mini-swe-agent's docker environment starts its container) and removes it at `cleanup()`,
at the end of a `with` block, or when the object is collected; one left behind by a crashed
run carries its owner's pid and `inv clean` takes it. Not a pool: mini-swe-agent makes one
environment per task instance, often each with its own image (SWE-bench), and has no
run-level hook that could close a pool. A caller with a pool passes
`StigmerEnvironment(sandbox=pool.acquire())` and gives the sandbox back itself.

The config takes the docker environment's keys that mean something here (`image`, `cwd`,
`env`, `forward_env`, `timeout`, `interpreter`) with their meaning, plus the sandbox's:
limits, egress, `output_limit`, `labels`, `project_dir` and any other project setting under
`settings`. Results have the docker environment's shape and wording: stdout and stderr
merged in the order written, a timeout as returncode -1 with the partial output and its
`TimeoutExpired` text (the command's whole tree is ended, where docker's leaves it running),
any failure to run as returncode -1 and `exception_info`, never an exception;
`echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT` as the first line of a successful output raises
`Submitted`. Output past `output_limit` keeps its head and tail with a marker between;
each output's `extra` names the sandbox and the command's id in its audit trail.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from minisweagent.exceptions import Submitted
from minisweagent.utils.serialize import recursive_merge
from pydantic import BaseModel, ConfigDict, Field

from .. import labels, policy
from ..config import Settings
from ..errors import ConfigError, SandboxError
from ..runtime import ExecResult, Sandbox
from . import adapter

ENVIRONMENT_CLASS = "stigmer_sandbox.integrations.minisweagent.StigmerEnvironment"
# Marks every sandbox this environment starts (beside the project's ephemeral labels).
SWE_LABEL = f"{labels.PREFIX}.minisweagent"
SUBMIT_MARKER = "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"
ERROR_PREFIX = "An error occurred while executing the command: "
LIMIT_KEYS = ("memory", "cpus", "pids_limit", "tmp_size", "output_limit")
OWN_KEYS = (*LIMIT_KEYS, "image", "timeout", "egress", "allow", "deny", "allow_presets")
# The docker environment's keys about its `docker` CLI: nothing here reads them, so a
# config that sets one is told so rather than silently ignored.
DOCKER_ONLY = ("executable", "run_args", "container_timeout", "pull_timeout")
UNAME_FIELDS = ("system", "node", "release", "version", "machine")
UNAME = "; ".join(f"uname -{flag}" for flag in "snrvm")

LOGGER = logging.getLogger("minisweagent.environment")  # the docker environment's logger


class StigmerEnvironmentConfig(BaseModel):
    """The environment's configuration (mini-swe-agent keeps it in the trajectory)."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = None
    """Sandbox image (default: the project's `image`)."""
    cwd: str = policy.WORKSPACE
    """Folder commands start in; a relative one is under /workspace."""
    env: dict[str, str] = {}
    """Environment variables set for every command."""
    forward_env: list[str] = []
    """Host variables passed on when set on the host (`env` wins on a clash)."""
    timeout: int = Field(default=30, gt=0)
    """Seconds a command may run when the agent gives none."""
    interpreter: list[str] = ["bash", "-lc"]
    """The argv the command is appended to (the docker environment's default)."""
    output_limit: int | None = None
    """Bytes of output kept per command, head and tail (default: `output_limit`, 1 MiB)."""
    memory: str | None = None
    cpus: float | None = None
    pids_limit: int | None = None
    tmp_size: str | None = None
    egress: Literal["public", "allowlist", "open", "none"] | None = None
    allow: list[str] = []
    deny: list[str] = []
    allow_presets: list[str] = []
    labels: dict[str, str] = {}
    """Extra labels on the sandbox and its gateway."""
    project_dir: str | None = None
    """Folder whose invoke.yaml applies underneath (default: the current one)."""
    settings: dict[str, Any] = {}
    """Any other project setting by name (`read_only_root`, `network`...)."""


def parse_config(
    values: dict[str, Any],
    config_class: type[StigmerEnvironmentConfig] = StigmerEnvironmentConfig,
    source: str = "environment config",
) -> StigmerEnvironmentConfig:
    """The config from mini-swe-agent's keyword arguments, checked: a ConfigError naming
    the first bad key."""
    docker_only = [key for key in DOCKER_ONLY if key in values]
    if docker_only:
        raise ConfigError(
            f"{source}: {docker_only[0]}: a docker environment key that means nothing here "
            "(the sandbox's image, limits and egress have keys of their own)"
        )
    config: StigmerEnvironmentConfig = adapter.validated(config_class, values, source)
    return config


def settings_for(config: StigmerEnvironmentConfig) -> Settings:
    """The sandbox settings a config gives: the project's, then the config's own keys."""
    own = {key: getattr(config, key) for key in LIMIT_KEYS}
    return adapter.configured_settings(
        config.project_dir, own, config.settings, OWN_KEYS, "environment config"
    )


def start_sandbox(config: StigmerEnvironmentConfig) -> Sandbox:
    """An ephemeral sandbox as the config describes, started (removed again if it cannot)."""
    sandbox = Sandbox.create_ephemeral(
        settings_for(config),
        image=config.image,
        extra_labels={**config.labels, SWE_LABEL: "true"},
        egress=config.egress,
        allow=config.allow,
        deny=config.deny,
        allow_presets=config.allow_presets,
    )
    try:
        sandbox.up()
    except BaseException:
        sandbox.remove()
        raise
    return sandbox


# -- results ---------------------------------------------------------------------------------


def failure_output(exception: BaseException, output: str = "", **extra: Any) -> dict[str, Any]:
    """A command that could not run or finish, worded as the docker environment words it."""
    return {
        "output": output,
        "returncode": -1,
        "exception_info": f"{ERROR_PREFIX}{exception}",
        "extra": {"exception_type": type(exception).__name__, "exception": str(exception), **extra},
    }


class ResultLost(Exception):
    """The sandbox's agent never answered for a command (it died or stopped answering)."""


def to_output(
    result: ExecResult, argv: Sequence[str], timeout: float, sandbox: str
) -> dict[str, Any]:
    """A stigmer result as mini-swe-agent's output dict (the docker environment's shape)."""
    output = result.stdout + result.stderr + (adapter.start_failure_text(result) or "")
    extra: dict[str, Any] = {"sandbox": sandbox, "command_id": result.command_id}
    if adapter.truncated(result):
        extra |= {"truncated": True, "output_bytes": dict(result.output_bytes)}
    if result.timed_out:  # subprocess's own exception, as the docker environment gets it
        expired = subprocess.TimeoutExpired(list(argv), timeout, output=output)
        return failure_output(expired, output, **extra)
    if result.exit_code is None:
        return failure_output(
            ResultLost(f"the command's result was lost: {result.error}"), output, **extra
        )
    notice = adapter.ended_notice(result)  # an OOM kill: 137 alone does not say so
    return {
        "output": adapter.with_notice(output, notice) + ("\n" if notice else ""),
        "returncode": result.exit_code,
        "exception_info": "",
        "extra": extra,
    }


def check_finished(output: dict[str, Any]) -> None:
    """Raise `Submitted` when a successful output starts with the submit marker (as every
    mini-swe-agent environment does): the rest of the output is the submission."""
    lines = output.get("output", "").lstrip().splitlines(keepends=True)
    if lines and lines[0].strip() == SUBMIT_MARKER and output["returncode"] == 0:
        submission = "".join(lines[1:])
        raise Submitted(
            {
                "role": "exit",
                "content": submission,
                "extra": {"exit_status": "Submitted", "submission": submission},
            }
        )


def forwarded_env(config: StigmerEnvironmentConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables each command gets: `forward_env`'s that the host sets, then `env`."""
    forwarded = {key: environ[key] for key in config.forward_env if key in environ}
    return {**forwarded, **config.env}


# -- the environment -------------------------------------------------------------------------


class StigmerEnvironment:
    """mini-swe-agent's `Environment` over a stigmer `Sandbox` (see the module docstring)."""

    def __init__(
        self,
        *,
        config_class: type[StigmerEnvironmentConfig] = StigmerEnvironmentConfig,
        logger: logging.Logger | None = None,
        sandbox: Sandbox | None = None,
        **kwargs: Any,
    ) -> None:
        """See `StigmerEnvironmentConfig` for the keyword arguments. `sandbox`: run in one
        the caller owns (its own image and limits apply, and `cleanup` leaves it running)."""
        self.logger = logger or LOGGER
        self._owned = sandbox is None
        self._uname: dict[str, str] | None = None
        self.sandbox: Sandbox | None = None  # set first: cleanup() may run on a failed init
        self.config = parse_config(kwargs, config_class)
        if sandbox is None:
            sandbox = start_sandbox(self.config)
            self.logger.info(f"Started stigmer sandbox {sandbox.name}")
        self.sandbox = sandbox

    def execute(self, action: dict, cwd: str = "", *, timeout: int | None = None) -> dict[str, Any]:
        """Run `action["command"]` through the interpreter in the sandbox; the output dict."""
        command = action.get("command", "")
        argv = [*self.config.interpreter, command]
        seconds = timeout or self.config.timeout
        try:
            result = self._sandbox.exec(
                argv,
                timeout=seconds,
                cwd=adapter.sandbox_path(cwd or self.config.cwd),
                env=forwarded_env(self.config, os.environ),
                merge_output=True,
                output_limit=self.config.output_limit,
            )
        except Exception as exc:  # the docker environment's contract: the agent reads it
            if not isinstance(exc, SandboxError):
                self.logger.exception("execute failed")
            output = failure_output(exc)
        else:
            output = to_output(result, argv, seconds, self._sandbox.name)
        check_finished(output)
        return output

    def get_template_vars(self, **kwargs: Any) -> dict[str, Any]:
        """The config's keys, the sandbox's `uname` (system, node, release, version,
        machine: what the templates tell the model about its machine), then `kwargs`."""
        return recursive_merge(self.config.model_dump(), self.uname(), kwargs)

    def uname(self) -> dict[str, str]:
        """The sandbox's uname fields, read once (the host's if it cannot answer)."""
        if self._uname is None:
            lines = self._uname_lines()
            if len(lines) == len(UNAME_FIELDS):
                self._uname = dict(zip(UNAME_FIELDS, lines, strict=True))
            else:
                self._uname = {key: getattr(platform.uname(), key) for key in UNAME_FIELDS}
        return self._uname

    def _uname_lines(self) -> list[str]:
        try:
            found = self._sandbox.exec(UNAME, timeout=30)
        except SandboxError:
            return []
        return found.stdout.splitlines() if found.ok else []

    def serialize(self) -> dict:
        """The environment's part of the trajectory: its config, class and sandbox."""
        return {
            "info": {
                "config": {
                    "environment": self.config.model_dump(mode="json"),
                    "environment_type": f"{type(self).__module__}.{type(self).__name__}",
                    "environment_sandbox": getattr(self.sandbox, "name", None),
                }
            }
        }

    def cleanup(self) -> None:
        """Remove the sandbox this environment started (idempotent; one it was given stays)."""
        sandbox, self.sandbox = self.sandbox, None
        if sandbox is None or not self._owned:
            return
        try:
            sandbox.remove()
        except SandboxError as exc:
            self.logger.warning(f"could not remove stigmer sandbox {sandbox.name}: {exc}")

    @property
    def _sandbox(self) -> Sandbox:
        if self.sandbox is None:
            raise SandboxError("this environment was cleaned up: its sandbox is gone")
        return self.sandbox

    def __enter__(self) -> StigmerEnvironment:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.cleanup()

    def __del__(self) -> None:
        """Remove the sandbox when the object is collected (as the docker environment does)."""
        # At interpreter shutdown this may fail: the owner-pid label lets `inv clean` take it.
        with contextlib.suppress(Exception):
            self.cleanup()
