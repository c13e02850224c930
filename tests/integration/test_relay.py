"""`inv run`'s warm path on the real engine: the relay serves the second run, streams and
exits like the first, cancels on Ctrl-C, admits only this user, answers malformed
requests and keeps serving, obeys the signals that stop a process whoever started it, and
ends with its sandbox."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from stigmer_sandbox import config, relay

from ..caller import with_signals
from ..conftest import ROOT, run_inv
from .conftest import wait_for
from .test_runtime import make_sandbox
from .test_sessions import inv_env


@pytest.fixture(scope="module")
def box(tmp_path_factory, docker_engine):
    with make_sandbox(tmp_path_factory.mktemp("relay")) as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def env(box):
    return {**inv_env(box), "INVOKE_STIGMER_RELAY_IDLE_S": "60"}


@pytest.fixture(scope="module")
def settings(box, env):
    return config.load_settings(ROOT, environ={**os.environ, **env})


# The caller of the `inv run` that starts the relay ignores or blocks the signals that stop
# a process (a background job of a script, a supervisor): the relay must obey them anyway.
HOSTILE_CALLER = {
    "ignore": (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM),
    "block": (signal.SIGHUP, signal.SIGTERM),
}


def console(
    argv: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`argv` from the project folder with `env` added, as a user's shell runs it."""
    return subprocess.run(
        argv,
        cwd=ROOT,
        env={**os.environ, "NO_COLOR": "1", **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_relay(settings, env) -> Path:
    """A cold `inv run` (the slow path), from a hostile caller; the relay it starts."""
    path = relay.socket_path(settings)
    argv = with_signals(
        [sys.executable, "-m", "invoke", "run", "--json", "echo cold"], **HOSTILE_CALLER
    )
    first = console(argv, env, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "relay" not in json.loads(first.stdout)  # the slow path starts the relay
    assert wait_for(path.exists, 30), f"no relay socket at {path}"
    return path


@pytest.fixture(scope="module")
def socket_path(settings, env):
    return start_relay(settings, env)


def exchange(path: Path, line: bytes) -> list[dict]:
    """The relay's answers to one raw request line, as any local process could send it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(30)
        client.connect(str(path))
        client.sendall(line)
        return list(relay.read_lines(client))


def relay_pid(path: Path) -> int:
    """The relay's pid, from the credentials of its end of a connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(path))
        creds = client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        client.sendall(b"{}\n")  # refused at once: the relay's thread is not left waiting
        return struct.unpack("3i", creds)[0]


def test_the_next_run_goes_through_the_relay_with_the_same_result(socket_path, env):
    warm = run_inv("run", "--json", "echo two; echo err >&2; exit 3", env=env)
    result = json.loads(warm.stdout)
    assert result["relay"] is True
    assert (result["stdout"], result["stderr"], result["exit_code"]) == ("two\n", "err\n", 3)
    assert warm.returncode == 3
    streamed = run_inv("run", "echo out; echo problem >&2; exit 4", env=env)
    assert (streamed.returncode, streamed.stdout) == (4, "out\n")
    assert "problem" in streamed.stderr


def test_sessions_carry_over_through_the_relay(socket_path, env):
    assert run_inv("run", "--session", "warm", "cd /tmp && export W=1", env=env).returncode == 0
    again = run_inv("run", "--json", "--session", "warm", 'echo "$PWD $W"', env=env)
    result = json.loads(again.stdout)
    assert (result["relay"], result["stdout"]) == (True, "/tmp 1\n")


def test_bad_input_through_the_relay_is_one_line_and_the_slow_paths_exit(socket_path, env):
    bad = run_inv("run", "--session", "../x", "true", env=env)
    assert bad.returncode == 2 and "invalid session name" in bad.stderr  # a usage error
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"env": ["A=1"]}, "env must be null or an object of string values"),
        ({"cwd": 5}, "cwd must be null or a string"),
        ({"timeout": "600"}, "timeout must be between 0 and"),
        ({"stdin": "data"}, "unknown option 'stdin'"),
    ],
)
def test_a_malformed_request_is_answered_logged_once_and_the_relay_serves_on(
    socket_path, settings, env, options, named
):
    log = settings.path("state_dir") / "relay.log"
    before = log.read_text() if log.exists() else ""
    request = {"fingerprint": relay.fingerprint(settings), "command": "true", "options": options}
    answers = exchange(socket_path, json.dumps(request).encode() + b"\n")
    assert [a["type"] for a in answers] == ["error"] and named in answers[0]["message"]
    assert [a["type"] for a in exchange(socket_path, b"\xff not json\n")] == ["error"]
    added = log.read_text()[len(before) :]
    assert len(added.splitlines()) == 2 and named in added and "Traceback" not in added
    good = run_inv("run", "--json", "echo still serving", env=env)
    assert json.loads(good.stdout)["relay"] is True and good.returncode == 0


