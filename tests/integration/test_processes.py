"""Issue 13 on a real engine: background processes.

A server started now is reached by later commands, listed, read, reattached and killed
from another host process (or the CLI), outlives the host process that started it, and
ends with its whole tree. Commands in the sandbox cannot reach a process through its
root-only record, and a hundred started and killed leave neither processes nor an
unbounded pile of records behind. `inv sandbox.output --follow` writes the very bytes the
process printed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from stigmer_sandbox.errors import SandboxError, UsageError
from stigmer_sandbox.runtime import Sandbox
from stigmer_sandbox.runtime.guest.keeper import KEEP_ENDED

from ..conftest import ROOT
from .conftest import wait_for
from .test_runtime import make_sandbox
from .test_sessions import another_process, inv_env, one_error_line


@pytest.fixture(scope="module")
def box(tmp_path_factory, docker_engine):
    """One sandbox with the default settings of `make_sandbox` (so `inv` and a second
    host process find the very same container), shared by this module's processes."""
    tmp = tmp_path_factory.mktemp("processes")
    with make_sandbox(tmp) as sandbox:
        sandbox.container_id = sandbox.inspect()["Id"]
        yield sandbox


def serves(box: Sandbox, port: int) -> bool:
    """Whether a later command reaches an HTTP server on `port`."""
    probe = box.exec(f"curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{port}/")
    return probe.stdout == "200"


def server(port: int) -> str:
    return f"python3 -m http.server {port} --bind 127.0.0.1"


def running_args(box: Sandbox) -> str:
    return box.exec("ps -eo args").stdout


def test_a_background_server_is_reached_by_later_commands_and_listed(box):
    process = box.start(server(18001))
    try:
        assert wait_for(lambda: serves(box, 18001)), process.output()
        listed = {p["id"]: p for p in box.processes()}
        assert listed[process.id]["running"] is True
        assert listed[process.id]["command"] == server(18001)
        # The keeper records output as it grows (every 0.1 s at most).
        assert wait_for(lambda: "Serving HTTP on 127.0.0.1 port 18001" in process.output().stdout)
        assert wait_for(lambda: '"GET / HTTP/1.1" 200' in process.output().stderr)  # its log
    finally:
        process.kill()
    assert not serves(box, 18001)


def test_another_host_process_reattaches_reads_and_kills_it(box):
    process = box.start("echo ready-to-serve; " + server(18002))
    assert wait_for(lambda: serves(box, 18002))
    code = (
        f"again = box.process({process.id!r})\n"
        "print(again.command)\n"
        "print(again.output().stdout.splitlines()[0])\n"
        "result = again.kill()\n"
        "print(result.exit_code, result.cause)\n"
    )
    other = another_process(box, code)
    assert other.returncode == 0, other.stderr
    command, first_line, ended = other.stdout.splitlines()
    assert command == process.command and first_line == "ready-to-serve"
    assert ended == "137 signal"
    state = process.status()
    assert (state["running"], state["killed"]) == (False, True)
    assert not serves(box, 18002)
    assert box.inspect()["Id"] == box.container_id  # the other process recreated nothing


def test_kill_ends_the_whole_tree_including_a_setsid_grandchild(box):
    mark = f"7{uuid.uuid4().int % 10**6:06d}"
    process = box.start(f"(setsid sh -c 'sleep {mark} & wait' &); exec " + server(18003))
    assert wait_for(lambda: serves(box, 18003))
    assert wait_for(lambda: f"sleep {mark}" in running_args(box))
    result = process.kill()
    assert (result.exit_code, result.cause) == (137, "signal"), result
    left = running_args(box)  # the very next command: nothing of the tree is left
    assert f"sleep {mark}" not in left and "http.server 18003" not in left, left
    assert box.exec(f"pgrep -f '[s]leep {mark}|[h]ttp.server 18003'").exit_code == 1


def test_a_process_outlives_the_host_process_that_started_it(box):
    other = another_process(box, f"print(box.start({server(18004)!r}).id)")
    assert other.returncode == 0, other.stderr
    process = box.process(other.stdout.strip())
    try:
        assert wait_for(lambda: serves(box, 18004)), process.status()
        assert process.running and process.command == server(18004)
    finally:
        process.kill()


