"""In-container command agent: runs the host's commands over one attached exec stream.

The host sends the sources of deadlines.py (the deadline budget), shell_state.py
(sessions), this file and keeper.py (background processes and the entry point) as the
first line on the agent's stdin and
starts it as
`/usr/bin/python3 -I -S -u -c <BOOTSTRAP> UID GID` (absolute path, isolated mode, no
site: nothing the sandbox user can write is imported). It must stay standard-library
Python 3.11 with no imports from the package. The host imports `OutputCapture`,
`exit_cause`, `Pump` and `oom_kills` from it too, so both sides cap output and classify
exits the same way.

Privilege separation: the agent runs as uid 0 holding only CAP_SETUID, CAP_SETGID and
CAP_KILL. Each command runs through the root-owned `stigmer-exec` helper, which becomes
the command's subreaper, switches it to the sandbox user (no capabilities) and kills
every process the command started when it ends, times out or the agent dies. A command
can therefore neither signal, trace nor read the agent or its helper, nor write into
their pipes: nothing it does reaches the stream the host reads.

Protocol: JSON lines. The host writes requests to the agent's stdin:
  {"op": "exec", "id": 7, "cid": "ab12", "argv": [...], "env": {...}, "cwd": "/workspace",
   "timeout": 600, "limit": 1048576, "stdin": "<base64>" | null, "keep_background": false,
   "merge_output": false, "idle_timeout": null, "session": null}
      (merge_output: stderr goes to stdout, in the order written; session: run it in that
      named shell session, see shell_state.py)
  {"op": "ping", "id": 8}
  {"op": "cancel", "id": 9, "cid": "ab12"}     (end a command, or never start it)
  {"op": "session_close", "id": 10, "session": "build"}
  {"op": "proc_start" | "proc_list" | "proc_status" | "proc_kill" | "proc_write", ...}
      (background processes, see keeper.py)
The agent answers on stdout:
  {"id": 7, "type": "out", "stream": "stdout", "data": "<base64>"}   (live, head only)
  {"id": 7, "type": "tail", "stream": "stdout", "data": "<base64>"}  (after the end, in
      pieces of at most TAIL_PIECE bytes, so that no answer waits behind a big one)
  {"id": 7, "type": "done", "exit_code": 0, "signal": null, "timed_out": false,
   "oom_killed": false, "oom_overlap": [], "duration_s": 0.01, "error": null,
   "stdout": {"tail": "", "dropped": 0, "total": 12}, "stderr": {...}}
  {"id": 8, "type": "pong", "pid": 42}
  {"id": 0, "type": "beat"}          (every second: the host judges liveness by it)
  {"id": 7, "type": "error", "message": "..."}   (this request alone could not run)
  {"id": 9, "type": "reply", "data": {...}}      (the answer to any other operation)
A `done` message may also carry "idle_timed_out": true (exit code 124, cause idle).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import os
import pwd
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from typing import IO, Any, BinaryIO, NamedTuple

with contextlib.suppress(ImportError):  # in the sandbox: these sources run first
    from .capture import READ_CHUNK, OutputCapture, Process, Pump, feed
    from .protocol import (
        BACKSTOP_AFTER_S,
        BACKSTOP_WAIT_S,
        EXEC_HELPER,
        HEARTBEAT_S,
        KILL_GRACE_S,
        TIMEOUT_EXIT,
        oom_grew,
    )
    from .shell_state import STATE_LIMIT, SessionState

Message = dict[str, Any]

# A command's kept tail travels in pieces this big (the size of a live output frame), each
# its own frame: the writer takes turns between requests one frame at a time, so another
# command's answer waits for at most one frame of each busy command (one 32 MiB frame
# held every other command back for seconds; 1 MiB pieces still cost ~300 ms with four).
TAIL_PIECE = READ_CHUNK
# Linux refuses any single argument over 128 KiB (MAX_ARG_STRLEN); stay well below.
MAX_INLINE_ARG = 100_000
OOM_FILES = ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control")
# Root-only tmpfs (see policy): session state and background processes live here, for as
# long as the sandbox does, reachable from every agent.
RUN_DIR = "/run/stigmer"
# Where a command runs unless told otherwise (the shell a warm helper prestarts is there).
DEFAULT_CWD = "/workspace"
# The bash copy a warm helper prestarts (stigmer-exec.c SHELL_PATH; older images lack it).
PRESTART_SHELL = "/usr/local/libexec/stigmer-sandbox/bash"
# The longest script a prestarted shell takes (stigmer-exec.c SHELL_SCRIPT_LIMIT).
PRESTART_SCRIPT_LIMIT = 1024
# Held while a warm helper's two pipe ends are inheritable: each pool has its own thread,
# and a helper started by one in that moment kept the other's status pipe open (its
# command's answer then never came: the agent waits for that pipe's end).
WARM_START = threading.Lock()
OPERATIONS = frozenset(
    {"ping", "exec", "cancel", "session_close", "proc_start", "proc_list", "proc_status"}
    | {"proc_kill", "proc_write"}
)


def oom_kills(paths: Iterable[str] = OOM_FILES) -> int | None:
    """The container's OOM-kill counter (cgroup v2 or v1), or None."""
    for path in paths:
        try:
            with open(path) as handle:
                for line in handle:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def oom_counter_files() -> tuple[str, ...]:
    """The OOM counter files this cgroup has (looked up once, read for every command)."""
    return tuple(path for path in OOM_FILES if os.path.exists(path))


