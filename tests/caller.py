"""Undo what a test's caller leaves to the processes a test starts.

Ignored and blocked signals survive fork and exec: run from a background job of a script
(where the shell ignores SIGINT and SIGQUIT) or under a supervisor, a child that a test
means to Ctrl-C would ignore it. `with_signals` starts the child through a small Python
that sets them first, so a test sees the same thing from any caller, and can also play
the caller that ignores or blocks them.

The tool's settings variables (`INVOKE_STIGMER_*`, the guide's `STIGMER_*`) in the
caller's environment would reach every `inv` a test starts (`STIGMER_EXECUTION_MODE=local`
runs commands on the host): `without_settings_variables` removes them while a test runs.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import pytest

from stigmer_sandbox import config

# What a terminal's foreground job has: these at their default and unblocked (SIGPIPE and
# SIGXFSZ too, which the Python in between would otherwise leave ignored).
RESET = (
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGPIPE,
    signal.SIGXFSZ,
)

_SET_AND_EXEC = """\
import os, signal, sys
reset, ignore, block = ({int(n) for n in arg.split(",") if n} for arg in sys.argv[1:4])
for number in reset:
    signal.signal(number, signal.SIG_IGN if number in ignore else signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_SETMASK, block)
os.execv(sys.argv[4], sys.argv[4:])
"""


def _numbers(signals: Iterable[signal.Signals]) -> str:
    return ",".join(str(int(number)) for number in signals)


def with_signals(
    argv: Sequence[str],
    ignore: Iterable[signal.Signals] = (),
    block: Iterable[signal.Signals] = (),
) -> list[str]:
    """`argv` (its first item an absolute path) started with the `RESET` signals at their
    default and no signal blocked, except those in `ignore` (of `RESET`) and `block`."""
    numbers = (_numbers(RESET), _numbers(ignore), _numbers(block))
    return [sys.executable, "-c", _SET_AND_EXEC, *numbers, *argv]


@contextmanager
def without_settings_variables() -> Iterator[None]:
    """This process's environment without the variables that change the tool's settings."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith(config.ENV_PREFIX) or name in config.GUIDE_ENV:
                patch.delenv(name)
        yield
