"""`execution_mode: local`: commands on this host, with no isolation at all.

`LocalSandbox` has the same `exec` signature and result as the Docker `Sandbox`, so an
agent runner switches between them by configuration. Commands run in the host
workspace folder; a timeout or the command's end kills its process group and every
process that carries its token in the environment (a host has no subreaper to spare:
this is the guide's local mode, not a security boundary). `open_sandbox` picks the
kind of sandbox the settings ask for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, Unpack

from .. import engine
from ..config import Settings, load_settings
from ..errors import SandboxError
from .client.commands import ExecOptions, ExecResult, RawResult, Request, audit_entry
from .client.files import TRANSFER_TIMEOUT_S, FileTransfers
from .client.history import AuditLog
from .guest import BATCH_SOURCE, capture, protocol
from .sandbox import Sandbox

TOKEN_VAR = "STIGMER_EXEC_TOKEN"
KILL_DEADLINE_S = 10.0
# Signals a command expects at their default. A caller that ignores them (a shell's
# background job ignores INT and QUIT; `nohup` ignores HUP) passes that on through exec,
# so `kill -TERM $$` would not end the command: such a caller's commands start through a
# tiny Python step that sets them back.
DEFAULT_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP)
RESET_AND_EXEC = (
    "import os, signal, sys\n"
    "for number in sys.argv[1].split(','):\n"
    "    signal.signal(int(number), signal.SIG_DFL)\n"
    "try:\n"
    "    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "except OSError as exc:\n"
    "    sys.stderr.write(f'{sys.argv[2]}: {exc.strerror}\\n')\n"
    "    sys.exit(127 if isinstance(exc, FileNotFoundError) else 126)\n"
)


def processes_with_token(token: str) -> list[int]:
    """Pids of every process whose environment carries `token` (setsid cannot hide them)."""
    marker = f"{TOKEN_VAR}={token}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:
                if marker in handle.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue
    return found


def kill_tree(process: subprocess.Popen[bytes], token: str) -> None:
    """Kill the command's process group and everything else carrying its token; each
    round freezes them all (SIGSTOP) before killing, so a fork loop converges."""
    with contextlib.suppress(OSError):
        os.killpg(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_DEADLINE_S
    while time.monotonic() < deadline and (pids := processes_with_token(token)):
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)


def with_default_signals(argv: list[str]) -> list[str]:
    """`argv`, started so that every signal of DEFAULT_SIGNALS is at its default."""
    ignored = [sig for sig in DEFAULT_SIGNALS if signal.getsignal(sig) is signal.SIG_IGN]
    if not ignored:
        return argv
    numbers = ",".join(str(int(sig)) for sig in ignored)
    return [sys.executable, "-I", "-S", "-c", RESET_AND_EXEC, numbers, *argv]


def run_on_host(request: Request) -> RawResult:
    """Run one request as a host process with the sandbox's timeout, caps and causes."""
    token = f"{os.getpid()}.{request.cid}.{time.monotonic_ns()}"
    env = {**os.environ, **request.env, TOKEN_VAR: token}
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            with_default_signals(request.argv),
            cwd=request.cwd,
            env=env,
            start_new_session=True,
            stdin=subprocess.PIPE if request.stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if request.merge_output else subprocess.PIPE,
        )
    except OSError as exc:
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        text = f"{request.argv[0]}: {exc.strerror}\n".encode()
        return RawResult(code, None, False, False, 0.0, b"", text, {"stderr": len(text)})
    if request.stdin is not None and process.stdin is not None:
        capture.feed(process.stdin, request.stdin)
    captures = {name: capture.OutputCapture(request.limit) for name in ("stdout", "stderr")}

    def live(name: str, data: bytes) -> None:
        callback = request.callback(name)
        if callback:
            callback(data)

    def ended() -> None:
        if not request.keep_background:
            kill_tree(process, token)

    pump = capture.Pump(
        process,
        captures=captures,
        live=live,
        deadline=started + request.timeout_s,
        expire=lambda: kill_tree(process, token),
        ended=ended,
    )
    pump.run()
    return _host_result(request, process.returncode, pump.expired, captures, started)