def test_write_answers_a_question_and_wait_times_out_until_the_end(box):
    process = box.start("read name; echo hello $name")
    with pytest.raises(TimeoutError, match=process.id):
        process.wait(timeout=0.5)
    assert process.running
    assert process.write("world\n") == 6
    result = process.wait(timeout=15)
    assert (result.exit_code, result.cause, result.stdout) == (0, "exit", "hello world\n")
    assert result.command_id == process.id
    with pytest.raises(SandboxError, match="has ended"):
        process.write("too late\n")


def test_wait_returns_the_exit_code_and_output_of_an_ended_process(box):
    process = box.start("echo to-out; echo to-err >&2; exit 5")
    result = process.wait(timeout=15)
    assert (result.exit_code, result.cause) == (5, "exit"), result
    assert (result.stdout, result.stderr) == ("to-out\n", "to-err\n")
    assert process.wait(timeout=0).exit_code == 5  # and again, from the record


def test_a_background_timeout_ends_the_process(box):
    result = box.start("echo started; sleep 60", timeout=1).wait(timeout=20)
    assert (result.exit_code, result.cause, result.stdout) == (124, "timeout", "started\n")


def test_background_output_is_bounded_with_a_marker(box):
    process = box.start("head -c 100000 /dev/zero | tr '\\0' a; echo; echo end", output_limit=1000)
    result = process.wait(timeout=15)
    assert result.output_bytes["stdout"] == 100005 and result.truncated["stdout"]
    assert "bytes truncated by stigmer-sandbox" in result.stdout
    assert result.stdout.endswith("end\n") and len(result.stdout) < 1100


def test_an_unknown_or_malformed_id_is_one_clear_error(box):
    for bad in ("0123456789ab", "../../etc/x", "nope", ""):
        with pytest.raises(UsageError, match="no background process"):
            box.process(bad)


# -- hostile commands ----------------------------------------------------------------------


def test_a_command_cannot_read_write_or_kill_a_process_through_its_record(box):
    mark = f"8{uuid.uuid4().int % 10**6:06d}"
    process = box.start(f"echo private-output; read line; echo got $line; sleep {mark}")
    try:
        assert wait_for(lambda: "private-output" in process.output().stdout)
        keeper = next(p for p in box.processes() if p["id"] == process.id)["keeper_pid"]
        folder = f"/run/stigmer/procs/{process.id}"
        attack = box.exec(
            f"ls /run/stigmer/procs; cat {folder}/state.json; echo forged > {folder}/stdin; "
            f"kill -TERM {keeper}; kill -KILL {keeper}; "
            f"grep -rsl private-output /run /tmp /workspace /dev/shm; echo done"
        )
        assert attack.stdout == "done\n", attack
        assert attack.stderr.count("Permission denied") == 3, attack.stderr
        assert attack.stderr.count("Operation not permitted") == 2, attack.stderr
        assert process.running
        process.write("real\n")
        assert wait_for(lambda: "got real" in process.output().stdout), process.output()
        assert "forged" not in process.output().stdout
    finally:
        process.kill()


def test_a_hundred_processes_leave_nothing_behind_and_old_records_are_pruned(box, docker_engine):
    # The sandbox user's processes and the root keepers (agents of other tests come and go).
    count = "ps -eo user,args --no-headers | grep -cE '^sandbox|keeper [0-9a-f]{12}$'"
    baseline = int(box.exec(count).stdout)
    started = []
    for batch in range(4):
        group = [box.start(f"sleep 70{batch}{n:02d}") for n in range(25)]
        assert wait_for(lambda g=group: all(p.status().get("pid") for p in g))
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda p: p.kill(), group))
        assert {r.cause for r in results} == {"signal"}, results
        started += group
    assert box.exec("pgrep -f '^sleep 70[0-9]{3}$'").exit_code == 1
    assert wait_for(lambda: int(box.exec(count).stdout) <= baseline), running_args(box)
    box.start("true").wait(timeout=15)  # starting prunes the oldest ended records
    listed = box.processes()
    ended = [p for p in listed if not p["running"]]
    assert len(ended) <= KEEP_ENDED + 1, len(ended)
    ids = {p["id"] for p in listed}
    kept = ids & {p.id for p in started}
    # Pruning keeps the records that ended last: some of the last batch (killed last, in
    # parallel), none of the older batches.
    assert kept <= {p.id for p in started[-25:]} and len(kept) == KEEP_ENDED - 1, kept
    with pytest.raises(UsageError):
        box.process(started[0].id)
    container = docker_engine.containers.get(box.name)
    code, folders = container.exec_run(["ls", "/run/stigmer/procs"], user="0")
    assert code == 0 and len(folders.split()) == len(listed)  # gone from the tmpfs too


