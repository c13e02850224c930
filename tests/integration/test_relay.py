"""`inv run`'s warm path on the real engine: the relay serves the second run, streams and
exits like the first, cancels on Ctrl-C, admits only this user, and ends with its sandbox."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from stigmer_sandbox import config, relay

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
def socket_path(box, env):
    settings = config.load_settings(ROOT, environ={**os.environ, **env})
    path = relay.socket_path(settings)
    first = run_inv("run", "--json", "echo cold", env=env)
    assert first.returncode == 0, first.stderr
    assert "relay" not in json.loads(first.stdout)  # the slow path starts the relay
    assert wait_for(path.exists, 30), f"no relay socket at {path}"
    return path


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


def test_bad_input_through_the_relay_is_one_line_and_a_non_zero_exit(socket_path, env):
    bad = run_inv("run", "--session", "../x", "true", env=env)
    assert bad.returncode != 0 and "invalid session name" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_ctrl_c_ends_the_command_in_the_sandbox(socket_path, env, box):
    marker = f"relay-cancel-{os.getpid()}"
    command = [sys.executable, "-m", "invoke", "run", f"sleep 47; echo {marker}"]
    running = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env})
    assert wait_for(lambda: "sleep 47" in box.exec("ps -eo args").stdout, 20)
    running.send_signal(signal.SIGINT)
    assert running.wait(20) != 0
    assert wait_for(lambda: "sleep 47" not in box.exec("ps -eo args").stdout, 10)


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


def test_the_relay_ends_when_its_sandbox_goes(socket_path, env, box):
    box.remove()
    assert wait_for(lambda: not socket_path.exists(), 20)
    cold = run_inv("run", "--json", "echo back", env=env)  # a new sandbox, the slow path
    assert cold.returncode == 0 and "relay" not in json.loads(cold.stdout)
