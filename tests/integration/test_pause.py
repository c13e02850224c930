"""Issue 23 (pause that keeps memory) on the real engine: a paused sandbox runs nothing and
keeps everything; resumed, a background process answers with the counter it held in
memory, a session carries on, and the agent channel that waited is still the same one.
`up()` resumes a paused sandbox; the CLI pauses and resumes; a pool can keep its waiting
sandboxes paused and hands them out running.
"""

from __future__ import annotations

import time

import pytest

from stigmer_sandbox.runtime import Sandbox, SandboxPool
from stigmer_sandbox.runtime.client.channel import LIVENESS_S

from ..conftest import run_inv
from .conftest import TEST_LABELS, wait_for
from .test_runtime import make_sandbox, settings_in
from .test_sessions import inv_env, one_error_line

# A process that holds a counter in memory and answers each connection with the next
# value; it also touches a file every 50 ms, which shows whether it is running.
COUNTER = """
import os, socket, threading, time
def beat():
    while True:
        with open('/workspace/.beat', 'w') as f: f.write(str(time.monotonic()))
        time.sleep(0.05)
threading.Thread(target=beat, daemon=True).start()
count = 0
server = socket.create_server(('127.0.0.1', 7070))
while True:
    conn, _ = server.accept()
    count += 1
    conn.sendall(str(count).encode()); conn.close()
"""
ASK = (
    'python3 -c "import socket; '
    "print(socket.create_connection(('127.0.0.1', 7070)).recv(9).decode())\""
)


@pytest.fixture(scope="module")
def box(tmp_path_factory, docker_engine):
    with make_sandbox(tmp_path_factory.mktemp("pause")) as sandbox:
        sandbox.start(["python3", "-c", COUNTER])
        assert wait_for(lambda: sandbox.exec(ASK).exit_code == 0)
        yield sandbox


def beat(box: Sandbox) -> str:
    """What the counter process last wrote, read on the host (the workspace is a host
    folder): no command has to run in the sandbox for it."""
    return (box.settings.path("workspace") / ".beat").read_text()


def test_a_paused_sandbox_runs_nothing_and_resumes_with_its_memory(box):
    before = int(box.exec(ASK).stdout)
    session = box.session("paused")
    session.exec("export KEPT=yes; cd /tmp")
    assert box.pause() is True
    assert box.is_paused and box.status()["state"] == "paused"
    assert box.pause() is False  # paused already
    frozen = box.find().attrs["State"]
    channel = box.connection.channel
    # Longer than the heartbeat's silence that means death: a pause is not death.
    time.sleep(LIVENESS_S + 2)
    assert box.resume() is True and not box.is_paused
    assert box.resume() is False
    stamp = beat(box)
    assert int(box.exec(ASK).stdout) == before + 1  # the same process, its memory kept
    assert session.exec('printf "%s|%s" "$KEPT" "$PWD"').stdout == "yes|/tmp"
    assert frozen["Paused"] and box.connection.channel is channel and channel.alive
    assert wait_for(lambda: beat(box) != stamp)  # it runs again


def test_nothing_runs_while_paused(box):
    box.pause()
    try:
        time.sleep(0.3)
        stamp = beat(box)
        time.sleep(0.5)
        assert beat(box) == stamp
    finally:
        box.resume()
    assert wait_for(lambda: beat(box) != stamp)


def test_up_resumes_a_paused_sandbox(box):
    box.pause()
    box.up()
    assert not box.is_paused
    assert any("was paused; resumed" in note for note in box.notes)
    assert box.exec("true").exit_code == 0


def test_the_cli_pauses_and_resumes_and_says_so(box):
    env = inv_env(box)
    paused = run_inv("sandbox.pause", env=env)
    assert paused.returncode == 0 and "paused" in paused.stdout
    assert "paused already" in run_inv("sandbox.pause", env=env).stdout
    resumed = run_inv("sandbox.resume", env=env)
    assert resumed.returncode == 0 and "resumed" in resumed.stdout
    assert "not paused" in run_inv("sandbox.resume", env=env).stdout
    assert box.exec("true").exit_code == 0


def test_pausing_a_sandbox_that_does_not_exist_is_one_line(tmp_path):
    env = {"INVOKE_STIGMER_CONTAINER_NAME": "stigmer-no-such-sandbox-for-pause"}
    done = run_inv("sandbox.pause", env=env)
    assert done.returncode != 0 and one_error_line(done.stderr)
    assert "does not exist" in done.stderr


def test_a_pool_keeps_its_waiting_sandboxes_paused_and_hands_them_out_running(tmp_path):
    settings = settings_in(tmp_path)
    with SandboxPool(1, settings=settings, extra_labels=TEST_LABELS, pause_idle=True) as pool:
        pool.wait_ready()
        waiting = pool._ready[0]
        assert waiting.is_paused
        box = pool.acquire()
        assert box is waiting and not box.is_paused
        assert box.exec("echo ok").stdout == "ok\n"
        pool.release(box)
        assert pool.wait_ready() and pool._ready[0].is_paused
    assert pool.ready == 0
