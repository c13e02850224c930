"""Issue 20 on a real engine: hostile commands the channel must survive truthfully.

A zombie leader whose threads live, four 64 MiB results at once, a full /tmp and a full
workspace, a `docker pause` and a `docker restart` with 32 commands in flight, and a
background process killed by the OOM killer. Each test checks what the host reports, that
nothing the command started survives, and that the sandbox serves the next command.
"""

from __future__ import annotations

import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from stigmer_sandbox.runtime import Sandbox
from stigmer_sandbox.runtime.client.channel import LIVENESS_S
from stigmer_sandbox.runtime.guest.protocol import HOST_GRACE_S

from .conftest import TEST_LABELS
from .test_runtime import make_sandbox, settings_in

# The main thread calls pthread_exit while a thread sleeps: the leader shows 'Z' in
# /proc/PID/stat, yet the process lives and holds its pid until the thread ends.
ZOMBIE_LEADER = (
    "import ctypes, os, threading, time; "
    "threading.Thread(target=time.sleep, args=(1000,)).start(); "
    "print(os.getpid(), flush=True); ctypes.CDLL(None).pthread_exit(None)"
)
BIG = 64 << 20


@pytest.fixture(scope="module")
def box(tmp_path_factory, docker_engine):
    """One hardened sandbox for the attacks that leave it usable."""
    tmp = tmp_path_factory.mktemp("hostile")
    with make_sandbox(tmp, memory="1g", tmp_size="64m") as sandbox:
        yield sandbox


def is_alive(box: Sandbox, pid: int) -> bool:
    """Whether pid (in the sandbox) still exists, as any state."""
    return box.exec(["test", "-d", f"/proc/{pid}"]).exit_code == 0


def first_pid(text: str) -> int:
    return int(text.split(maxsplit=1)[0])


# --- a zombie leader with live threads (defect 1) ---------------------------------------


def test_a_zombie_leader_left_behind_ends_with_the_command_at_once(box):
    command = f"python3 -c '{ZOMBIE_LEADER}' & sleep 0.5; grep '^State' /proc/$!/status"
    result = box.exec(command, timeout=60)
    assert "zombie" in result.stdout, "the leader never became a zombie with a live thread"
    assert (result.exit_code, result.cause, result.error) == (0, "exit", None)
    assert result.duration_s < 3  # was 10.7 s and "processes survived SIGKILL"
    assert not is_alive(box, first_pid(result.stdout))


def test_a_zombie_leader_times_out_truthfully_and_touches_no_other_command(box):
    agent_before = box.connection.channel.agent_pid if box.connection.channel else None
    with ThreadPoolExecutor(max_workers=1) as pool:
        other = pool.submit(box.exec, "sleep 4; echo other", timeout=60)
        time.sleep(0.3)
        started = time.monotonic()
        result = box.exec(["python3", "-c", ZOMBIE_LEADER], timeout=2)
        elapsed = time.monotonic() - started
        bystander = other.result()
    assert (result.exit_code, result.cause, result.error) == (124, "timeout", None)
    assert elapsed < 2 + 3  # was `lost` after 13 s, with a false note
    assert (bystander.exit_code, bystander.stdout) == (0, "other\n")
    assert (
        box.connection.channel is not None and box.connection.channel.agent_pid == agent_before
    )  # no reset
    assert not is_alive(box, first_pid(result.stdout))


def test_killing_a_background_zombie_leader_ends_it(box):
    process = box.start(["python3", "-c", ZOMBIE_LEADER])
    deadline = time.monotonic() + 10
    while not process.output().stdout and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = first_pid(process.output().stdout)
    started = time.monotonic()
    ended = process.kill()
    assert time.monotonic() - started < 3  # was 10+ s
    assert ended.error is None and not process.running
    assert not is_alive(box, pid)


# --- big results do not hold a small one back (defect 2) --------------------------------


def test_four_64_mib_results_do_not_hold_back_a_small_command(box):
    """The regression guard: `BENCHMARKS.md` has the figure (goal 200 ms); before the fix a
    concurrent `echo hi` waited 5.7 s behind one 86 MB answer."""
    big = f"head -c {BIG} /dev/zero | tr '\\0' x; echo; head -c {BIG} /dev/zero | tr '\\0' y"
    busy = threading.Event()
    busy.set()
    waits: list[float] = []

    def probe() -> None:
        while busy.is_set():
            started = time.monotonic()
            assert box.exec("echo hi").stdout == "hi\n"
            waits.append(time.monotonic() - started)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(lambda _i: box.exec(big, output_limit=BIG), range(4)))
    finally:
        busy.clear()
        prober.join()
    for result in results:
        assert result.exit_code == 0 and result.output_bytes["stdout"] == 2 * BIG + 1
        assert result.stdout.startswith("x" * 1000) and result.stdout.endswith("y" * 1000)
        assert len(result.stdout.encode()) < BIG + 200 and result.truncated["stdout"]
    assert len(waits) >= 5 and max(waits) < 2.0


