"""The channel's deadlines with a fake agent: one overdue command never resets the others,
and the budget's stages nest (each bound larger than what it waits for)."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stigmer_sandbox.runtime.backends.base import STDOUT
from stigmer_sandbox.runtime.client import channel
from stigmer_sandbox.runtime.client.channel import AgentChannel
from stigmer_sandbox.runtime.client.commands import Request
from stigmer_sandbox.runtime.guest import protocol as deadlines

DONE = {
    "type": "done",
    "exit_code": 0,
    "signal": None,
    "timed_out": False,
    "oom_killed": False,
    "oom_overlap": [],
    "duration_s": 0.0,
    "error": None,
    "stdout": {"tail": "", "dropped": 0, "total": 0},
    "stderr": {"tail": "", "dropped": 0, "total": 0},
}


class FakeAgentStream:
    """Beats every 50 ms; answers pings, and every command except those whose argv[0] is
    "hang", which it never answers (while it keeps beating)."""

    def __init__(self) -> None:
        self.frames: queue.Queue[bytes | None] = queue.Queue()
        self.requests: list[dict[str, Any]] = []
        self.closed = threading.Event()
        threading.Thread(target=self._beat, daemon=True).start()

    def _beat(self) -> None:
        while not self.closed.wait(0.05):
            self.frames.put(b'{"id":0,"type":"beat"}\n')

    def send(self, data: bytes) -> None:
        for line in data.splitlines():
            request = json.loads(line)
            if not isinstance(request, dict):  # the sources, sent first
                continue
            self.requests.append(request)
            if request["op"] == "ping":
                self._answer({"id": request["id"], "type": "pong", "pid": 7})
            elif request["op"] == "exec" and request["argv"][0] != "hang":
                self._answer({**DONE, "id": request["id"]})

    def _answer(self, message: dict[str, Any]) -> None:
        self.frames.put(json.dumps(message).encode() + b"\n")

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        while (data := self.frames.get()) is not None:
            yield STDOUT, data

    def shutdown(self) -> None:
        self.closed.set()
        self.frames.put(None)


class FakeBackend:
    def __init__(self) -> None:
        self.stream = FakeAgentStream()

    def open_agent(self, _sandbox_id: str, _argv: list[str]) -> FakeAgentStream:
        return self.stream

    def is_paused(self, _sandbox_id: str) -> bool:
        return False

    def run_root(self, _sandbox_id: str, _argv: list[str], **_options: Any) -> tuple[int, bytes]:
        return 0, b""


def request(argv: list[str], cid: str) -> Request:
    return Request(argv=argv, env={}, cwd="/", timeout=0.2, limit=100, cid=cid)


def test_an_overdue_command_comes_back_lost_alone_and_is_cancelled(monkeypatch):
    monkeypatch.setattr(channel, "HOST_GRACE_S", 0.3)
    backend = FakeBackend()
    agent = AgentChannel("fake", (1000, 1000), max_line=1 << 20, backend=backend)
    try:
        agent.ping()
        started = time.monotonic()
        overdue = agent.run(request(["hang"], "c-hang"))
        assert time.monotonic() - started < 3
        assert overdue.exit_code is None
        assert overdue.error and "hard deadline" in overdue.error and "cancelled" in overdue.error
        assert agent.alive  # the heartbeat kept coming: no reset, nothing else lost
        assert agent.run(request(["true"], "c-next")).exit_code == 0
        cancels = [r for r in backend.stream.requests if r["op"] == "cancel"]
        assert [r["cid"] for r in cancels] == ["c-hang"]
    finally:
        agent.close()


def test_a_silent_agent_is_still_reset_at_the_deadline(monkeypatch):
    monkeypatch.setattr(channel, "HOST_GRACE_S", 0.3)
    backend = FakeBackend()
    agent = AgentChannel("fake", (1000, 1000), max_line=1 << 20, backend=backend)
    agent.ping()
    backend.stream.closed.set()  # no more beats
    time.sleep(2 * 1.0 + 1.2)  # past the heartbeat window
    try:
        agent.run(request(["hang"], "c-silent"))
    except channel.AgentLost as lost:
        assert "hard deadline" in str(lost)
    else:
        raise AssertionError("a silent agent's overdue command must reset the channel")
    assert not agent.alive


def test_the_budget_nests():
    """Each stage waits longer than everything inside it: helper < agent backstop < host."""
    assert deadlines.KILL_GRACE_S < deadlines.BACKSTOP_AFTER_S
    assert deadlines.KILL_GRACE_S < deadlines.BACKSTOP_WAIT_S
    assert deadlines.BACKSTOP_AFTER_S + deadlines.BACKSTOP_WAIT_S < deadlines.HOST_GRACE_S
    assert deadlines.KILL_GRACE_S < deadlines.KILL_WAIT_S
    assert channel.HOST_GRACE_S == deadlines.HOST_GRACE_S


def test_the_agent_gets_the_budget_with_its_sources():
    assert channel.AGENT_SOURCES[0] == Path(deadlines.__file__).read_text(encoding="utf-8")
