"""In-container background processes, and the entry point of the in-container program.

The host sends `agent.py` and then this file as the sources of one program (see
`agent.BOOTSTRAP`); `main()` here starts the agent, or, for a background
process, its keeper. Standard-library Python 3.11 only; in the sandbox the names imported
from `agent` below come from that file's source, run first in the same namespace.

A background process is run by its own keeper: a root process (the agent's
capabilities) started in a new session, outside every agent, so it outlives the host
process and the agent that started it. The keeper runs the command through the
`stigmer-exec` helper (the sandbox user, a subreaper that ends the whole tree), keeps its
output bounded (head and tail, like a command's), forwards what `Process.write` sends
through a FIFO to its stdin, and keeps a record in the root-only folder
`/run/stigmer/procs/<id>/` that any agent reads: so any host process can list, read,
wait for, write to and kill it for as long as the sandbox lives.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any

with contextlib.suppress(ImportError):  # in the sandbox: names from agent.py's source
    from .agent import (
        RUN_DIR,
        Agent,
        Message,
        backstop,
        oom_counter_files,
        oom_kills,
        read_status,
    )
    from .capture import OutputCapture, Process, Pump
    from .protocol import BACKSTOP_AFTER_S, EXEC_HELPER, KILL_GRACE_S, KILL_WAIT_S, oom_grew

PROCESS_DIR = RUN_DIR + "/procs"
PROCESS_ID_LENGTH = 12
# Records of ended processes kept for `output`/`wait` after they end; the oldest go first.
KEEP_ENDED = 16
# A keeper prunes only records that ended before it started, or this long ago: a record
# that just ended may not have been read by its `kill` or `wait` yet (25 kills at once lost
# the records of those past the 16th to each other's pruning).
RECENT_S = 60.0
ENDED_BYTES = 32 * 1024 * 1024
STATE_EVERY_S = 0.1
START_WAIT_S = 5.0
# `kill` looks for the final record this often (a stat) for KILL_FAST_S, then less often.
KILL_POLL_S = 0.00025
KILL_FAST_S = 0.1
KILL_POLL_MAX_S = 0.01
NO_DEADLINE_S = 10.0**9
# A keeper reads the program's sources from the root-only file the agent wrote.
KEEPER_BOOTSTRAP = (
    "# stigmer-sandbox keeper\n"
    "import sys, json\n"
    "STIGMER_SOURCES = json.load(open(sys.argv[3], encoding='utf-8'))\n"
    "for _source in STIGMER_SOURCES:\n"
    "    exec(_source)\n"
    "main()\n"
)


def process_folder(process_id: object) -> str:
    text = str(process_id)
    if len(text) != PROCESS_ID_LENGTH or not all(c in "0123456789abcdef" for c in text):
        raise ValueError(f"no background process {text[:40]!r}")
    return os.path.join(PROCESS_DIR, text)


def read_json(path: str) -> Message | None:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_json(path: str, value: Message) -> None:
    """Replace `path` atomically; no temporary file is left behind when it fails."""
    write_json_text(path, json.dumps(value, separators=(",", ":")))


def write_json_text(path: str, text: str) -> None:
    temporary = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def stream_record(capture: OutputCapture) -> Message:
    return {
        "head": base64.b64encode(bytes(capture.head)).decode(),
        "tail": base64.b64encode(bytes(capture.tail)).decode(),
        "dropped": capture.dropped,
        "total": capture.total,
    }


class Keeper:
    """Runs one background process and keeps its record up to date."""

    def __init__(self, folder: str, spec: Message) -> None:
        self.folder, self.spec = folder, spec
        limit = int(spec["limit"])
        self.captures = {"stdout": OutputCapture(limit), "stderr": OutputCapture(limit)}
        self.state: Message = {
            "id": spec["id"],
            "command": spec["command"],
            "cwd": spec["cwd"],
            "started_at": time.time(),
            "keeper_pid": os.getpid(),
            "running": True,
        }
        self.started = time.monotonic()
        self.done = threading.Event()
        # One writer at a time, and nothing after the final record (a late snapshot that
        # still says "running" must never replace it).
        self.record_lock = threading.Lock()
        self.final = False

    def run(self) -> None:
        fifo = os.path.join(self.folder, "stdin")
        os.mkfifo(fifo, 0o600)
        stdin_fd = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)  # never EOF: writers come and go
        status_read, status_write = os.pipe()
        oom_files = oom_counter_files()
        oom_before = oom_kills(oom_files)
        process = subprocess.Popen(
            self._helper_argv(status_write),
            env=self.spec["env"],
            cwd="/",
            pass_fds=[status_write],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        os.close(status_write)
        signal.signal(signal.SIGTERM, lambda *_: pass_on_term(process))
        self.state["pid"] = process.pid
        # The kernel may hand a process's signal to any thread that does not block it, and
        # only the main thread runs Python's handlers: the helper threads block SIGTERM.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=forward, args=(stdin_fd, process), daemon=True).start()
        recorder = threading.Thread(target=self._record_while_running, daemon=True)
        recorder.start()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        timeout = self.spec.get("timeout")
        Pump(
            process,
            captures=self.captures,
            live=lambda _name, _data: None,
            deadline=time.monotonic()
            + (float(timeout) + BACKSTOP_AFTER_S if timeout else NO_DEADLINE_S),
            expire=lambda: backstop(process),
            ended=lambda: None,
        ).run()
        status = read_status(status_read, process.returncode)
        self.done.set()
        recorder.join()
        self.state.update(
            running=False,
            exit_code=int(status["exit_code"]),
            signal=status.get("signal"),
            timed_out=bool(status.get("timed_out")),
            killed=bool(status.get("cancelled")),
            # The container's OOM counter grew while it ran (as for commands: a kill of any
            # process in the sandbox then, most often this one).
            oom_killed=oom_grew(oom_before, oom_kills(oom_files)),
            error=status.get("error"),
            duration_s=time.monotonic() - self.started,
            ended_at=time.time(),
        )
        self.record(final=True)
        # What is left (pruning old records, exiting) is nobody's answer: it yields the CPU
        # to what is, e.g. the next kill of a batch (pruning reads every record).
        with contextlib.suppress(OSError):
            os.nice(10)
        forget_old(since=self.state["started_at"])  # here: starting a process stays cheap

    def _helper_argv(self, status_fd: int) -> list[str]:
        spec = self.spec
        options = ["--uid", str(spec["uid"]), "--gid", str(spec["gid"])]
        options += ["--status-fd", str(status_fd), "--cwd", str(spec["cwd"]), "--watch-parent"]
        options += ["--kill-grace", repr(KILL_GRACE_S)]
        if spec.get("timeout"):
            options += ["--timeout", repr(float(spec["timeout"]))]
        return [EXEC_HELPER, *options, "--", *spec["argv"]]

    def _record_while_running(self) -> None:
        seen = -1
        while not self.done.wait(STATE_EVERY_S if seen >= 0 else 0):
            total = sum(capture.total for capture in self.captures.values())
            if total != seen:
                seen = total
                self.record()

    def record(self, final: bool = False) -> None:
        """Write the record; if the output does not fit (a full tmpfs), the record without
        it, so that the process's state is never frozen at an old one."""
        state = {**self.state, **{k: stream_record(c) for k, c in self.captures.items()}}
        path = os.path.join(self.folder, "state.json")
        with self.record_lock:
            if self.final:
                return
            self.final = final
            try:
                write_json(path, state)
            except OSError:
                with contextlib.suppress(OSError):
                    write_json(path, {**self.state, "output_lost": "no room to keep it"})


