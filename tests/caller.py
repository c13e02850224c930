"""Start a child with the signal dispositions a test chooses, not the ones its caller left.

Ignored and blocked signals survive fork and exec: run from a background job of a script
(where the shell ignores SIGINT and SIGQUIT) or under a supervisor, a child that a test
means to Ctrl-C would ignore it. `with_signals` starts the child through a small Python
that sets them first, so a test sees the same thing from any caller, and can also play
the caller that ignores or blocks them.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterable, Sequence

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