def test_ctrl_c_ends_the_command_in_the_sandbox(socket_path, env, box):
    """As from a terminal, whatever this test's caller did to SIGINT (a background job of
    a script ignores it, and an ignored SIGINT is inherited)."""
    marker = f"relay-cancel-{os.getpid()}"
    command = with_signals([sys.executable, "-m", "invoke", "run", f"sleep 47; echo {marker}"])
    running = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, **env}, stdin=subprocess.DEVNULL
    )
    try:
        assert wait_for(lambda: "sleep 47" in box.exec("ps -eo args").stdout, 20)
        running.send_signal(signal.SIGINT)
        assert running.wait(20) != 0
        assert wait_for(lambda: "sleep 47" not in box.exec("ps -eo args").stdout, 10)
    finally:
        running.kill()
        running.wait()


def signal_mask(pid: int, field: str) -> int:
    """A mask of /proc/PID/status (SigIgn, SigBlk) as a number."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {field} for {pid}")


def ended(pid: int) -> bool:
    """Whether the process is gone or a zombie its new parent has not reaped yet."""
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


def test_the_relay_obeys_sigterm_though_its_starters_caller_ignored_and_blocked_it(
    socket_path, settings, env
):
    pid = relay_pid(socket_path)
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for field in ("SigIgn", "SigBlk"):
        assert all(not signal_mask(pid, field) & 1 << (number - 1) for number in stops), field
    os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: not socket_path.exists() and ended(pid), 20)
    assert start_relay(settings, env) == socket_path  # for the tests after this one


def test_only_this_user_can_reach_the_relay(socket_path):
    folder = socket_path.parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(socket_path.stat().st_mode) & 0o077 == 0
    nobody = (
        "import os, socket, sys; os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"try:\n    s.connect({str(socket_path)!r})\nexcept PermissionError:\n    sys.exit(7)\n"
    )
    attempt = subprocess.run([sys.executable, "-c", nobody], check=False, timeout=30)
    assert attempt.returncode == 7


CONSOLE_SCRIPT = Path(sys.executable).with_name("stigmer-sandbox")
# The warm path of the console script, with what it loaded reported on stderr.
WARM_PROBE = (
    "import sys; from stigmer_sandbox import warm_run; code = warm_run.try_run(sys.argv[1:]); "
    "print(code, 'invoke' in sys.modules, 'docker' in sys.modules, file=sys.stderr)"
)


def test_the_console_script_runs_on_the_warm_relay_without_invoke_or_docker(socket_path, env):
    probe = console([sys.executable, "-c", WARM_PROBE, "run", "--json", "echo warm; exit 3"], env)
    assert probe.stderr.split()[-3:] == ["3", "False", "False"], probe.stderr
    result = json.loads(probe.stdout)
    assert (result["relay"], result["stdout"], result["exit_code"]) == (True, "warm\n", 3)


def test_the_console_scripts_warm_run_prints_and_exits_as_inv_run(socket_path, env):
    command = "echo out; echo err >&2; exit 4"
    fast = console([str(CONSOLE_SCRIPT), "run", command], env)
    slow = run_inv("run", command, env=env)
    assert (fast.returncode, fast.stdout, fast.stderr) == (4, "out\n", "err\n")
    assert (slow.returncode, slow.stdout, slow.stderr) == (4, "out\n", "err\n")
    timed = console([str(CONSOLE_SCRIPT), "run", "--timeout", "1", "sleep 5"], env)
    assert timed.returncode == 124 and "command ended by timeout (exit 124)" in timed.stderr


NOTE_PROBE = (
    "import json, sys; from stigmer_sandbox import warm_index; "
    "print(json.dumps(warm_index.lookup()))"
)


def test_a_noted_relay_is_reached_without_the_settings_and_a_stale_note_runs_once(
    socket_path, env, settings
):
    marker = "relay-note-" + os.urandom(4).hex()
    first = console([str(CONSOLE_SCRIPT), "run", "true"], env)
    assert first.returncode == 0, first.stderr
    note = json.loads(console([sys.executable, "-c", NOTE_PROBE], env).stdout)
    assert note == [str(socket_path), relay.fingerprint(settings), settings.timeout]
    stale = [note[0], "0" * 20, note[2]]  # a relay of other settings refuses it
    write = (
        "import json, sys; from stigmer_sandbox import warm_index; "
        "warm_index.remember(*json.loads(sys.argv[1]))"
    )
    console([sys.executable, "-c", write, json.dumps(stale)], env)
    command = f"echo {marker} >> /workspace/{marker}.txt; cat /workspace/{marker}.txt"
    done = console([str(CONSOLE_SCRIPT), "run", command], env)
    assert (done.returncode, done.stdout) == (0, f"{marker}\n")  # refused, then ran once
    assert json.loads(console([sys.executable, "-c", NOTE_PROBE], env).stdout) == note


# Last: it removes the module's sandbox, which ends its relay (the tests above need it warm).
def test_the_relay_ends_when_its_sandbox_goes(socket_path, env, box):
    box.remove()
    assert wait_for(lambda: not socket_path.exists(), 20)
    cold = run_inv("run", "--json", "echo back", env=env)  # a new sandbox, the slow path
    assert cold.returncode == 0 and "relay" not in json.loads(cold.stdout)
