"""The agent's small pieces on a command's path: the helper's status read with plain reads
(bounded, the fd always closed) and the environment told to a warm helper."""

from __future__ import annotations

import contextlib
import os
import threading

import pytest

from stigmer_sandbox.runtime.guest import agent


def status_pipe(data: bytes) -> int:
    """The read end of a pipe that holds `data` and then EOF."""
    read, write = os.pipe()

    def fill() -> None:
        with contextlib.suppress(OSError):  # a bounded reader closes its end early
            os.write(write, data)
        os.close(write)

    threading.Thread(target=fill).start()
    return read


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def test_a_status_line_is_read_whole_and_its_fd_closed():
    line = b'{"exit_code": 3, "signal": null, "timed_out": false, "error": null}\n'
    fd = status_pipe(line)
    assert agent.read_status(fd, 3) == {
        "exit_code": 3,
        "signal": None,
        "timed_out": False,
        "error": None,
    }
    assert closed(fd)


def test_a_status_arriving_in_pieces_is_joined():
    read, write = os.pipe()

    def pieces() -> None:
        for part in (b'{"exit_code"', b": 0}", b"\n"):
            os.write(write, part)
        os.close(write)

    threading.Thread(target=pieces).start()
    assert agent.read_status(read, 0)["exit_code"] == 0


@pytest.mark.parametrize(("returncode", "code", "signal"), [(-9, 137, 9), (5, 5, None)])
def test_a_helper_that_said_nothing_is_reported_as_such(returncode, code, signal):
    fd = status_pipe(b"")
    status = agent.read_status(fd, returncode)
    assert (status["exit_code"], status["signal"]) == (code, signal)
    assert "without a status" in status["error"]
    assert closed(fd)


def test_a_status_read_is_bounded():
    fd = status_pipe(b" " * 70000 + b'{"exit_code": 0}')  # more than any honest status
    status = agent.read_status(fd, 0)
    assert "without a status" in status["error"]
    assert closed(fd)


def test_the_environment_is_told_as_env_arguments_in_order():
    data = agent.env_spec({"A": "1", "B": "x=y", "C": ""})
    assert data == b"--env\0A=1\0--env\0B=x=y\0--env\0C=\0"


@pytest.mark.parametrize("name", ["", "A=B"])
def test_a_name_popen_refuses_is_refused(name):
    with pytest.raises(ValueError, match="illegal environment variable name"):
        agent.env_spec({name: "1"})


def test_a_nul_in_the_environment_is_refused():
    with pytest.raises(ValueError, match="embedded null byte"):
        agent.env_spec({"A": "x\0y"})
