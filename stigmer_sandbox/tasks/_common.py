"""What every task module shares: the task decorator and settings lookup."""

from __future__ import annotations

import functools
import os
import types
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import invoke
from invoke import Context, Exit

from .. import config, console
from ..errors import SandboxError, UsageError

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
                for line in exc.details:
                    console.detail(line)
                raise Exit(console.error_line(exc.message, exc.hint), exc.exit_code) from None
            except KeyboardInterrupt:
                raise Exit(console.error_line("interrupted"), 130) from None

        return invoke.task(**kwargs)(body)

    if len(args) == 1 and callable(args[0]) and not kwargs:
        return decorate(args[0])
    return decorate


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
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} must be {what}, got {parsed[name]!r}") from None
    return parsed


def settings(c: Context, **flags: Any) -> config.Settings:
    """Validated settings: Invoke's merged config, the guide's variables, then flags."""
    return config.settings_from_invoke(c.config, os.environ, **flags)


def sandbox_for(c: Context, **flags: Any) -> runtime.Sandbox:
    """The project's sandbox container under these settings and flags (not started)."""
    from .. import runtime  # the runtime is heavy: loaded when a task uses it, not at start-up

    return runtime.Sandbox(settings(c, **flags))
