"""dockerfiles/sandbox/stigmer-exec.c: the in-container command helper, built and run on this host.

Runs as root (the helper drops to uid/gid 1000 for the command; no passwd entry needed). Every
kill test proves its background processes were running before the command ended (the command
prints RUNNING only once `pgrep` sees them) and then scans /proc for its unique marker.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import random
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "dockerfiles/sandbox/stigmer-exec.c"
ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
AS_SANDBOX_USER = ("--uid", "1000", "--gid", "1000")
# Popen options that start the helper itself as uid 1000 (an unprivileged helper).
RUN_AS_1000 = {"user": 1000, "group": 1000, "extra_groups": []}
KEYS = {"exit_code", "signal", "timed_out", "cancelled", "error", "pid", "killed"}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="drops to uid 1000: needs root")


@pytest.fixture(scope="module")
def helper(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The helper compiled exactly as the image build does (a missing gcc fails, never skips)."""
    gcc = shutil.which("gcc")
    assert gcc, "gcc is required (it is in the sandbox images and CI)"
    out = tmp_path_factory.mktemp("stigmer-exec") / "stigmer-exec"
    cmd = [gcc, "-O2", "-static", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(SOURCE)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return str(out)


@pytest.fixture(scope="module")
def public_dir():
    """A directory uid 1000 can reach (pytest's tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="stigmer-exec-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def cmdlines() -> dict[int, bytes]:
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                procs[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes()
    return procs


def holders(marker: str) -> list[int]:
    """Live processes whose command line mentions the marker (sleeps and their shells)."""
    me = os.getpid()
    return [pid for pid, line in cmdlines().items() if marker.encode() in line and pid != me]


@pytest.fixture
def marker():
    """A unique `sleep` argument; anything still carrying it is killed at teardown, even on
    failure."""
    value = f"3000.{random.randrange(10**6):06d}"
    yield value
    for _ in range(50):
        left = holders(value)
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def script(marker: str, body: str, wait_for: int) -> str:
    """A bash command: BODY (with M = the marker), then print RUNNING once WAIT_FOR `sleep M`
    processes run; exits 99 without printing it if they never show up."""
    pattern = "^sleep " + marker.replace(".", r"\.") + "$"
    return (
        body.replace("M", marker) + f"\nfor _ in $(seq 250); do"
        f" [ \"$(pgrep -c -f '{pattern}')\" -ge {wait_for} ] && {{ echo RUNNING; break; }};"
        f" sleep 0.02; done\n"
    )


@dataclass
class Run:
    code: int
    status: dict
    out: str
    err: str
    elapsed: float
    status_fd: int


def read_status(fd: int) -> dict:
    """Exactly one valid JSON line with every key (read without blocking: the writer is gone)."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except BlockingIOError:
        pass
    text = data.decode("ascii")
    assert text.endswith("\n") and text.count("\n") == 1, repr(text)
    status = json.loads(text)
    assert set(status) == KEYS, status
    return status


def status_pipe() -> tuple[int, int]:
    """A pipe whose write end has a high number (>= 50), unlike anything the command opens."""
    r, w = os.pipe()
    high = fcntl.fcntl(w, fcntl.F_DUPFD, 50)
    os.close(w)
    return r, high


def run(helper: str, *args: str, timeout: float = 20, **popen) -> Run:
    """helper --status-fd W ARGS, stdout/stderr to files (background children may hold them)."""
    r, w = status_pipe()
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            start = time.monotonic()
            try:
                done = subprocess.run(
                    [helper, "--status-fd", str(w), *args],
                    pass_fds=(w,),
                    stdout=out,
                    stderr=err,
                    cwd="/",
                    env=ENV,
                    timeout=timeout,
                    check=False,
                    **popen,
                )
            finally:
                os.close(w)
            elapsed = time.monotonic() - start
            out.seek(0)
            err.seek(0)
            texts = out.read().decode(), err.read().decode()
        status = read_status(r)
    finally:
        os.close(r)
    assert status["exit_code"] == done.returncode, (status, done.returncode)
    return Run(done.returncode, status, *texts, elapsed, w)


def bash(helper: str, command: str, *opts: str, **kw) -> Run:
    return run(helper, *AS_SANDBOX_USER, *opts, "--", "bash", "-c", command, **kw)


def assert_clean(result: Run) -> None:
    assert result.status["timed_out"] is False
    assert result.status["cancelled"] is False
    assert result.status["error"] is None
    assert isinstance(result.status["pid"], int) and result.status["pid"] > 0


# --- exit status, identity, privilege ---------------------------------------------------------


@pytest.mark.parametrize("code", [0, 3])
def test_exit_code_passes_through(helper: str, code: int):
    result = bash(helper, f"exit {code}")
    assert result.code == code
    assert result.status["signal"] is None
    assert result.status["killed"] == 0
    assert_clean(result)


def test_death_by_signal_reports_it(helper: str):
    result = bash(helper, "kill -TERM $$")
    assert (result.code, result.status["signal"]) == (143, 15)
    assert_clean(result)


def status_fields(text: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def test_command_runs_as_uid_1000_without_capabilities(helper: str):
    result = bash(helper, "cat /proc/self/status")
    fields = {k: v.split() for k, v in status_fields(result.out).items()}
    assert fields["Uid"] == ["1000"] * 4
    assert fields["Gid"] == ["1000"] * 4
    assert fields["Groups"] == ["1000"]
    for caps in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert fields[caps] == ["0000000000000000"], caps
    mine = status_fields(Path("/proc/self/status").read_text())["NoNewPrivs"].split()
    assert fields["NoNewPrivs"] == mine  # left as the caller had it
    assert result.code == 0


def test_without_uid_the_command_keeps_the_helpers_ids(helper: str):
    result = run(helper, "--", "id", "-u")
    assert (result.code, result.out) == (0, f"{os.geteuid()}\n")


def test_command_cannot_signal_or_inspect_the_helper(helper: str):
    result = bash(
        helper,
        "if kill -9 $PPID 2>/dev/null; then echo KILLED; else echo KILL-DENIED; fi;"
        " if ls /proc/$PPID/fd >/dev/null 2>&1; then echo FDS-READ; else echo FDS-DENIED; fi",
    )
    assert result.out.split() == ["KILL-DENIED", "FDS-DENIED"]
    assert result.code == 0
    assert_clean(result)


def test_status_fd_is_not_inherited(helper: str):
    result = bash(helper, "ls -l /proc/self/fd; echo FDS $(ls /proc/$$/fd)")
    assert result.code == 0
    listing, shell_fds = result.out.split("FDS", 1)
    assert " 0 -> " in listing  # the listing worked
    assert f" {result.status_fd} -> " not in listing
    assert str(result.status_fd) not in shell_fds.split()


# --- the tree is killed when the main child exits ---------------------------------------------

TRICKS = {
    "setsid": ("setsid sleep M &", 1),
    "double-fork": ("( ( sleep M & ) & )", 1),
    "env-i": ("env -i sleep M &", 1),
    "nohup": ("nohup sleep M >/dev/null 2>&1 &", 1),
    "disown": ("sleep M & disown", 1),
    "daemon-closing-fds": ("setsid bash -c 'exec >&- 2>&- <&-; sleep M' &", 1),
    "all-combined": (
        "setsid sleep M & ( ( sleep M & ) & ); env -i sleep M &"
        " nohup sleep M >/dev/null 2>&1 & sleep M & disown;"
        " setsid bash -c 'exec >&- 2>&- <&-; sleep M' &",
        6,
    ),
    "fork-bomb-200": (
        "for i in $(seq 20); do ( for j in $(seq 10); do sleep M & done; wait ) & done",
        200,
    ),
    "respawner": ("( for i in $(seq 300); do sleep M & sleep 0.01; done ) &", 5),
}


@pytest.mark.parametrize("trick", TRICKS)
def test_everything_left_is_killed_when_the_command_exits(helper: str, marker: str, trick: str):
    body, count = TRICKS[trick]
    result = bash(helper, script(marker, body, count))
    assert "RUNNING" in result.out, "the background processes never started"
    assert holders(marker) == []
    assert result.code == 0
    assert result.status["killed"] >= count
    assert_clean(result)


# A process whose main thread calls pthread_exit while another thread sleeps: its leader is
# a zombie ('Z' in /proc/PID/stat) yet the process lives, and it cannot be reaped until the
# thread ends. It prints its pid first.
ZOMBIE_LEADER = (
    "import ctypes, os, threading, time; "
    "threading.Thread(target=time.sleep, args=(1000,)).start(); "
    "print(os.getpid(), flush=True); ctypes.CDLL(None).pthread_exit(None)"
)


def zombie_leader_pid(out: str) -> int:
    pid = int(out.split(maxsplit=1)[0])
    assert pid > 1
    return pid


def test_a_zombie_leader_with_live_threads_is_killed_when_the_command_exits(helper: str):
    command = f"python3 -c '{ZOMBIE_LEADER}' & sleep 0.5; grep -q '^State:.*Z' /proc/$!/status"
    result = bash(helper, command + " && echo ZOMBIE")
    assert "ZOMBIE" in result.out, "the leader never became a zombie with a live thread"
    assert result.elapsed < 3  # was 10.7 s: the helper skipped zombies
    assert (result.code, result.status["error"]) == (0, None)
    assert result.status["killed"] >= 1
    assert not Path(f"/proc/{zombie_leader_pid(result.out)}").exists()


def test_a_zombie_leader_times_out_on_time(helper: str):
    result = bash(helper, f"exec python3 -c '{ZOMBIE_LEADER}'", "--timeout", "1")
    assert result.elapsed < 2.5
    assert (result.code, result.status["timed_out"], result.status["error"]) == (124, True, None)
    assert not Path(f"/proc/{zombie_leader_pid(result.out)}").exists()


# --- timeout, keep-background, cancel ---------------------------------------------------------


def test_timeout_kills_the_tree(helper: str, marker: str):
    body = "setsid sleep M & ( ( sleep M & ) & )"
    result = bash(helper, script(marker, body, 2) + f"sleep {marker}", "--timeout", "1")
    assert "RUNNING" in result.out
    assert result.elapsed < 5
    assert (result.code, result.status["timed_out"], result.status["signal"]) == (124, True, 9)
    assert result.status["killed"] >= 2  # the last `sleep` is bash's exec: the main child
    assert holders(marker) == []


def test_timeout_kills_a_command_that_ignores_sigterm(helper: str, marker: str):
    body = "trap '' TERM; sleep M &"
    result = bash(helper, script(marker, body, 1) + f"sleep {marker}", "--timeout", "1")
    assert "RUNNING" in result.out
    assert result.elapsed < 5
    assert (result.code, result.status["timed_out"]) == (124, True)
    assert holders(marker) == []


def test_keep_background_leaves_background_processes_running(helper: str, marker: str):
    result = bash(helper, script(marker, "sleep M &", 1) + "exit 5", "--keep-background")
    assert "RUNNING" in result.out
    assert result.elapsed < 5
    assert (result.code, result.status["killed"]) == (5, 0)
    assert len(holders(marker)) == 1  # the marker fixture kills it


def wait_for_text(path: Path, text: str, timeout: float = 5) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text()
        if text in content:
            return content
        time.sleep(0.02)
    raise AssertionError(f"{text!r} never appeared in {path}: {path.read_text()!r}")


def test_sigterm_to_the_helper_cancels_and_kills_the_tree(helper: str, marker: str, tmp_path):
    out = tmp_path / "out"
    r, w = status_pipe()
    command = script(marker, "setsid sleep M & ( ( sleep M & ) & )", 2) + f"sleep {marker}"
    argv = [helper, "--status-fd", str(w), *AS_SANDBOX_USER, "--", "bash", "-c", command]
    with out.open("wb") as sink:
        proc = subprocess.Popen(argv, pass_fds=(w,), stdout=sink, cwd="/", env=ENV)
    os.close(w)
    try:
        wait_for_text(out, "RUNNING")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=5)
        status = read_status(r)
    finally:
        os.close(r)
        proc.kill()
        proc.wait()
    assert (code, status["exit_code"], status["signal"]) == (137, 137, 9)
    assert (status["cancelled"], status["timed_out"]) == (True, False)
    assert status["killed"] >= 2
    assert holders(marker) == []


INTERMEDIATE = """
import subprocess, sys, time
child = subprocess.Popen(sys.argv[2:], pass_fds=(int(sys.argv[1]),))
print("HELPER", child.pid, flush=True)
time.sleep(60)
"""


def wait_status(fd: int, timeout: float) -> dict:
    """The status line, waiting (bounded) until every writer has closed the pipe."""
    deadline = time.monotonic() + timeout
    data = b""
    while (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                status = json.loads(data)
                assert set(status) == KEYS
                return status
            data += chunk
    raise AssertionError(f"no status within {timeout} s: {data!r}")


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in "ZX"


def test_parent_death_makes_the_helper_kill_the_tree(helper: str, marker: str, tmp_path):
    out = tmp_path / "out"
    r, w = status_pipe()
    command = script(marker, "setsid sleep M & ( ( sleep M & ) & )", 2) + f"sleep {marker}"
    argv = [sys.executable, "-c", INTERMEDIATE, str(w), helper, "--status-fd", str(w)]
    argv += ["--watch-parent"]
    argv += [*AS_SANDBOX_USER, "--", "bash", "-c", command]
    with out.open("wb") as sink:
        parent = subprocess.Popen(argv, pass_fds=(w,), stdout=sink, cwd="/", env=ENV)
    os.close(w)
    helper_pid = 0
    try:
        wait_for_text(out, "RUNNING")
        text = wait_for_text(out, "HELPER")
        helper_pid = int(text.split("HELPER", 1)[1].split()[0])
        parent.kill()
        parent.wait()
        start = time.monotonic()
        status = wait_status(r, timeout=10)
        assert time.monotonic() - start < 5
    finally:
        os.close(r)
        parent.kill()
        parent.wait()
        if helper_pid and not gone(helper_pid):
            os.kill(helper_pid, signal.SIGKILL)
    assert (status["cancelled"], status["exit_code"], status["killed"] >= 2) == (True, 137, True)
    deadline = time.monotonic() + 5
    while not gone(helper_pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gone(helper_pid)
    assert holders(marker) == []


# --- start errors and usage -------------------------------------------------------------------


@pytest.mark.parametrize("program", ["/nonexistent-dir/stigmer-nope", "stigmer-no-such-command"])
def test_missing_program_is_127(helper: str, program: str):
    result = run(helper, *AS_SANDBOX_USER, "--", program)
    assert result.code == 127
    assert result.status["error"] == f"{program}: No such file or directory"
    assert result.err == ""


def test_non_executable_file_is_126(helper: str, public_dir: Path):
    script_file = public_dir / "not-executable"
    script_file.write_text("#!/bin/sh\necho RAN\n")
    script_file.chmod(0o644)
    result = run(helper, *AS_SANDBOX_USER, "--", str(script_file))
    assert result.code == 126
    assert result.status["error"] == f"{script_file}: Permission denied"
    assert "RAN" not in result.out


def test_cwd_is_entered_as_the_commands_user(helper: str, public_dir: Path, tmp_path: Path):
    entered = bash(helper, "pwd", "--cwd", str(public_dir))
    assert (entered.code, entered.out) == (0, f"{public_dir}\n")
    private = tmp_path / "root-only"  # 0700 root: only a root chdir would get in
    private.mkdir(mode=0o700)
    refused = bash(helper, "echo RAN", "--cwd", str(private))
    assert refused.code == 126 and "RAN" not in refused.out
    assert refused.status["error"] == f"cd: {private}: Permission denied"
    missing = bash(helper, "echo RAN", "--cwd", "/no/such/dir")
    assert missing.status["error"] == "cd: /no/such/dir: No such file or directory"


def test_argument_over_max_arg_strlen_never_reaches_the_helper(helper: str):
    """A 200,000-byte argument is over MAX_ARG_STRLEN (128 KiB): the kernel refuses to exec the
    helper itself, so the caller gets E2BIG at spawn time (and must report 126 itself)."""
    with pytest.raises(OSError) as error:
        subprocess.run([helper, *AS_SANDBOX_USER, "--", "true", "a" * 200_000], check=False)
    assert error.value.errno == errno.E2BIG


@pytest.fixture
def unprivileged(helper: str, public_dir: Path) -> str:
    """A copy of the helper that uid 1000 can execute."""
    copy = public_dir / "stigmer-exec"
    shutil.copy(helper, copy)
    copy.chmod(0o755)
    return str(copy)


def test_fork_failure_is_reported_not_hung(unprivileged: str):
    """Under a process limit fork() fails with EAGAIN: error, no child, 126, at once."""

    def one_process_only() -> None:
        resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))

    result = run(unprivileged, "--", "/bin/echo", "RAN", **RUN_AS_1000, preexec_fn=one_process_only)
    assert (result.code, result.status["pid"], result.out) == (126, None, "")
    assert result.status["error"] == "fork: Resource temporarily unavailable"
    assert result.elapsed < 5


def test_ids_that_cannot_be_taken_never_run_the_command(unprivileged: str):
    """A helper that is not root cannot switch to uid 1001: 126, and the command never runs."""
    ids = ("--uid", "1001", "--gid", "1001")
    result = run(unprivileged, *ids, "--", "/bin/echo", "RAN", **RUN_AS_1000)
    assert (result.code, result.out) == (126, "")
    assert result.status["error"] == "cannot run as uid 1001 gid 1001: Operation not permitted"


BAD_USAGE = {
    "no-separator": ["bash"],
    "no-program": ["--"],
    "unknown-option": ["--bogus", "--", "true"],
    "uid-without-gid": ["--uid", "1000", "--", "true"],
    "uid-not-numeric": ["--uid", "nobody", "--gid", "1000", "--", "true"],
    "uid-negative": ["--uid", "-1", "--gid", "1000", "--", "true"],
    "uid-too-large": ["--uid", "4294967295", "--gid", "1000", "--", "true"],
    "uid-twice": ["--uid", "1", "--uid", "1", "--gid", "1", "--", "true"],
    "missing-value": ["--timeout"],
    "timeout-zero": ["--timeout", "0", "--", "true"],
    "timeout-negative": ["--timeout", "-1", "--", "true"],
    "timeout-not-a-number": ["--timeout", "nan", "--", "true"],
    "timeout-trailing-junk": ["--timeout", "1s", "--", "true"],
    "status-fd-twice": ["--status-fd", "51", "--", "true"],
    "keep-background-twice": ["--keep-background", "--keep-background", "--", "true"],
    "cwd-twice": ["--cwd", "/", "--cwd", "/", "--", "true"],
    "watch-parent-twice": ["--watch-parent", "--watch-parent", "--", "true"],
    "cwd-empty": ["--cwd", "", "--", "true"],
    "kill-grace-zero": ["--kill-grace", "0", "--", "true"],
    "kill-grace-over-an-hour": ["--kill-grace", "3601", "--", "true"],
    "kill-grace-twice": ["--kill-grace", "1", "--kill-grace", "1", "--", "true"],
}


@pytest.mark.parametrize("case", BAD_USAGE)
def test_bad_usage_is_125_with_one_stderr_line(helper: str, case: str):
    result = run(helper, *BAD_USAGE[case])
    assert result.code == 125
    assert result.out == ""
    assert result.err.startswith("stigmer-exec: ") and result.err.count("\n") == 1
    assert result.status["error"].startswith("usage: ")
    assert result.status["pid"] is None


@pytest.mark.parametrize(
    "args",
    [[], ["--status-fd", "1", "--", "true"], ["--status-fd", "999", "--", "true"]],
    ids=["no-arguments", "status-fd-is-stdout", "status-fd-not-open"],
)
def test_bad_usage_without_a_status_fd(helper: str, args: list[str]):
    done = subprocess.run([helper, *args], capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout) == (125, "")
    assert done.stderr.startswith("stigmer-exec: ") and done.stderr.count("\n") == 1


def test_status_fd_after_a_bad_option_still_gets_the_status(helper: str):
    r, w = status_pipe()
    try:
        done = subprocess.run(
            [helper, "--bogus", "--status-fd", str(w), "--", "true"],
            pass_fds=(w,),
            capture_output=True,
            check=False,
        )
    finally:
        os.close(w)
    try:
        status = read_status(r)
    finally:
        os.close(r)
    assert (done.returncode, status["exit_code"]) == (125, 125)
    assert status["error"] == "usage: unknown option '--bogus'"
