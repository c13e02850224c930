"""The Docker backend's pure logic: a root exec's exit code once its output stream ended."""

from __future__ import annotations

from stigmer_sandbox.runtime.backends import docker


class Engine:
    """`exec_inspect` answers from a script of states, the last repeated."""

    def __init__(self, *states: dict) -> None:
        self.states = list(states)

    def exec_inspect(self, exec_id: str) -> dict:
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]


def test_an_exec_still_running_when_its_stream_ended_is_waited_for(monkeypatch):
    monkeypatch.setattr(docker.time, "sleep", lambda _s: None)
    api = Engine({"Running": True, "ExitCode": None}, {"Running": False, "ExitCode": 3})
    assert docker._exit_code(api, "e1") == 3


def test_an_exec_that_never_ends_is_a_failure_not_a_traceback(monkeypatch):
    monkeypatch.setattr(docker.time, "sleep", lambda _s: None)
    assert docker._exit_code(Engine({"Running": True, "ExitCode": None}), "e1", wait_s=0.0) == -1
