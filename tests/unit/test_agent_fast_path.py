"""The agent's fast path: the outbox's direct write, the OOM counter kept open, and the
kill of a background process that waits for its final record by the file's identity."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

from stigmer_sandbox.runtime.guest import agent, keeper


class SlowSink(io.RawIOBase):
    """A stream that takes each write slowly and remembers them, in order."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.lock = threading.Lock()
        self.busy = 0
        self.overlapped = False

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        with self.lock:
            self.busy += 1
            self.overlapped |= self.busy > 1
        time.sleep(0.0005)
        with self.lock:
            self.frames.append(bytes(data))
            self.busy -= 1
        return len(data)


def test_every_frame_arrives_whole_once_in_order_per_request_one_writer_at_a_time():
    sink = SlowSink()
    outbox = agent.Outbox(sink)  # type: ignore[arg-type]
    per_key = 40

    def produce(key: int) -> None:
        for n in range(per_key):
            outbox.put(key, f"{key}:{n}\n".encode())

    producers = [threading.Thread(target=produce, args=(key,)) for key in range(1, 9)]
    for thread in producers:
        thread.start()
    for thread in producers:
        thread.join()
    deadline = time.monotonic() + 10
    while len(sink.frames) < 8 * per_key and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not sink.overlapped
    assert len(sink.frames) == 8 * per_key
    for key in range(1, 9):
        mine = [f for f in sink.frames if f.startswith(f"{key}:".encode())]
        assert mine == [f"{key}:{n}\n".encode() for n in range(per_key)]


def test_a_quiet_outbox_writes_on_the_producer_thread():
    written_by: list[str] = []

    class Sink(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data) -> int:  # type: ignore[override]
            written_by.append(threading.current_thread().name)
            return len(data)

    outbox = agent.Outbox(Sink())  # type: ignore[arg-type]
    outbox.put(7, b"done\n")
    assert written_by == [threading.current_thread().name]


def test_the_oom_counter_is_read_again_from_the_open_file(tmp_path: Path):
    v1 = tmp_path / "memory.oom_control"
    v1.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    counter = agent.OomCounter([str(tmp_path / "missing"), str(v1)])
    assert counter.read() == 3
    with open(v1, "r+") as handle:  # rewritten in place, as the kernel's file changes
        handle.write("oom_kill_disable 0\nunder_oom 0\noom_kill 4\n")
    assert counter.read() == 4
    v2 = tmp_path / "memory.events"
    v2.write_text("low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n")
    assert agent.OomCounter([str(v2)]).read() == 1
    assert agent.OomCounter([str(tmp_path / "missing")]).read() is None
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"oom_kill x\n\xff")
    assert agent.OomCounter([str(garbage)]).read() is None


def test_a_replaced_record_has_another_identity(tmp_path: Path):
    path = str(tmp_path / "state.json")
    assert keeper.file_identity(path) is None
    keeper.write_json(path, {"running": True})
    first = keeper.file_identity(path)
    keeper.write_json(path, {"running": True})
    assert keeper.file_identity(path) not in (None, first)


def test_a_pid_that_is_no_keeper_is_never_signalled():
    """This test process is not a keeper: the handle refuses to signal it, and says at once
    that there is no keeper to wait for."""
    handle = keeper.KeeperHandle.open(os.getpid(), "0123456789ab")
    try:
        handle.terminate()  # would end this test run if it signalled
        assert handle.wait(0.001) is True
    finally:
        handle.close()