class OomCounter:
    """The container's OOM-kill counter, its file kept open: a command reads it twice, and
    `pread` of an open cgroup file costs ~1 us where open+read+close costs ~14 us."""

    def __init__(self, paths: Iterable[str] = OOM_FILES) -> None:
        self.fd: int | None = None
        for path in paths:
            with contextlib.suppress(OSError):
                self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                break

    def read(self) -> int | None:
        """The counter now, or None (no counter file, or it cannot be read)."""
        if self.fd is None:
            return None
        try:
            text = os.pread(self.fd, 4096, 0).decode("ascii")
        except (OSError, UnicodeDecodeError):
            return None
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                with contextlib.suppress(ValueError):
                    return int(value)
        return None


class SessionPipes(NamedTuple):
    """A session command's extra descriptors: its state comes back on a pipe, the prelude
    it sources is read from a file (`readable_file`)."""

    state_read: int
    state_write: int
    prelude: int


class Outbox:
    """The agent's one writer to the host, taking answers in turns: one frame of each
    request that has something to send, then again. A small command's answer therefore
    never waits behind another's 64 MiB (only behind one frame of it), frames of one
    request keep their order, and a request with `BACKLOG` frames waiting blocks its
    producer (the command's pipe then fills and the command waits: flow control).
    When nothing waits and nobody writes, the producer writes its frame itself: a quiet
    agent's answer does not wait for the writer thread to be scheduled."""

    BACKLOG = 4

    def __init__(self, output: BinaryIO) -> None:
        self.output = output
        self.turns: dict[int, collections.deque[bytes]] = {}  # in turn order
        self.writing = False  # one writer at a time: the thread or a producer
        self.changed = threading.Condition()
        threading.Thread(target=self._write, daemon=True).start()

    def put(self, key: int, data: bytes) -> None:
        """Queue one frame of request `key` (0: the heartbeat); waits while it has a backlog."""
        with self.changed:
            if not self.turns and not self.writing:
                self.writing = True  # nothing ahead of it: no turn to take
            else:
                while len(self.turns.get(key, ())) >= self.BACKLOG:
                    self.changed.wait()
                self.turns.setdefault(key, collections.deque()).append(data)
                self.changed.notify_all()
                return
        self._send(data)

    def _next(self) -> bytes:
        with self.changed:
            while not self.turns or self.writing:
                self.changed.wait()
            key, frames = next(iter(self.turns.items()))
            data = frames.popleft()
            del self.turns[key]
            if frames:
                self.turns[key] = frames  # to the back of the line
            self.writing = True
            self.changed.notify_all()
            return data

    def _send(self, data: bytes) -> None:
        """Write one frame (as the one writer), then let the next writer go."""
        try:
            with contextlib.suppress(OSError, ValueError):  # the host may be gone
                # The agent's stdout is unbuffered (`-u`): a write may take part of a frame
                # (gVisor's pipe took ~64 KiB of a larger one), and the rest must follow.
                view = memoryview(data)
                while view:
                    view = view[self.output.write(view) or 0 :]
                self.output.flush()
        finally:
            with self.changed:
                self.writing = False
                self.changed.notify_all()

    def _write(self) -> None:
        while True:
            self._send(self._next())


