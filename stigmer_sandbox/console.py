"""The one place that prints: coloured status lines, tables, JSON.

Colour is on only when the stream is a terminal and neither `NO_COLOR` is set
nor `TERM=dumb`; `FORCE_COLOR` turns it on regardless (CI logs that render ANSI).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO

from colorama import Fore, Style

from . import checks
from .checks import CheckResult

_STYLES = {
    "info": Fore.CYAN,
    "success": Fore.GREEN,
    "warning": Fore.YELLOW,
    "error": Fore.RED,
    "dim": Style.DIM,
    "bold": Style.BRIGHT,
}
_MARKS: dict[str, tuple[str, str]] = {
    "pass": ("✓", "success"),
    "warn": ("!", "warning"),
    "fail": ("✗", "error"),
}
# What a terminal acts on instead of showing: C0 and C1 controls and DEL (cursor moves, line
# erasure, title and clipboard sequences) and the bidi controls that reorder a line. A
# sandbox's command chooses the text of its audit entries, its process list and its egress
# records' names: shown raw, `\r` and an erased line would hide it behind a made-up one.
_ACTING = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# Tables on a terminal: two spaces between columns; no cell cut below this width.
COLUMN_GAP = 2
MIN_CELL = 8


def is_terminal(stream: TextIO) -> bool:
    """Whether `stream` is an interactive terminal (not a file, pipe or capture)."""
    return bool(getattr(stream, "isatty", lambda: False)())


def colour_enabled(stream: TextIO) -> bool:
    """Whether ANSI colour should be written to `stream`."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    if os.environ.get("TERM") == "dumb":
        return False
    return is_terminal(stream)


def paint(text: str, style: str, stream: TextIO | None = None) -> str:
    """`text` wrapped in the ANSI codes of `style`, if colour is enabled for `stream`."""
    if not colour_enabled(stream or sys.stdout):
        return text
    return f"{_STYLES[style]}{text}{Style.RESET_ALL}"


def visible(text: str) -> str:
    """`text` with every character a terminal would act on written as its escape (`\\x1b`,
    `\\r`, `\\u202e`): what was recorded is what is seen."""
    return _ACTING.sub(lambda found: found.group().encode("unicode_escape").decode(), text)