# --- full disks ------------------------------------------------------------------------


def test_a_full_tmp_fails_only_the_command_that_filled_it(box):
    filled = box.exec("head -c 100M /dev/zero > /tmp/fill", timeout=60)
    assert filled.exit_code != 0 and "No space left" in filled.stderr
    assert box.exec("echo next").stdout == "next\n"
    session = box.session("after-full-tmp")
    assert session.exec("cd /tmp && export A=1").exit_code == 0
    assert session.exec('echo "$PWD $A"').stdout == "/tmp 1\n"
    background = box.start("echo from-the-background")
    assert background.wait(30).stdout == "from-the-background\n"
    box.exec("rm -f /tmp/fill")


@pytest.fixture
def small_workspace(tmp_path):
    """A 16 MiB tmpfs on the host as the workspace: a full disk without filling this one."""
    folder = tmp_path / "workspace"
    folder.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,uid=1000,gid=1000,mode=0755", "tmpfs", folder],
        check=True,
    )
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", folder], check=False)


def test_a_full_workspace_fails_only_what_wrote_to_it(small_workspace, tmp_path, docker_engine):
    settings = settings_in(tmp_path, workspace=str(small_workspace))
    with Sandbox.create_ephemeral(settings, extra_labels=TEST_LABELS) as full:
        filled = full.exec("head -c 40M /dev/zero > /workspace/fill", timeout=60)
        assert filled.exit_code != 0 and "No space left" in filled.stderr
        assert full.exec("echo next").stdout == "next\n"
        answers = full.upload_files([("/workspace/more.bin", b"z" * (1 << 20))])
        assert answers[0].error is not None  # an answer per file, never an exception
        full.exec("rm -f /workspace/fill")
        assert full.upload_files([("/workspace/more.bin", b"z")])[0].error is None


# --- the container paused or restarted with 32 commands in flight -----------------------


def while_in_flight(box: Sandbox, command: str, count: int, timeout: float, disturb) -> list:
    """The results of `count` commands (`command` formatted with `i`) run at once, with
    `disturb(container)` done once they all run."""
    box.exec("true")
    container = box.find()
    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [
            pool.submit(box.exec, command.format(i=i), timeout=timeout) for i in range(count)
        ]
        time.sleep(1.5)
        disturb(container)
        return [future.result() for future in futures]


def paused_for(seconds: float):
    def disturb(container) -> None:
        container.pause()
        time.sleep(seconds)
        container.unpause()

    return disturb


def test_a_docker_pause_with_32_commands_in_flight_loses_none(tmp_path, docker_engine):
    with make_sandbox(tmp_path) as paused:
        # Silence past the watchdog's window: a pause is not a dead agent.
        results = while_in_flight(paused, "sleep 2; echo {i}", 32, 120, paused_for(LIVENESS_S + 2))
        for i, result in enumerate(results):
            assert (result.exit_code, result.cause, result.stdout) == (0, "exit", f"{i}\n")
        assert paused.exec("echo after").stdout == "after\n"


def test_a_timeout_that_passes_during_a_pause_is_told_as_a_timeout(tmp_path, docker_engine):
    with make_sandbox(tmp_path) as paused:
        # Paused past the host's deadline for each of them.
        results = while_in_flight(paused, "sleep 30", 8, 3, paused_for(HOST_GRACE_S + 2))
        assert {(r.exit_code, r.cause) for r in results} == {(124, "timeout")}
        assert "sleep 30" not in paused.exec("ps -eo args").stdout


def test_a_docker_restart_with_32_commands_in_flight_reports_each_lost(tmp_path, docker_engine):
    with make_sandbox(tmp_path) as restarted:
        started = time.monotonic()
        results = while_in_flight(
            restarted, "sleep 60", 32, 120, lambda container: container.restart(timeout=1)
        )
        assert time.monotonic() - started < 30  # told when the stream ended, not at 60 s
        for result in results:
            assert (result.exit_code, result.cause) == (None, "lost")
            assert result.error and "agent" in result.error
        audit = restarted.audit.tail(40)
        assert sum(1 for entry in audit if entry.get("cause") == "lost") == 32
        assert restarted.exec("echo after").stdout == "after\n"
        assert "sleep 60" not in restarted.exec("ps -eo args").stdout


# --- a background process killed by the OOM killer (left open) ---------------------------


def test_an_oom_killed_background_process_is_reported_as_oom(tmp_path, docker_engine):
    with make_sandbox(tmp_path, memory="256m") as small:
        hog = small.start('python3 -c "b = bytearray(512 * 1024 * 1024)"')
        result = hog.wait(60)
        assert result.oom_killed and result.cause == "oom", result
        assert small.exec("echo alive").stdout == "alive\n"
