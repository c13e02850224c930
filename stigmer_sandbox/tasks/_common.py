"""What every task module shares: the task decorator and settings lookup."""

from __future__ import annotations

import functools
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import invoke
from invoke import Context, Exit

from .. import config, console
from ..errors import ConfigError, SandboxError, UsageError

if TYPE_CHECKING:
    from .. import runtime


def task(*args: Any, **kwargs: Any) -> Any:
    """`invoke.task` that turns library errors into one line and a non-zero exit."""

    def decorate(func: Callable[..., Any]) -> invoke.Task:
        @functools.wraps(func)
        def body(c: Context, *a: Any, **kw: Any) -> Any:
            try:  # hints read when the task runs, not at start-up for every task
                return func(c, *a, **parse_numbers(kw, optional_numbers(func)))
            except SandboxError as exc:
                raise failure(exc, bool(kw.get("json"))) from None
            except KeyboardInterrupt:
                raise failure(SandboxError("interrupted"), bool(kw.get("json")), 130) from None

        return invoke.task(**kwargs)(body)

    if len(args) == 1 and callable(args[0]) and not kwargs:
        return decorate(args[0])
    return decorate


def failure(exc: SandboxError, as_json: bool, code: int | None = None) -> Exit:
    """The exit for a library error: one line on stderr (its details above it), or with
    `--json` one JSON object on stdout, so a caller parsing stdout always gets JSON."""
    code = exc.exit_code if code is None else code
    if as_json:
        console.emit_json(console.error_report(exc.message, exc.hint, exc.details))
        return Exit(code=code)
    for line in exc.details:
        console.detail(line)
    return Exit(console.error_line(exc.message, exc.hint), code)


def check_startup(project_dir: Path, argv: Sequence[str]) -> None:
    """Refuse a broken project `invoke.yaml` or a bad `INVOKE_STIGMER_*` variable before
    Invoke reads them (it would stop with a traceback): one line, or the JSON object when
    the command line has `--json`, and the error's exit code."""
    try:
        config.read_project_file(project_dir / config.PROJECT_FILE)
        for path in runtime_config_files(argv, os.environ):
            config.read_project_file(path)
        config.check_environment(os.environ)
    except ConfigError as exc:
        stop = failure(exc, console.wants_json(argv))
        if stop.message:
            print(stop.message, file=sys.stderr)
        raise SystemExit(stop.code) from None


def runtime_config_files(argv: Sequence[str], environ: Mapping[str, str]) -> list[Path]:
    """The YAML or JSON files Invoke will merge as its runtime configuration (`-f FILE`,
    `--config FILE` before the first task, INVOKE_RUNTIME_CONFIG); a Python one is
    Invoke's to load. A task's own `-f` (a compose file) comes after its name."""
    found = [environ["INVOKE_RUNTIME_CONFIG"]] if environ.get("INVOKE_RUNTIME_CONFIG") else []
    items = iter(argv)
    for item in items:
        if item in ("-f", "--config"):
            found.append(next(items, ""))
        elif item.startswith("--config="):
            found.append(item.split("=", 1)[1])
        elif not item.startswith("-"):
            break  # a task name (or a core option's value: scanning stops short, safely)
    return [Path(f) for f in found if Path(f).suffix in (".yaml", ".yml", ".json")]


def optional_numbers(func: Callable[..., Any]) -> dict[str, type]:
    """Parameters typed `int | None` or `float | None`: Invoke types a flag by its default,
    so these (None: "fall back to config") arrive as strings."""
    found = {}
    for name, hint in typing.get_type_hints(func).items():
        if isinstance(hint, types.UnionType) and type(None) in hint.__args__:
            kinds = [k for k in hint.__args__ if k in (int, float)]
            if kinds:
                found[name] = kinds[0]
    return found


def parse_numbers(values: dict[str, Any], numbers: dict[str, type]) -> dict[str, Any]:
    """`values` with the numeric flags converted; a bad one is one clear line."""
    parsed = dict(values)
    for name, kind in numbers.items():
        if isinstance(parsed.get(name), str):
            try:
                parsed[name] = kind(parsed[name])
            except ValueError:
                what = "a whole number" if kind is int else "a number"
                flag = ("-" if len(name) == 1 else "--") + name.replace("_", "-")
                raise UsageError(f"{flag} must be {what}, got {parsed[name]!r}") from None
    return parsed


# A task's `--timeout` for waiting on something to come up (a sandbox, the engine).
WAIT_DEFAULT_S = 60.0
WAIT_LIMIT_S = 3600.0


def wait_seconds(timeout: float | None) -> float:
    """A waiting task's `--timeout` (default 60 s): more than 0, at most an hour."""
    if timeout is None:
        return WAIT_DEFAULT_S
    if not 0 < timeout <= WAIT_LIMIT_S:  # also false for nan
        raise UsageError(
            f"--timeout must be more than 0 and at most {WAIT_LIMIT_S:.0f} seconds, got {timeout}"
        )
    return timeout


def settings(c: Context, **flags: Any) -> config.Settings:
    """Validated settings: Invoke's merged config, the guide's variables, then flags."""
    return config.settings_from_invoke(c.config, os.environ, **flags)


# The egress flags of every task that makes a sandbox (`run`, `sandbox.up`, `compose.up`).
EGRESS_HELP = {
    "egress": "public: any public address, never the host, the LAN or cloud metadata; "
    "allowlist: only --allow entries; open: everything; none: no network (default: config "
    "egress)",
    "allow": "a destination the sandbox may reach: name, *.name, address or CIDR, with an "
    "optional :port; repeatable, added to config allow (default: none)",
    "deny": "a destination it may never reach, same form; deny always wins; repeatable "
    "(default: none)",
    "allow_preset": "a named set of allow entries: python (pip's index hosts), node (npm's "
    "registry), debian (the Debian mirror); repeatable (default: none)",
    "secret": "a secret from the `secrets` config the sandbox may use (it sees a placeholder, "
    "the broker puts the value into requests to the secret's hosts); repeatable, added to "
    "config use_secrets (default: none)",
}
EGRESS_LISTS = ["allow", "deny", "allow_preset", "secret"]
# The flags of every task that makes a sandbox: the egress ones and the isolation.
SANDBOX_HELP = {
    **EGRESS_HELP,
    "isolation": "container (the engine's runc) or gvisor (gVisor's user-space kernel between "
    "commands and the host's; `inv engine.install --gvisor`) (default: config isolation, "
    "container)",
}


def egress_settings(
    c: Context,
    egress: str | None,
    allow: list[str] | None,
    deny: list[str] | None,
    allow_preset: list[str] | None,
    secret: list[str] | None = None,
    **flags: Any,
) -> config.Settings:
    """`settings` with the egress flags applied (entries and secrets added to the
    configured ones)."""
    chosen = settings(c, **flags)
    lists = (allow or (), deny or (), allow_preset or ())
    return chosen.with_egress(egress, *lists, source="flags", secrets=secret or ())


def sandbox_for(c: Context, **flags: Any) -> runtime.Sandbox:
    """The project's sandbox container under these settings and flags (not started)."""
    from .. import runtime  # the runtime is heavy: loaded when a task uses it, not at start-up

    return runtime.Sandbox(settings(c, **flags))


def report_result(result: dict[str, Any], json: bool) -> None:
    """The end of a command task (`inv run`, `compose.exec`): the JSON result or a warning
    for an unusual end; its exit."""
    code = console.command_result(result, json)
    if code != 0:
        raise Exit(code=code)