def _emit(text: str, style: str, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    print(paint(text, style, stream), file=stream, flush=True)


def info(text: str) -> None:
    """A neutral progress line."""
    _emit(text, "info")


def success(text: str) -> None:
    """A line saying something worked."""
    _emit(text, "success")


def warning(text: str) -> None:
    """A line that needs attention but does not stop the work (to stderr)."""
    _emit(f"warning: {text}", "warning", err=True)


def error_line(message: str, hint: str | None = None) -> str:
    """The one-line error shown to a person, with its fix when known."""
    line = f"error: {visible(message)}"
    if hint:
        line += f" — {visible(hint)}"
    return paint(line, "error", sys.stderr)


def error_report(
    message: str, hint: str | None = None, details: Sequence[str] = ()
) -> dict[str, Any]:
    """The error as the one JSON object a `--json` caller reads instead of a line."""
    report: dict[str, Any] = {"error": message}
    if hint:
        report["hint"] = hint
    if details:
        report["details"] = list(details)
    return report


def wants_json(argv: Sequence[str]) -> bool:
    """Whether a command line asks for JSON output (`--json` before any `--`)."""
    options = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in options


def detail(text: str) -> None:
    """A line of context for an error (e.g. build log), dimmed, on stderr."""
    _emit(f"  | {visible(text)}", "dim", err=True)


def plain(text: str = "") -> None:
    """An unstyled line on stdout."""
    print(text, flush=True)


def echo_command(argv: Sequence[str]) -> None:
    """Show the exact command about to run, so users can run it themselves."""
    _emit("$ " + shlex.join(argv), "dim")


def check_line(result: CheckResult) -> None:
    """One check as a line: mark, SECURITY.md item, name, detail, time, and the fix."""
    mark, style = _MARKS[result.status]
    item = "" if result.item is None else f"{result.item:>2} "
    line = f"{paint(mark, style)} {item}{result.name}: {visible(result.detail)}"
    if result.seconds is not None:
        line += f"  ({result.seconds:.2f}s)"
    if result.hint and not result.passed:
        line += paint(f"  → {result.hint}", "dim")
    plain(line)


def show_checks(results: Sequence[CheckResult], as_json: bool, **context: Any) -> bool:
    """Print `results` as lines and a summary, or as the one JSON report; True when ok."""
    report = checks.report(results, **context)
    if as_json:
        emit_json(report)
    else:
        for result in results:
            check_line(result)
        plain(checks.summary(results))
    return bool(report["ok"])


def confirm(question: str) -> None:
    """Ask before something destructive; raises `UsageError` unless the answer is yes."""
    from .errors import UsageError

    if not sys.stdin.isatty():
        raise UsageError(f"{question} needs a confirmation", "pass --yes to confirm")
    answer = input(paint(f"{question} [y/N] ", "warning"))
    if answer.strip().lower() not in ("y", "yes"):
        raise UsageError("aborted; nothing was changed")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A left-aligned text table; on a terminal, the widest cells are cut to fit it.

    Output to a file or a pipe keeps every cell whole: logs are read for the cut part.
    Cells are shown `visible`: their text may come from a sandbox's commands.
    """
    body = [[visible(str(cell)) for cell in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]
    if is_terminal(sys.stdout):
        widths = fit_widths(widths, shutil.get_terminal_size((100, 20)).columns - 1)
    plain(paint(_table_line(headers, widths), "bold"))
    for row in body:
        plain(_table_line(row, widths))


def listing(
    items: Sequence[Any],
    as_json: bool,
    empty: str,
    headers: Sequence[str],
    row: Callable[[Any], Sequence[Any]],
) -> None:
    """A list as JSON, or as a table of `row(item)`, or the `empty` hint when there is none."""
    if as_json:
        emit_json(items)
    elif not items:
        info(empty)
    else:
        table(headers, [row(item) for item in items])


def fit_widths(widths: Sequence[int], limit: int) -> list[int]:
    """Column widths whose line fits `limit` characters, narrowing the widest first."""
    fitted = list(widths)
    excess = sum(fitted) + COLUMN_GAP * (len(fitted) - 1) - limit
    while excess > 0:
        widest = max(range(len(fitted)), key=fitted.__getitem__)
        if fitted[widest] <= MIN_CELL:
            break  # a line wraps rather than become unreadable
        fitted[widest] -= 1
        excess -= 1
    return fitted


def _table_line(cells: Sequence[str], widths: Sequence[int]) -> str:
    fitted = [c if len(c) <= w else c[: w - 1] + "…" for c, w in zip(cells, widths, strict=True)]
    return (" " * COLUMN_GAP).join(c.ljust(w) for c, w in zip(fitted, widths, strict=True)).rstrip()


def bar(fraction: float, width: int = 30) -> str:
    """A proportional bar of `width` characters."""
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "█" * filled + "·" * (width - filled)


def emit_json(data: Any) -> None:
    """Machine-readable output: one JSON document on stdout (a reader that stops early,
    like `| head`, ends it quietly, not with a traceback)."""
    try:
        print(json.dumps(data, indent=2, sort_keys=True, default=str), flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's exit-time flush must not fail again
        raise SystemExit(1) from None


def human_bytes(n: float) -> str:
    """Decimal units, as `docker images` shows sizes."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class Progress:
    """Progress of long work: one live line on a terminal, sparse lines otherwise.

    On a terminal the line is rewritten in place with the elapsed time; when
    output is piped only phase changes are printed, so CI logs stay readable.
    """

    def __init__(self, title: str, stream: TextIO | None = None) -> None:
        self.title = title
        self.stream = stream or sys.stdout
        self.live = is_terminal(self.stream)
        self.started = time.monotonic()
        self.phase = ""

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def update(self, text: str, phase: str | None = None) -> None:
        """Show `text`; when not live, print only when `phase` changes."""
        if self.live:
            line = f"{self.title} [{self.elapsed:5.1f}s] {text}"
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r\x1b[2K" + paint(line[:width], "dim", self.stream))
            self.stream.flush()
        elif phase is not None and phase != self.phase:
            print(f"{self.title}: {phase}", file=self.stream, flush=True)
        if phase is not None:
            self.phase = phase

    def finish(self) -> None:
        """Clear the live line."""
        if self.live:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()


class StepView:
    """A multi-step job (an image build) as a person or a log wants to see it.

    Live (a terminal, progress `auto`): one line per finished step with its
    time, and a rewritten line showing what the current step prints. Plain:
    every raw line, as the builder prints it.
    """

    def __init__(self, title: str, plain_output: bool) -> None:
        self.progress = Progress(title)
        self.live = self.progress.live and not plain_output
        self.current: tuple[int, int, str] | None = None
        self.step_started = time.monotonic()
        self.cached = False

    def note(self, text: str) -> None:
        self.progress.finish()
        info(text)

    def step(self, number: int, total: int, instruction: str) -> None:
        self._close_step()
        self.current, self.step_started, self.cached = (
            (number, total, instruction),
            time.monotonic(),
            False,
        )
        if self.live:
            self.progress.update(f"step {number}/{total}: {instruction}")
        else:
            plain(f"Step {number}/{total} : {instruction}")

    def line(self, text: str) -> None:
        self.cached = self.cached or "Using cache" in text
        if self.live:
            where = f"step {self.current[0]}/{self.current[1]}: " if self.current else ""
            self.progress.update(where + text.strip())
        else:
            plain(text)

    def _close_step(self) -> None:
        if self.live and self.current:
            number, total, instruction = self.current
            took = time.monotonic() - self.step_started
            self.progress.finish()
            state = "cached" if self.cached else f"{took:.1f}s"
            plain(paint(f"  [{number}/{total}] {instruction[:90]}  ({state})", "dim"))

    def finish(self) -> None:
        self._close_step()
        self.progress.finish()


# A command exits with this when its result was lost with the sandbox agent.
LOST_EXIT = 255


def command_result(result: dict[str, Any], json: bool) -> int:
    """The end of a command (`inv run`, `compose.exec`, the warm `stigmer-sandbox run`):
    the JSON result or a warning for an unusual end; the exit code to leave with."""
    cause, code = result.get("cause"), result.get("exit_code")
    if json:
        emit_json(result)
    elif cause == "lost":
        warning(f"the command's result was lost: {result.get('error')}")
    elif cause != "exit":
        warning(f"command ended by {cause} (exit {code})")
    return LOST_EXIT if code is None else int(code)
