"""stigmer-exec --spec-fd: a helper started before its command is known (the agent keeps
one ready), built and run on this host as the image build does.

The command then comes on a pipe as NUL-terminated arguments and is parsed like a command
line; its environment is only what `--env` gives; `--stdin-null` and `--merge-output` set
up the stdio the helper's own pipes were made with. Runs as root (the helper drops to uid
1000 for the command).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from dataclasses import dataclass

import pytest

from stigmer_sandbox.runtime.guest import agent

from . import test_exec_helper as plain
from .test_exec_helper import KEYS, holders, status_pipe

# The helper compiled as the image build does, and a unique `sleep` marker (see there).
helper = plain.helper
marker = plain.marker

AS_1000 = ["--uid", "1000", "--gid", "1000", "--cwd", "/"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="drops to uid 1000: needs root")


@dataclass
class Spawned:
    process: subprocess.Popen[bytes]
    spec_write: int
    status_read: int


def start(helper: str, *extra: str) -> Spawned:
    """The helper as the agent keeps it ready: --watch-parent --spec-fd R --status-fd W."""
    spec_read, spec_write = os.pipe()
    status_read, status_write = status_pipe()
    argv = [helper, "--watch-parent", "--spec-fd", str(spec_read), "--status-fd"]
    process = subprocess.Popen(
        [*argv, str(status_write), *extra],
        pass_fds=(spec_read, status_write),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"STIGMER_HELPER_OWN": "1"},
    )
    os.close(spec_read)
    os.close(status_write)
    return Spawned(process, spec_write, status_read)


def finish(
    spawned: Spawned, spec: bytes | None, stdin: bytes | None = None
) -> tuple[int, bytes, bytes, bytes]:
    """Write `spec` (None: nothing), close it; exit code, stdout, stderr, status bytes."""
    if spec is not None:
        # A helper that refuses its command line exits before it reads: nothing to write to.
        with contextlib.suppress(BrokenPipeError):
            os.write(spawned.spec_write, spec)
    os.close(spawned.spec_write)
    out, err = spawned.process.communicate(stdin, timeout=20)
    with os.fdopen(spawned.status_read, "rb") as status:
        return spawned.process.returncode, out, err, status.read()


def spec(*tokens: str) -> bytes:
    return agent.spec_bytes(list(tokens))


def status_of(raw: bytes) -> dict:
    status = json.loads(raw)
    assert set(status) == KEYS, status
    return status


def test_eof_before_any_byte_exits_quietly(helper):
    code, out, err, status = finish(start(helper), None)
    assert (code, out, err, status) == (0, b"", b"", b"")


def test_the_command_runs_as_the_sandbox_user_with_only_the_given_environment(helper):
    script = 'echo "$X|${HOME-unset}|$(id -u)|$(pwd)"; echo err >&2; cat'
    tokens = [*AS_1000, "--env", "X=a b=c", "--env", "PATH=/usr/bin:/bin"]
    code, out, err, raw = finish(
        start(helper), spec(*tokens, "--", "bash", "-c", script), stdin=b"in"
    )
    assert code == 0, err
    assert out == b"a b=c|unset|1000|/\nin"
    assert err == b"err\n"
    assert status_of(raw)["exit_code"] == 0


def test_stdin_null_and_merged_output(helper):
    script = "echo out; echo err >&2; readlink /proc/self/fd/0; wc -c"
    tokens = [*AS_1000, "--stdin-null", "--merge-output", "--env", "PATH=/usr/bin:/bin"]
    code, out, err, raw = finish(start(helper), spec(*tokens, "--", "/bin/bash", "-c", script))
    assert code == 0
    assert out == b"out\nerr\n/dev/null\n0\n"
    assert err == b""
    assert status_of(raw)["exit_code"] == 0


def test_the_helper_own_environment_never_reaches_the_command(helper):
    code, out, _err, _raw = finish(start(helper), spec(*AS_1000, "--", "/usr/bin/env"))
    assert code == 0
    assert b"STIGMER_HELPER_OWN" not in out


def test_a_timeout_ends_the_whole_tree_as_on_the_command_line(helper, marker):
    body = f"sleep {marker} & setsid sleep {marker} & sleep {marker}"
    tokens = [*AS_1000, "--timeout", "0.5", "--kill-grace", "5", "--env", "PATH=/usr/bin:/bin"]
    code, _out, _err, raw = finish(start(helper), spec(*tokens, "--", "bash", "-c", body))
    status = status_of(raw)
    assert code == 124 and status["timed_out"] is True
    assert holders(marker) == []


@pytest.mark.parametrize(
    ("tokens", "reason"),
    [
        (["--spec-fd", "3", "--", "true"], "--spec-fd"),
        (["--uid", "1000", "--gid", "1000", "--uid", "0", "--", "true"], "--uid"),
        (["--env", "=x", "--", "true"], "--env"),
        (["--env", "NOVALUE", "--", "true"], "--env"),
        (["--stdin-null", "--stdin-null", "--", "true"], "given twice"),
        (["--uid", "1000", "--gid", "1000"], "missing"),
    ],
)
def test_bad_specs_are_usage_errors_and_run_nothing(helper, tokens, reason):
    code, out, err, raw = finish(start(helper), spec(*tokens))
    status = status_of(raw)
    assert code == 125 and status["pid"] is None
    assert reason in status["error"] and out == b""
    assert err.startswith(b"stigmer-exec: ")


def test_an_argument_without_its_nul_is_refused(helper):
    code, _out, _err, raw = finish(start(helper), b"--\0true")
    assert code == 125
    assert "NUL" in status_of(raw)["error"]


def test_nothing_may_follow_spec_fd_on_the_command_line(helper):
    code, _out, err, _raw = finish(start(helper, "--", "true"), spec("--", "true"))
    assert code == 125 and b"nothing after '--'" in err


def test_the_agent_refuses_a_nul_inside_an_argument():
    """A NUL would split one argument into two (an option smuggled in an env value)."""
    with pytest.raises(ValueError, match="null"):
        agent.spec_bytes(["--env", "X=a\0--uid\0" + "0"])
    assert agent.spec_bytes(["a", "", "b"]) == b"a\0\0b\0"


def test_the_spec_pipe_never_reaches_the_command(helper):
    """The command sees only its stdio: not the spec pipe, not the status pipe."""
    listing = "ls /proc/self/fd | sort -n | tr '\\n' ' '"
    tokens = [*AS_1000, "--stdin-null", "--env", "PATH=/usr/bin:/bin"]
    code, out, _err, _raw = finish(start(helper), spec(*tokens, "--", "bash", "-c", listing))
    assert code == 0
    assert out.split() == [b"0", b"1", b"2", b"3"]  # 3: the directory ls reads
