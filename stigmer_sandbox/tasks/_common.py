"""What every task module shares: the task decorator and settings lookup."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import invoke
from invoke import Context, Exit

from .. import config, console
from ..errors import SandboxError


def task(*args: Any, **kwargs: Any) -> Any:
    """`invoke.task` that turns library errors into one line and a non-zero exit."""

    def decorate(func: Callable[..., Any]) -> invoke.Task:
        @functools.wraps(func)
        def body(c: Context, *a: Any, **kw: Any) -> Any:
            try:
                return func(c, *a, **kw)
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


def settings(c: Context, **flags: Any) -> config.Settings:
    """Validated settings: Invoke's merged config, the guide's variables, then flags."""
    return config.settings_from_invoke(c.config, os.environ, **flags)