def _host_result(
    request: Request,
    returncode: int | None,
    timed_out: bool,
    captures: dict[str, capture.OutputCapture],
    started: float,
) -> RawResult:
    code = returncode if returncode is not None else -signal.SIGKILL
    signal_number = -code if code < 0 and not timed_out else None
    exit_code = protocol.TIMEOUT_EXIT if timed_out else (128 - code if code < 0 else code)
    streams = {name: capture.text() for name, capture in captures.items()}
    for name, text in streams.items():
        head, callback = captures[name].head, request.callback(name)
        if callback and len(text) > len(head):
            callback(text[len(head) :])
    return RawResult(
        exit_code,
        signal_number,
        timed_out,
        False,
        time.monotonic() - started,
        streams["stdout"],
        streams["stderr"],
        {k: c.total for k, c in captures.items()},
        {k: c.dropped > 0 for k, c in captures.items()},
        via="local",
    )


class LocalSandbox(FileTransfers):
    """Commands on this host (`execution_mode: local`), with `Sandbox.exec`'s signature."""

    name = "local"

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or load_settings()
        self.workspace = self.settings.path("workspace")
        self.workspace_root = str(self.workspace)
        self.audit = AuditLog(self.settings.path("state_dir") / "audit.jsonl")
        self.notes: list[str] = []

    def up(self, timeout: float = 0.0) -> LocalSandbox:
        """Create the workspace folder; there is nothing else to start."""
        self.workspace.mkdir(parents=True, exist_ok=True)
        return self

    def exec(self, command: str | Sequence[str], **options: Unpack[ExecOptions]) -> ExecResult:
        """Run a command on this host in the workspace folder (see `Sandbox.exec`)."""
        self.up()
        request = Request.build(self.settings, command, options, home=str(self.workspace))
        return self._execute(request)[1]

    def _execute(self, request: Request) -> tuple[RawResult, ExecResult]:
        raw = run_on_host(request)
        result = ExecResult.from_raw(raw, request.cid)
        self.audit.record(audit_entry(self.name, request, result))
        return raw, result

    def _run_batch(self, argv: list[str], stdin: bytes, output_limit: int) -> RawResult:
        self.up()
        command = [sys.executable, "-I", "-S", "-c", BATCH_SOURCE, *argv]
        options: ExecOptions = {"timeout": TRANSFER_TIMEOUT_S}
        options["stdin"], options["output_limit"] = stdin, output_limit
        options["cwd"] = str(self.workspace)
        request = Request.build(self.settings, command, options)
        return self._execute(dataclasses.replace(request, shown=f"(file transfer: {argv[0]})"))[0]

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> LocalSandbox:
        return self.up()

    def __exit__(self, *_exc: object) -> None:
        self.close()


def open_sandbox(
    settings: Settings | None = None, *, ephemeral: bool = False, **kwargs: Any
) -> Sandbox | LocalSandbox:
    """The sandbox `execution_mode` asks for: `sandbox`, `local`, or `auto` (a sandbox when
    an engine answers and the image exists, else local; a note says which and why).
    `ephemeral` gives a uniquely named sandbox, removed when its `with` block ends."""
    current = settings or load_settings()
    mode, why = current.execution_mode, ""
    if mode == "auto":
        mode, why = _auto_mode(current)
    chosen: Sandbox | LocalSandbox
    if mode == "local":
        chosen = LocalSandbox(current)
    elif ephemeral:
        chosen = Sandbox.create_ephemeral(current, **kwargs)
    else:
        chosen = Sandbox(current, **kwargs)
    if why:
        chosen.notes.append(f"execution mode auto: {mode} ({why})")
    return chosen


def _auto_mode(settings: Settings) -> tuple[str, str]:
    try:
        if engine.image_id(settings.image) is None:
            return "local", f"the image {settings.image} does not exist"
    except SandboxError as exc:
        return "local", exc.message
    return "sandbox", f"the engine answers and {settings.image} exists"
