"""The agent's pure logic, and the same logic run on this host (`execution_mode: local`)."""

import subprocess
import time

import pytest

from stigmer_sandbox.runtime import agent
from stigmer_sandbox.runtime.channel import LocalRunner, Request


def test_capture_keeps_everything_within_the_limit():
    capture = agent.OutputCapture(10)
    assert capture.feed(b"abcdefgh") == b"abcde"
    assert capture.text() == b"abcdefgh" and capture.dropped == 0


def test_capture_keeps_head_and_tail_with_a_marker():
    capture = agent.OutputCapture(10)
    for _ in range(100):
        capture.feed(b"0123456789")
    text = capture.text()
    assert text.startswith(b"01234") and text.endswith(b"56789")
    assert b"[... 990 bytes truncated by stigmer-sandbox ...]" in text
    assert capture.total == 1000


@pytest.mark.parametrize(
    ("args", "cause"),
    [
        ((0, None, False, False), "exit"),
        ((124, 9, True, False), "timeout"),
        ((137, 9, False, True), "oom"),
        ((143, 15, False, False), "signal"),
        ((3, None, False, False), "exit"),
    ],
)
def test_exit_cause(args, cause):
    assert agent.exit_cause(*args) == cause


def local(argv, timeout=10.0, limit=1 << 20, keep=False, stdin=None):
    request = Request(
        argv=argv,
        env={},
        cwd="/tmp",
        timeout=timeout,
        limit=limit,
        keep_background=keep,
        stdin=stdin,
    )
    return LocalRunner().run(request)


def test_local_runner_exit_code_output_and_stdin():
    result = local(["bash", "-c", "cat; echo err >&2; exit 5"], stdin=b"in")
    assert (result.exit_code, result.stdout, result.stderr) == (5, b"in", b"err\n")


def test_local_runner_timeout_kills_setsid_children():
    marker = f"sleep 77{int(time.time()) % 1000}"
    result = local(["bash", "-c", f"setsid {marker} & {marker}"], timeout=0.5)
    assert result.timed_out and result.exit_code == 124
    time.sleep(0.1)
    assert (
        marker
        not in subprocess.run(
            ["ps", "-eo", "args"], capture_output=True, text=True, check=False
        ).stdout
    )


def test_local_runner_missing_command_and_signal():
    assert local(["no-such-command-xyz"]).exit_code == 127
    killed = local(["bash", "-c", "kill -TERM $$"])
    assert (killed.exit_code, killed.signal) == (143, 15)


def test_local_runner_caps_output():
    result = local(["bash", "-c", "head -c 100000 /dev/zero"], limit=1000)
    assert result.truncated["stdout"] and result.totals["stdout"] == 100000
    assert len(result.stdout) < 1100
