"""`sandbox.ps`, `sandbox.kill`, `sandbox.output`: background processes of the sandbox
(started with `inv run --background` or `Sandbox.start`), from any shell."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING

from invoke import Context, Exit

from .. import console
from ..errors import UsageError
from ._common import sandbox_for, task

if TYPE_CHECKING:
    from ..runtime.client.processes import StreamBytes

FOLLOW_POLL_S = 0.2
PROCESS_ID_HELP = "the id `inv run --background` printed, see inv sandbox.ps (required, no default)"


def _age(started_at: object) -> str:
    if not isinstance(started_at, int | float):
        return "-"
    return datetime.fromtimestamp(started_at).strftime("%H:%M:%S")


def _state(info: dict[str, object]) -> str:
    if info.get("running"):
        return "starting" if info.get("starting") else "running"
    return "killed" if info.get("killed") else f"exit {info.get('exit_code')}"


@task(help={"json": "print the processes as JSON (default: off)"})
def ps(c: Context, json: bool = False) -> None:
    """List the sandbox's background processes, running and recently ended."""
    console.listing(
        sandbox_for(c).processes(),
        json,
        'no background processes (start one: inv run --background "CMD")',
        ("id", "state", "started", "stdout bytes", "command"),
        lambda p: (
            p.get("id"),
            _state(p),
            _age(p.get("started_at")),
            p.get("stdout_bytes"),
            p.get("command"),
        ),
    )


@task(
    help={
        "process_id": PROCESS_ID_HELP,
        "json": "print the final result as JSON (default: off)",
    }
)
def kill(c: Context, process_id: str, json: bool = False) -> None:
    """End a background process and everything it started."""
    result = sandbox_for(c).process(process_id).kill()
    if json:
        console.emit_json(result.to_dict())
        return
    console.success(f"{process_id} ended ({result.cause}, exit {result.exit_code})")


@task(
    help={
        "process_id": PROCESS_ID_HELP,
        "follow": "keep printing new output until the process ends (default: off)",
        "json": "print the output and the process's state as JSON (default: off)",
    }
)
def output(c: Context, process_id: str, follow: bool = False, json: bool = False) -> None:
    """Print a background process's output (head and tail when it printed a lot)."""
    if follow and json:
        raise UsageError("--follow streams text; it cannot be combined with --json")
    process = sandbox_for(c).process(process_id)
    if json:
        state = process.status()
        console.emit_json({**state, **vars(process.output_from(state))})
        return
    shown = {"stdout": 0, "stderr": 0}
    while True:
        state = process.status()  # one record per poll: its state and its output
        _print_new(process.output_bytes_from(state), shown)
        if not follow or not state.get("running"):
            break
        time.sleep(FOLLOW_POLL_S)
    if not state.get("running") and state.get("exit_code"):
        raise Exit(code=int(state["exit_code"]))


def _print_new(kept: dict[str, StreamBytes], shown: dict[str, int]) -> None:
    """Write each stream's bytes from the byte offset written up to, exactly as printed
    (bytes that are not UTF-8, a character split across polls). Output is kept as head and
    tail: when bytes between were dropped, say how many."""
    for name, stream in (("stdout", sys.stdout), ("stderr", sys.stderr)):
        data, gone = kept[name].since(shown[name])
        if gone:
            console.warning(f"{name}: {gone} bytes were dropped here (more than are kept)")
        stream.buffer.write(data)
        stream.buffer.flush()
        shown[name] = max(shown[name], kept[name].total)


TASKS = (ps, kill, output)