def pass_on_term(process: Process) -> None:
    """SIGTERM from `kill`: the helper ends the whole tree. Only a signal here (no thread,
    no lock in a signal handler); `kill` repeats it until the record says ended."""
    with contextlib.suppress(OSError):
        process.send_signal(signal.SIGTERM)


def forward(stdin_fd: int, process: Process) -> None:
    """What `Process.write` puts in the FIFO, to the command's stdin."""
    with contextlib.suppress(OSError, ValueError):
        while process.stdin is not None:
            data = os.read(stdin_fd, 65536)
            process.stdin.write(data)
            process.stdin.flush()


class ProcessTable:
    """The agent's side: start, list, read, kill and write to background processes."""

    def __init__(self, agent: Agent, sources: list[str]) -> None:
        self.agent, self.sources = agent, sources
        self.program: str | None = None
        self.launchers: list[Process] = []

    def operations(self) -> dict[str, Any]:
        return {
            "proc_start": self.start,
            "proc_list": self.listing,
            "proc_status": self.status,
            "proc_kill": self.kill,
            "proc_write": self.write,
        }

    def start(self, request: Message) -> Message:
        argv = request.get("argv")
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise ValueError("argv must be a non-empty list of strings")
        process_id = secrets.token_hex(PROCESS_ID_LENGTH // 2)
        folder = os.path.join(PROCESS_DIR, process_id)
        os.makedirs(folder, mode=0o700)
        spec = {
            "id": process_id,
            "argv": argv,
            "command": str(request.get("command") or " ".join(argv)),
            "env": {**self.agent.base_env, **(request.get("env") or {})},
            "cwd": str(request.get("cwd") or "/workspace"),
            "limit": int(request.get("limit") or 1048576),
            "timeout": request.get("timeout"),
            "uid": self.agent.uid,
            "gid": self.agent.gid,
        }
        try:
            write_json(os.path.join(folder, "spec.json"), spec)
            launcher = self._launch(process_id)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # no record of what never started
            raise
        # Reaped on a later start (it forks the keeper and exits at once): no thread here.
        self.launchers = [p for p in self.launchers if p.poll() is None] + [launcher]
        return {"id": process_id}

    def _launch(self, process_id: str) -> Process:
        folder = os.path.join(PROCESS_DIR, process_id)
        with open(os.path.join(folder, "keeper.log"), "wb") as log:
            return subprocess.Popen(
                [sys.executable, "-I", "-S", "-u", "-c", KEEPER_BOOTSTRAP, *self._args(process_id)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd="/",
                start_new_session=True,
            )

    def _args(self, process_id: str) -> list[str]:
        return ["keeper", process_id, self._program()]

    def _program(self) -> str:
        """The in-container program's sources, in a root-only file keepers read (written
        once per version)."""
        if self.program is None:
            text = json.dumps(self.sources)
            digest = hashlib.sha256(text.encode()).hexdigest()[:16]
            path = os.path.join(RUN_DIR, f"program-{digest}.json")
            if not os.path.exists(path):
                write_json_text(path, text)
            self.program = path
        return self.program

    def listing(self, _request: Message) -> Message:
        processes = []
        with contextlib.suppress(FileNotFoundError):
            for process_id in os.listdir(PROCESS_DIR):
                info = self._summary(process_id)
                if info is not None:
                    processes.append(info)
        processes.sort(key=lambda info: info.get("started_at") or 0)
        return {"processes": processes}

    def _summary(self, process_id: str) -> Message | None:
        state = current_record(os.path.join(PROCESS_DIR, process_id))
        if state is None:
            return None
        for name in ("stdout", "stderr"):
            stream = state.pop(name, None) or {}
            state[f"{name}_bytes"] = stream.get("total", 0)
        return state

    def status(self, request: Message) -> Message:
        state = current_record(process_folder(request.get("process")))
        if state is None:
            raise ValueError(f"no background process {request.get('process')}")
        return state

    def kill(self, request: Message) -> Message:
        """SIGTERM to the keeper (its helper ends the whole tree), then its final record."""
        folder = process_folder(request.get("process"))
        state = self._wait_started(folder)
        if not state.get("running"):
            return state
        keeper = KeeperHandle.open(int(state["keeper_pid"]), str(state["id"]), state.get("pid"))
        try:
            state = self._end(folder, state, keeper)
        finally:
            keeper.close()
        if state.get("running"):
            raise TimeoutError(f"background process {state['id']} did not end in {KILL_WAIT_S:g} s")
        return state

    @staticmethod
    def _end(folder: str, state: Message, keeper: KeeperHandle) -> Message:
        """Signal the keeper until its record says it ended (or KILL_WAIT_S passes). The
        record is re-read only when its file was replaced or the keeper exited: a stat every
        quarter millisecond answers a kill within ~0.25 ms of the final record."""
        path = os.path.join(folder, "state.json")
        started = time.monotonic()
        deadline = started + KILL_WAIT_S
        next_signal = 0.0
        seen = file_identity(path)
        while state.get("running") and time.monotonic() < deadline:
            if time.monotonic() >= next_signal:
                keeper.terminate()  # again every half second: never lost
                next_signal = time.monotonic() + 0.5
            # Most kills end within a few ms: look often at first, then back off.
            fast = time.monotonic() - started < KILL_FAST_S
            gone = keeper.wait(KILL_POLL_S if fast else KILL_POLL_MAX_S)
            identity = file_identity(path)
            if gone or identity != seen:
                seen = identity
                state = current_record(folder) or {**state, "running": False, "exit_code": None}
        return state

    def write(self, request: Message) -> Message:
        folder = process_folder(request.get("process"))
        state = self._wait_started(folder)
        if not state.get("running"):
            raise ValueError(f"background process {state['id']} has ended")
        data = base64.b64decode(str(request.get("data") or ""), validate=True)
        fd = os.open(os.path.join(folder, "stdin"), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            written = os.write(fd, data) if data else 0
        except BlockingIOError:
            written = 0
        finally:
            os.close(fd)
        return {"written": written}

    @staticmethod
    def _wait_started(folder: str) -> Message:
        """The record once the keeper wrote it (or it settled as never started)."""
        while True:
            state = current_record(folder)
            if state is None:
                raise ValueError(f"no background process {os.path.basename(folder)}")
            if not state.get("starting") or not state.get("running"):
                return state
            time.sleep(0.002)


class KeeperHandle:
    """A keeper to signal and wait for, by pidfd where the kernel has them: the pid is
    checked once to be that process's keeper, and a recycled pid is never signalled.
    Its helper (which ends the tree on SIGTERM) is signalled directly as well, checked
    the same way to be the keeper's child: the keeper's own handler only passes the
    signal on, a hop of a Python signal handler on a kill's path."""

    def __init__(self, pid: int, process_id: str, pidfd: int | None) -> None:
        self.pid, self.process_id, self.pidfd = pid, process_id, pidfd
        self.helper_pidfd: int | None = None

    @classmethod
    def open(cls, pid: int, process_id: str, helper_pid: object = None) -> KeeperHandle:
        pidfd = None
        with contextlib.suppress(AttributeError, OSError):
            pidfd = os.pidfd_open(pid)
        if pidfd is not None and not is_keeper(pid, process_id):  # checked after the open
            os.close(pidfd)
            return cls(pid, process_id, -1)  # not (or no longer) the keeper: never signalled
        handle = cls(pid, process_id, pidfd)
        if pidfd is not None and isinstance(helper_pid, int) and helper_pid > 0:
            handle.helper_pidfd = helper_of(pid, helper_pid)
        return handle

    def terminate(self) -> None:
        """SIGTERM to the keeper's helper and to the keeper, if they are still there."""
        if self.pidfd == -1:
            return
        for pidfd in (self.helper_pidfd, self.pidfd):
            if pidfd is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        if self.pidfd is None and is_keeper(self.pid, self.process_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)

    def wait(self, seconds: float) -> bool:
        """Wait up to `seconds`; whether the keeper is known to have exited."""
        if self.pidfd is None or self.pidfd == -1:
            time.sleep(seconds)
            return self.pidfd == -1
        ready, _, _ = select.select([self.pidfd], [], [], seconds)
        return bool(ready)

    def close(self) -> None:
        for pidfd in (self.pidfd, self.helper_pidfd):
            if pidfd is not None and pidfd >= 0:
                os.close(pidfd)


def helper_of(keeper_pid: int, pid: int) -> int | None:
    """A pidfd of `pid` if it is the keeper's helper (its child, running the helper as
    root), checked after the pidfd was opened; else None."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            parent = int(handle.read().rpartition(b")")[2].split()[1])
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            program = handle.read().split(b"\0", 1)[0]
        with open(f"/proc/{pid}/status") as handle:
            uid = next(line for line in handle if line.startswith("Uid:")).split()[1]
    except (OSError, ValueError, IndexError, StopIteration):
        parent, program, uid = 0, b"", ""
    if parent == keeper_pid and program == EXEC_HELPER.encode() and uid == "0":
        return pidfd
    os.close(pidfd)
    return None


def file_identity(path: str) -> tuple[int, int, int] | None:
    """What changes when a file is replaced or rewritten (None: it is not there)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


def forget_old(since: float, now: float | None = None) -> None:
    """Keep the newest ended records within KEEP_ENDED and ENDED_BYTES; remove the rest,
    except those that ended after `since` (this keeper's start) less than RECENT_S ago."""
    now = time.time() if now is None else now
    ended = []
    with contextlib.suppress(FileNotFoundError):
        for process_id in os.listdir(PROCESS_DIR):
            state = current_record(os.path.join(PROCESS_DIR, process_id))
            if state is not None and not state.get("running"):  # the latest ended stay
                ended.append((state.get("ended_at") or state.get("started_at") or 0, process_id))
    kept_bytes = 0
    for count, (ended_at, process_id) in enumerate(sorted(ended, reverse=True)):
        folder = os.path.join(PROCESS_DIR, process_id)
        with contextlib.suppress(OSError):
            kept_bytes += os.path.getsize(os.path.join(folder, "state.json"))
        fresh = ended_at >= since and now - ended_at < RECENT_S
        if not fresh and (count >= KEEP_ENDED or kept_bytes > ENDED_BYTES):
            shutil.rmtree(folder, ignore_errors=True)


def current_record(folder: str) -> Message | None:
    """A process's record, settled: a keeper that is gone without writing its final record
    (killed, out of memory) or one that never started is reported ended with no exit code,
    never "running" for ever. None when there is no such process."""
    state = read_json(os.path.join(folder, "state.json"))
    if state is None:
        spec = read_json(os.path.join(folder, "spec.json"))
        if spec is None:
            return None
        state = {"id": spec["id"], "command": spec["command"], "cwd": spec["cwd"]}
        state.update(running=True, starting=True)
        with contextlib.suppress(OSError):
            if time.time() - os.path.getmtime(os.path.join(folder, "spec.json")) > START_WAIT_S:
                state.update(running=False, exit_code=None, error="it never started")
        return state
    if state.get("running") and not is_keeper(int(state.get("keeper_pid") or 0), state["id"]):
        state.update(running=False, exit_code=None, error="its keeper ended without a result")
    return state


def is_keeper(pid: int, process_id: str) -> bool:
    """Whether `pid` is still the root keeper of `process_id` (not a recycled pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
        with open(f"/proc/{pid}/status") as handle:
            uid_line = next(line for line in handle if line.startswith("Uid:"))
    except (OSError, StopIteration):
        return False
    wanted = (b"keeper", process_id.encode())
    mine = any(pair == wanted for pair in itertools.pairwise(argv))
    return mine and uid_line.split()[1] == "0"


def run_keeper(process_id: str) -> None:
    """The keeper's process: detach from the agent (a fork whose parent exits, so init
    reaps it), then run the process."""
    if os.fork():
        os._exit(0)
    folder = process_folder(process_id)
    spec = read_json(os.path.join(folder, "spec.json"))
    if spec is None:
        sys.exit(f"keeper: no spec in {folder}")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    Keeper(folder, spec).run()


def main() -> None:
    """`keeper ID` for a background process's keeper; `UID GID` for the agent."""
    if sys.argv[1] == "keeper":
        run_keeper(sys.argv[2])
        return
    uid, gid = (int(value) for value in sys.argv[1:3])
    os.chdir("/")  # its warm helpers inherit it (see start_warm); each command names its own
    agent = Agent(sys.stdout.buffer, uid, gid)
    table = ProcessTable(agent, list(globals().get("STIGMER_SOURCES") or []))
    agent.operations.update(table.operations())
    agent.serve(sys.stdin.buffer)