class Workers:
    """Threads reused from one command to the next (starting one costs ~0.2 ms); at most
    `keep` wait idle, so a burst of commands does not hold the sandbox's pids for ever."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.idle = 0
        self.lock = threading.Lock()
        self.jobs: queue.SimpleQueue[tuple[Callable[[Message], None], Message]] = (
            queue.SimpleQueue()
        )

    def submit(self, job: Callable[[Message], None], request: Message) -> None:
        """Run `job(request)` on an idle worker, or a new one (RuntimeError at the pid limit)."""
        with self.lock:
            if self.idle:
                self.idle -= 1
                self.jobs.put((job, request))
                return
        threading.Thread(target=self._work, args=(job, request), daemon=True).start()

    def _work(self, job: Callable[[Message], None], request: Message) -> None:
        while True:
            job(request)
            with self.lock:
                if self.idle >= self.keep:
                    return
                self.idle += 1
            job, request = self.jobs.get()


class Warm(NamedTuple):
    """A helper started before its command is known, waiting for it on `spec_write`."""

    process: Process
    spec_write: int
    status_read: int


class WarmHelpers:
    """Helpers started ahead of their commands (`stigmer-exec --spec-fd`): a command then
    costs no exec of the helper and no `Popen` on its path (~0.5-0.8 ms of ~3 ms), only
    writing its arguments to a pipe. One long-lived thread starts them, because a helper's
    parent-death signal follows the thread that started it, not the process. A helper
    built before `--spec-fd` existed is detected once (it refuses an empty spec with a
    usage error) and commands then start their helper themselves, as before.

    While one is still ready, the next is started only when no command runs (`busy`):
    starting one takes the GIL and a CPU for ~0.5 ms, which a running command's answer
    would otherwise wait for.

    Each also prestarts the shell most commands are (`--prestart-shell`: `bash` as the
    command's user in the default folder with the agent's environment, waiting for its
    script), so a shell command does not wait for bash to start either (`shell`: those
    options and that environment; a helper without the option is detected once)."""

    def __init__(
        self,
        keep: int = 2,
        busy: Callable[[], bool] = lambda: False,
        shell: tuple[list[str], dict[str, str]] | None = None,
    ) -> None:
        self.keep, self.busy, self.shell = keep, busy, shell
        self.ready: collections.deque[Warm] = collections.deque()
        self.enabled = True
        self.changed = threading.Condition()
        threading.Thread(target=self._fill, daemon=True).start()

    def take(self) -> Warm | None:
        """A started helper still waiting for its command, or None."""
        with self.changed:
            while self.ready:
                warm = self.ready.popleft()
                self.changed.notify_all()
                if warm.process.poll() is None:
                    return warm
                discard(warm)
        return None

    def poke(self) -> None:
        """A command ended: time to start the next helper, if one is missing."""
        with self.changed:
            self.changed.notify_all()

    def close(self) -> None:
        """No more commands: each waiting helper reads EOF and exits saying nothing."""
        with self.changed:
            self.enabled = False
            while self.ready:
                discard(self.ready.popleft())
            self.changed.notify_all()

    def _fill(self) -> None:
        """Keep `keep` helpers ready. This thread must outlive every helper it started
        (their parent-death signal is its end), so it ends only with the agent."""
        if not self._supported():
            self.close()
            return
        while True:
            with self.changed:
                while self.enabled and (
                    len(self.ready) >= self.keep or (self.ready and self.busy())
                ):
                    self.changed.wait()
                if not self.enabled:
                    return
            try:
                warm = start_warm(self.shell)
            except Exception:  # e.g. the sandbox's pid limit: commands start their own
                time.sleep(1.0)
                continue
            with self.changed:
                if self.enabled:
                    self.ready.append(warm)
                    continue
            discard(warm)

    def _supported(self) -> bool:
        """Whether this sandbox's helper takes `--spec-fd` (and `--prestart-shell`; without
        it, `shell` is dropped): given EOF at once, one that does exits 0 without a
        status; an older one refuses the option (exit 125)."""
        for shell in (self.shell, None) if self.shell else (None,):
            try:
                warm = start_warm(shell)
            except (OSError, subprocess.SubprocessError):
                return False
            discard(warm)
            if warm.process.returncode == 0:
                self.shell = shell
                return True
        return False


def prestart_usable(uid: int, gid: int) -> bool:
    """Whether this sandbox's image has the shell a warm helper prestarts and the commands'
    user can run it (an image built before it existed runs every command as before). The
    copy is execute-only; gVisor loads no program its user cannot read, so there a shell
    command prestarted from it failed with 126: the copy is tried once, as that user."""
    if not os.path.isfile(PRESTART_SHELL):
        return False
    try:
        tried = subprocess.run(
            [PRESTART_SHELL, "-c", ":"],
            check=False,
            user=uid,
            group=gid,
            extra_groups=[],
            env={},
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return tried.returncode == 0


def start_warm(shell: tuple[list[str], dict[str, str]] | None = None) -> Warm:
    """A helper that waits for its command's arguments on a pipe (its stdio are pipes: a
    command without stdin or with merged output is told so in its arguments).

    `Popen` starts it by `posix_spawn` (vfork and exec: ~0.2 ms, where its fork path took
    ~1 ms with the agent's GIL held, which the next command waited for): it takes that path
    when it is asked to close no fds, pass none and change no folder. Nothing leaks into the
    helper that way: every fd the agent opens is close-on-exec (Python's default, and the
    agent makes none inheritable), the helper's two ends are made inheritable just for this
    start, one start at a time (`WARM_START`), and the agent runs in "/" (main)."""
    spec_read, spec_write = os.pipe()
    status_read, status_write = os.pipe()
    passed = (spec_read, status_write)
    with WARM_START:
        try:
            return Warm(_spawn_warm(passed, shell), spec_write, status_read)
        except BaseException:
            for fd in (spec_write, status_read):
                os.close(fd)
            raise
        finally:
            for fd in passed:
                os.close(fd)


def _spawn_warm(passed: tuple[int, int], shell: tuple[list[str], dict[str, str]] | None) -> Process:
    """The helper process, given the spec's and status's ends `passed` (inheritable meanwhile)."""
    spec_read, status_write = passed
    for fd in passed:
        os.set_inheritable(fd, True)
    return subprocess.Popen(
        [
            EXEC_HELPER,
            "--watch-parent",
            "--spec-fd",
            str(spec_read),
            "--status-fd",
            str(status_write),
            *(shell[0] if shell else ()),
        ],
        env=shell[1] if shell else {},
        close_fds=False,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def discard(warm: Warm) -> None:
    """End a warm helper that got no command: EOF on its spec, then reap it."""
    for fd in (warm.spec_write, warm.status_read):
        with contextlib.suppress(OSError):
            os.close(fd)
    for pipe in (warm.process.stdin, warm.process.stdout, warm.process.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()
    try:
        warm.process.wait(timeout=BACKSTOP_WAIT_S)
    except subprocess.TimeoutExpired:
        warm.process.kill()
        warm.process.wait()


def spec_bytes(tokens: list[str]) -> bytes:
    """Arguments as `--spec-fd` reads them: each NUL-terminated (a NUL inside one would
    split it into two, so it is refused, as `exec` refuses it)."""
    encoded = [token.encode("utf-8", "surrogateescape") for token in tokens]
    if any(b"\0" in token for token in encoded):
        raise ValueError("embedded null byte")
    return b"".join(token + b"\0" for token in encoded)


def env_spec(env: dict[str, str]) -> bytes:
    """A command's whole environment as a warm helper's `--env` arguments (what a started
    helper gets from `Popen`, which refuses the same names)."""
    if any(not name or "=" in name for name in env):
        raise ValueError("illegal environment variable name")
    return spec_bytes([part for item in env.items() for part in ("--env", "=".join(item))])


def readable_file() -> int:
    """A file only in memory that the command's bash, as the sandbox user, may open again
    as /dev/fd/N (to source a session's prelude or read a long script): a memfd is
    readable by anyone from birth, where a root's pipe needs fchmod, which gVisor refuses.
    It holds what `fill` wrote, whatever the command does (no writer to wait for)."""
    return os.memfd_create("stigmer-script")


def fill(fd: int, data: bytes) -> None:
    """Write all of `data` to a `readable_file` and rewind it for its reader."""
    write_all(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Agent:
    """Reads requests from stdin, runs each on a worker thread, writes answers to stdout."""

    def __init__(self, output: BinaryIO, uid: int, gid: int) -> None:
        self.outbox = Outbox(output)
        self.uid, self.gid = uid, gid
        self.lock = threading.Lock()
        self.running: dict[str, set[str]] = {}  # command id -> ids that overlapped it
        self.helpers: set[Process] = set()
        self.by_command: dict[str, Process] = {}  # command id -> its helper, for `cancel`
        # Commands cancelled before their helper started (e.g. waiting for a session).
        self.cancelled: dict[str, float] = {}
        self.base_env = command_environment(dict(os.environ), uid)
        self.base_env_spec: bytes | None = None  # a name `Popen` refuses: each command fails
        with contextlib.suppress(ValueError):
            self.base_env_spec = env_spec(self.base_env)
        self.oom = OomCounter()
        self.workers = Workers()
        # Helpers whose shell is prestarted take the commands it fits (most: `bash -c`);
        # the others take plain ones, so no shell is started in vain.
        shell = [*self._ids(), "--cwd", DEFAULT_CWD, "--prestart-shell"]
        prestart = bool(self.base_env_spec) and prestart_usable(uid, gid)
        self.warm_shells = (
            WarmHelpers(busy=self._busy, shell=(shell, self.base_env)) if prestart else None
        )
        self.warm = WarmHelpers(keep=1 if prestart else 2, busy=self._busy)
        self.operations: dict[str, Callable[[Message], Message]] = {
            "session_close": self.close_session,
            "cancel": self.cancel,
        }

    def _busy(self) -> bool:
        return bool(self.running)

    def _pools(self) -> list[WarmHelpers]:
        return [pool for pool in (self.warm, self.warm_shells) if pool is not None]

    def send(self, message: Message) -> None:
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        self.outbox.put(message["id"], data)

    def heartbeat(self) -> None:
        while True:
            self.send({"id": 0, "type": "beat"})
            time.sleep(HEARTBEAT_S)

    def serve(self, requests: Iterable[bytes]) -> None:
        threading.Thread(target=self.heartbeat, daemon=True).start()
        for line in requests:
            request = parse_request(line)
            if request is None:
                continue  # not a request; the host never sends these
            if request["op"] == "ping":
                self.send({"id": request["id"], "type": "pong", "pid": os.getpid()})
                continue
            try:
                self.workers.submit(self.run if request["op"] == "exec" else self.answer, request)
            except RuntimeError as exc:  # the sandbox's process limit is reached
                self.fail(request, f"could not start a thread for it: {exc}")
        # The host is gone: each helper ends its command's whole tree on SIGTERM.
        for pool in self._pools():
            pool.close()
        for helper in list(self.helpers):
            with contextlib.suppress(OSError):
                helper.send_signal(signal.SIGTERM)

    def fail(self, request: Message, reason: str) -> None:
        self.send({"id": request["id"], "type": "error", "message": reason})

    def run(self, request: Message) -> None:
        try:
            self._run_and_answer(request)
        finally:
            for pool in self._pools():
                pool.poke()  # answered: a missing warm helper may be started now

    def _run_and_answer(self, request: Message) -> None:
        try:
            done = self.execute(request)
        except Exception as exc:  # one request failing must not end the agent
            self.fail(request, f"{type(exc).__name__}: {exc}")
            return
        for name in ("stdout", "stderr"):
            tail, done[name]["tail"] = done[name]["tail"], ""
            for start in range(0, len(tail), TAIL_PIECE):
                piece = base64.b64encode(tail[start : start + TAIL_PIECE]).decode()
                self.send({"id": request["id"], "type": "tail", "stream": name, "data": piece})
        self.send(done)

    def answer(self, request: Message) -> None:
        """A request that is not a command: sessions and background processes."""
        try:
            data = self.operations[request["op"]](request)
        except Exception as exc:  # the request fails alone, with its reason
            self.fail(request, f"{type(exc).__name__}: {exc}")
            return
        self.send({"id": request["id"], "type": "reply", "data": data})

    def cancel(self, request: Message) -> Message:
        """End a running command and its whole tree (the helper does, on SIGTERM); one that
        has not started yet never starts."""
        cid = str(request.get("cid"))
        with self.lock:
            process = self.by_command.get(cid)
            if process is None:
                now = time.monotonic()
                self.cancelled = {k: t for k, t in self.cancelled.items() if now - t < 3600}
                self.cancelled[cid] = now
        if process is not None:
            with contextlib.suppress(OSError):
                process.send_signal(signal.SIGTERM)
        return {"cancelled": True}

    def is_cancelled(self, cid: str) -> bool:
        with self.lock:
            return cid in self.cancelled

    def close_session(self, request: Message) -> Message:
        return {"existed": SessionState.close(str(request.get("session")))}

    def execute(self, request: Message) -> Message:
        cid = str(request.get("cid") or request["id"])
        with self.lock:
            for others in self.running.values():
                others.add(cid)
            self.running[cid] = set(self.running)
            self.running[cid].discard(cid)
        try:
            message = self._execute(request)
        finally:
            with self.lock:
                overlap = self.running.pop(cid, set())
        if message["oom_killed"]:
            message["oom_overlap"] = sorted(overlap)
        return message

    def _execute(self, request: Message) -> Message:
        name = request.get("session")
        if not name:
            extra = request.get("env")
            env = {**self.base_env, **extra} if extra else self.base_env  # never mutated
            return self._run(request, list(request["argv"]), env, str(request.get("cwd")))
        timeout = float(request.get("timeout") or 3600)
        asked = time.monotonic()
        cid = str(request.get("cid") or request["id"])
        with SessionState(str(name), timeout, lambda: self.is_cancelled(cid)) as session:
            waited = time.monotonic() - asked
            request = {**request, "timeout": max(timeout - waited, 0.001)}
            state_read, state_write = os.pipe()
            prelude = readable_file()
            fds = (state_read, state_write, prelude)
            try:
                argv, env, text = session.command(request, self.base_env, state_write, prelude)
                fill(prelude, text.encode(errors="surrogateescape"))
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            message = self._run(request, argv, env, "/", SessionPipes(*fds))
            session.save(message.pop("state", None))
            return message

    def _run(
        self,
        request: Message,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        session: SessionPipes | None = None,
    ) -> Message:
        """Start the helper for `argv`, serve its pipes, and build the `done` message; a
        session command also gets its prelude and state pipes."""
        before = self.oom.read()
        started = time.monotonic()
        process, status_read, extra = self._spawn(request, argv, env, cwd, session)
        captures, idled = self._supervise(request, process, extra)
        status = read_status(status_read, process.returncode)
        grew = oom_grew(before, self.oom.read())
        outputs = {name: captures[name] for name in ("stdout", "stderr")}
        message = done_message(request, status, grew, time.monotonic() - started, outputs)
        if idled:
            message.update(exit_code=TIMEOUT_EXIT, signal=None, idle_timed_out=True)
        ended_by_signal = idled or status.get("timed_out") or status.get("signal")
        if session is not None and not (ended_by_signal or status.get("cancelled")):
            message["state"] = captures["state"].text()  # a shell that finished, only
        return message

    def _spawn(
        self,
        request: Message,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        session: SessionPipes | None,
    ) -> tuple[Process, int, dict[str, IO[bytes]]]:
        """The helper started with its pipes: the process, the status pipe, extra pipes."""
        argv, script = inline_long_script(argv)
        if script is None and session is None:  # no extra pipe to pass: a warm one will do
            started = self._start_warm(request, argv, env, cwd)
            if started is not None:
                return started
        status_read, status_write = os.pipe()
        passed = [status_write]
        if script is not None:
            script_file = readable_file()
            passed.append(script_file)
            fill(script_file, script)
            argv = [argv[0], f"/dev/fd/{script_file}", *argv[1:]]
        kept = [status_read]
        if session is not None:
            passed += [session.state_write, session.prelude]
            kept.append(session.state_read)
        try:
            process = subprocess.Popen(
                self._helper_argv(request, status_write, cwd, argv),
                env=env,
                cwd="/",
                pass_fds=passed,
                stdin=subprocess.PIPE if request.get("stdin") is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT if request.get("merge_output") else subprocess.PIPE,
            )
        except OSError:
            for fd in kept:
                os.close(fd)
            raise
        finally:
            for fd in passed:
                os.close(fd)
        extra: dict[str, IO[bytes]] = {}
        if session is not None:
            extra["state"] = os.fdopen(session.state_read, "rb", buffering=0)
        return process, status_read, extra

    def _start_warm(
        self, request: Message, argv: list[str], env: dict[str, str], cwd: str
    ) -> tuple[Process, int, dict[str, IO[bytes]]] | None:
        """The command handed to a warm helper, or None when there is none (or it died
        before reading it: then it never started the command)."""
        # A bad argument fails before a helper is taken; the agent's own environment (most
        # commands') was encoded once.
        cached = self.base_env_spec if env is self.base_env else None
        environment = cached if cached is not None else env_spec(env)
        options = self._helper_options(request, cwd) + self._stdio_options(request)
        data = spec_bytes(options) + environment + spec_bytes(["--", *argv])
        shells = self.warm_shells if self._shell_fits(request, argv, env, cwd) else None
        warm = (shells or self.warm).take()
        if warm is None:
            return None
        process = warm.process
        try:
            write_all(warm.spec_write, data)
        except OSError:
            discard(warm)
            return None
        os.close(warm.spec_write)
        if request.get("stdin") is None and process.stdin is not None:
            process.stdin.close()  # the command's stdin is /dev/null (--stdin-null)
            process.stdin = None
        if request.get("merge_output") and process.stderr is not None:
            process.stderr.close()  # its stderr is its stdout (--merge-output)
            process.stderr = None
        return process, warm.status_read, {}

    def _shell_fits(self, request: Message, argv: list[str], env: dict[str, str], cwd: str) -> bool:
        """Whether a prestarted shell can run this command (the helper checks it again; a
        warm helper without one is taken otherwise, so no shell is started in vain)."""
        return (
            len(argv) == 3
            and argv[:2] == ["/bin/bash", "-c"]
            and len(argv[2].encode(errors="surrogateescape")) <= PRESTART_SCRIPT_LIMIT
            and env is self.base_env
            and (cwd or DEFAULT_CWD) == DEFAULT_CWD
            and request.get("stdin") is None
        )

    @staticmethod
    def _stdio_options(request: Message) -> list[str]:
        """What a warm helper is told that a started one gets from `Popen`: how the command's
        stdin and stderr are set up (its environment is told apart, see `env_spec`)."""
        options = []
        if request.get("stdin") is None:
            options.append("--stdin-null")
        if request.get("merge_output"):
            options.append("--merge-output")
        return options

    def _supervise(
        self, request: Message, process: Process, extra: dict[str, IO[bytes]]
    ) -> tuple[dict[str, OutputCapture], bool]:
        """Serve a started helper until it ends, reachable by `cancel` meanwhile; whatever
        goes wrong here, the helper is told to end its tree (never left unsupervised)."""
        cid = str(request.get("cid") or request["id"])
        with self.lock:
            self.helpers.add(process)
            self.by_command[cid] = process
            cancelled = self.cancelled.pop(cid, None) is not None
        try:
            if cancelled:  # cancelled while it was starting
                process.send_signal(signal.SIGTERM)
            return self._pump(request, process, request.get("stdin"), extra)
        except BaseException:
            backstop(process)
            raise
        finally:
            with self.lock:
                self.helpers.discard(process)
                self.by_command.pop(cid, None)

    def _helper_argv(
        self, request: Message, status_fd: int, cwd: str, argv: list[str]
    ) -> list[str]:
        options = ["--status-fd", str(status_fd), "--watch-parent"]
        return [EXEC_HELPER, *options, *self._helper_options(request, cwd), "--", *argv]

    def _ids(self) -> list[str]:
        return ["--uid", str(self.uid), "--gid", str(self.gid)]

    def _helper_options(self, request: Message, cwd: str) -> list[str]:
        """The helper's options for `request` (a warm helper has the others already)."""
        options = self._ids()
        options += ["--timeout", repr(float(request.get("timeout") or 3600))]
        options += ["--kill-grace", repr(KILL_GRACE_S), "--cwd", cwd or DEFAULT_CWD]
        if request.get("keep_background"):
            options.append("--keep-background")
        return options

    def _pump(
        self,
        request: Message,
        process: Process,
        stdin: str | None,
        extra: dict[str, IO[bytes]],
    ) -> tuple[dict[str, OutputCapture], bool]:
        if stdin is not None and process.stdin is not None:
            feed(process.stdin, base64.b64decode(stdin))
        limit = int(request.get("limit") or 1048576)
        captures = {"stdout": OutputCapture(limit), "stderr": OutputCapture(limit)}
        captures.update({name: OutputCapture(2 * STATE_LIMIT) for name in extra})

        def live(name: str, data: bytes) -> None:
            message = {"id": request["id"], "type": "out", "stream": name}
            self.send({**message, "data": base64.b64encode(data).decode()})

        def cancel() -> None:  # the helper ends the whole tree on SIGTERM
            with contextlib.suppress(OSError):
                process.send_signal(signal.SIGTERM)

        timeout = float(request.get("timeout") or 3600)
        idle = request.get("idle_timeout")
        pump = Pump(
            process,
            captures=captures,
            live=live,
            deadline=time.monotonic() + timeout + BACKSTOP_AFTER_S,
            expire=lambda: backstop(process),
            ended=lambda: None,
            extra=extra,
            idle=(float(idle), cancel) if idle else None,
        )
        pump.run()
        return captures, pump.idled


def parse_request(line: bytes) -> Message | None:
    """A well-formed request, or None."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(request, dict) or not isinstance(request.get("id"), int):
        return None
    if request.get("op") == "exec" and not (
        isinstance(request.get("argv"), list)
        and request["argv"]
        and all(isinstance(a, str) for a in request["argv"])
    ):
        return None
    return request if request.get("op") in OPERATIONS else None


def command_environment(environ: dict[str, str], uid: int) -> dict[str, str]:
    """The agent's environment made the sandbox user's: home, user name."""
    try:
        entry = pwd.getpwuid(uid)
        environ.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name)
    except KeyError:
        environ.update(HOME="/tmp", USER=str(uid), LOGNAME=str(uid))
    return environ


def inline_long_script(argv: list[str]) -> tuple[list[str], bytes | None]:
    """`bash -c SCRIPT` with a script too long for one argument: bash reads it from a pipe
    (no file a command could delete or a full /tmp could refuse)."""
    if len(argv) < 3 or argv[1] != "-c" or os.path.basename(argv[0]) not in ("bash", "sh"):
        return argv, None
    script = argv[2].encode(errors="surrogateescape")  # Linux arguments are bytes
    return (argv, None) if len(script) <= MAX_INLINE_ARG else ([argv[0], *argv[3:]], script)


def backstop(process: Process) -> None:
    """The helper missed its own deadline: ask it to end the tree, then make sure (killing
    the helper would orphan what is left, so only after its whole kill budget)."""
    with contextlib.suppress(OSError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=BACKSTOP_WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()


def read_status(fd: int, returncode: int | None) -> Message:
    """The helper's one-line status; a helper that died without one is reported as such."""
    raw = b""
    try:  # plain reads: a file object costs more than the few bytes it reads
        while len(raw) < 65536 and (chunk := os.read(fd, 65536 - len(raw))):
            raw += chunk
    finally:
        os.close(fd)
    try:
        status = json.loads(raw)
        if isinstance(status, dict) and isinstance(status.get("exit_code"), int):
            return status
    except (ValueError, RecursionError):
        pass
    code = returncode if returncode is not None else -9
    return {
        "exit_code": 128 - code if code < 0 else code,
        "signal": -code if code < 0 else None,
        "timed_out": False,
        "error": f"the exec helper ended without a status (returncode {code})",
    }


def done_message(
    request: Message,
    status: Message,
    oom: bool,
    duration: float,
    captures: dict[str, OutputCapture],
) -> Message:
    return {
        "id": request["id"],
        "type": "done",
        "exit_code": int(status["exit_code"]),
        "signal": status.get("signal"),
        "timed_out": bool(status.get("timed_out")),
        "oom_killed": oom,
        "oom_overlap": [],
        "duration_s": duration,
        "error": status.get("error"),
        **{name: summary(capture) for name, capture in captures.items()},
    }


def summary(capture: OutputCapture) -> Message:
    """A stream's end: its tail as bytes (the agent sends it in pieces before `done`)."""
    return {
        "tail": bytes(capture.tail),
        "dropped": capture.dropped,
        "total": capture.total,
    }