# -- the CLI -------------------------------------------------------------------------------


def test_inv_run_background_ps_output_and_kill(box, inv):
    env = inv_env(box)
    started = inv("run", "--background", "echo cli-output; sleep 3005", env=env)
    assert started.returncode == 0, started.stderr
    process_id = started.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{12}", process_id), started.stdout
    listed = inv("sandbox.ps", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    mine = [p for p in json.loads(listed.stdout) if p["id"] == process_id]
    assert mine and mine[0]["running"] and "sleep 3005" in mine[0]["command"]
    assert wait_for(lambda: box.process(process_id).output().stdout == "cli-output\n")
    printed = inv("sandbox.output", process_id, env=env)
    assert (printed.returncode, printed.stdout) == (0, "cli-output\n"), printed.stderr
    killed = inv("sandbox.kill", process_id, env=env)
    assert killed.returncode == 0 and process_id in killed.stdout, killed.stderr
    assert box.process(process_id).status()["killed"] is True
    assert "sleep 3005" not in running_args(box)
    assert box.inspect()["Id"] == box.container_id  # the CLI used this very container


# Bytes that are not UTF-8 and characters of 2, 3 and 4 bytes, to be written a few at a
# time so that the polls of `--follow` cut through them.
ODD_BYTES = b"a\xff\xfe" + "é€😀ü".encode() * 3 + b"\xc3 end\n"
DRIP = (
    "import sys, time\n"
    "data, out = bytes.fromhex(sys.argv[1]), getattr(sys, sys.argv[2]).buffer\n"
    "for i in range(0, len(data), 2):\n"
    "    out.write(data[i:i + 2]); out.flush(); time.sleep(0.09)\n"
)


def follow(box: Sandbox, process_id: str) -> subprocess.CompletedProcess[bytes]:
    """`inv sandbox.output --follow`, its output as bytes."""
    return subprocess.run(
        [sys.executable, "-m", "invoke", "sandbox.output", "--follow", process_id],
        cwd=ROOT,
        env={**os.environ, "NO_COLOR": "1", **inv_env(box)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
        check=False,
    )


def test_follow_writes_exactly_the_bytes_the_process_printed(box):
    drip = f"python3 -c {shlex.quote(DRIP)} {ODD_BYTES.hex()}"
    process = box.start(f"{drip} stdout & {drip} stderr; wait")
    followed = follow(box, process.id)
    assert followed.returncode == 0, followed.stderr
    assert (followed.stdout, followed.stderr) == (ODD_BYTES, ODD_BYTES)


def test_follow_says_how_many_bytes_it_could_not_show(box):
    quick = "head -c 3000 /dev/zero | tr '\\0' a; sleep 1; printf tail-end"
    process = box.start(quick, output_limit=1000)
    followed = follow(box, process.id)
    assert followed.returncode == 0, followed.stderr
    dropped = sum(map(int, re.findall(rb"(\d+) bytes were dropped here", followed.stderr)))
    assert dropped > 0 and len(followed.stdout) + dropped == 3008
    assert followed.stdout == b"a" * (len(followed.stdout) - 8) + b"tail-end"


@pytest.mark.parametrize("task", ["sandbox.output", "sandbox.kill"])
@pytest.mark.parametrize("bad", ["0123456789ab", "../../etc/passwd", "nope"])
def test_inv_refuses_an_unknown_process_id_in_one_line(box, inv, task, bad):
    refused = inv(task, bad, env=inv_env(box))
    assert refused.returncode != 0
    assert one_error_line(refused.stderr) and "no background process" in refused.stderr
    assert refused.stdout == ""


def test_a_keeper_killed_from_outside_settles_as_lost_not_running_for_ever(box, docker_engine):
    process = box.start("sleep 600")
    assert wait_for(lambda: process.status().get("keeper_pid"))
    keeper_pid = process.status()["keeper_pid"]
    container = docker_engine.containers.get(box.name)
    container.exec_run(["kill", "-9", str(keeper_pid)], user="0")  # e.g. the OOM killer
    result = process.wait(timeout=15)
    assert result.exit_code is None and result.cause == "lost"
    assert "keeper" in (result.error or "")
    assert box.exec("pgrep -x sleep -a | grep -c 'sleep 600' || true").stdout.strip() == "0"
