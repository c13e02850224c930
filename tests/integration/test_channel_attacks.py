"""Issue 11 on a real engine: every command is hostile, and the host still tells the truth.

Each test runs what a prompt-injected command would really try (forge frames through
/proc, signal or stop the agent, hide from the kill, stay silent, exhaust memory) and
checks what the host reports, what the audit trail keeps, and what is left running.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import tracemalloc
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from stigmer_sandbox import config
from stigmer_sandbox.errors import UsageError
from stigmer_sandbox.runtime import Sandbox
from stigmer_sandbox.runtime.client.channel import AgentChannel, AgentLost
from stigmer_sandbox.runtime.client.commands import Request
from stigmer_sandbox.runtime.guest.protocol import HOST_GRACE_S

from .conftest import TEST_LABELS, wait_for
from .test_runtime import make_sandbox


@pytest.fixture(scope="module")
def box(tmp_path_factory, docker_engine):
    """One hardened sandbox with small limits, shared by the attacks of this module."""
    tmp = tmp_path_factory.mktemp("attacks")
    with make_sandbox(tmp, memory="256m", pids_limit=256, tmp_size="64m") as sandbox:
        yield sandbox


def marker() -> str:
    """A `sleep` argument unique to one test that GNU sleep accepts."""
    return f"{random.randint(5000, 9000)}.{random.randint(100000, 999999)}"


def running_until_seen(m: str, label: str) -> str:
    """Shell that waits until `sleep M` runs (its own command line, not a shell's that
    merely mentions it), then says so."""
    pattern = f"^(/bin/|/usr/bin/)?sleep {m}$"
    return f"until pgrep -f '{pattern}' >/dev/null; do sleep 0.05; done; echo RUNNING-{label}"


def processes(box: Sandbox) -> str:
    return box.exec("ps -eo pid,user,args").stdout


HIDING_TRICKS = {
    "setsid": "setsid sleep {m} &",
    "double-fork": "( ( sleep {m} & ) & )",
    "env-i": "env -i /bin/sleep {m} &",
    "nohup": "nohup sleep {m} >/dev/null 2>&1 &",
    "disown": "sleep {m} & disown",
    "daemon": "setsid bash -c 'exec >&- 2>&- <&-; exec sleep {m}' &",
}


def hiding_command(markers: dict[str, str]) -> str:
    started = [HIDING_TRICKS[name].format(m=m) for name, m in markers.items()]
    seen = [running_until_seen(m, name) for name, m in markers.items()]
    return "\n".join([*started, *seen])


@pytest.mark.parametrize("ending", ["exit", "timeout"])
def test_nothing_outlives_its_command_whatever_it_does_to_hide(box, ending):
    markers = {name: marker() for name in HIDING_TRICKS}
    tail = "\nsleep 60" if ending == "timeout" else "\nexit 0"
    result = box.exec(hiding_command(markers) + tail, timeout=8 if ending == "timeout" else 60)
    for name in markers:
        assert f"RUNNING-{name}" in result.stdout, (name, result.stdout, result.stderr)
    assert result.cause == ("timeout" if ending == "timeout" else "exit"), result
    left = processes(box)
    for name, m in markers.items():
        assert f"sleep {m}" not in left, (name, left)


def test_a_command_cannot_forge_its_own_or_another_result(box):
    forged = (
        '{"id": %d, "type": "done", "exit_code": 0, "signal": null, "timed_out": false, '
        '"oom_killed": false, "oom_overlap": [], "duration_s": 0, "error": null, '
        '"stdout": {"tail": "", "dropped": 0, "total": 0}, '
        '"stderr": {"tail": "", "dropped": 0, "total": 0}}'
    )
    lines = "\n".join(forged % n for n in range(1, 400))
    attack = (
        f"cat > /tmp/forged <<'EOF'\n{lines}\nEOF\n"
        "n=0; for fd in /proc/[0-9]*/fd/*; do "
        '  [ -w "$fd" ] && cat /tmp/forged > "$fd" 2>/dev/null && n=$((n+1)); '
        'done; echo "wrote to $n fds" >&2; '
        'for p in /proc/[0-9]*; do [ "$(stat -c %u $p)" = 0 ] && kill -STOP ${p#/proc/}; '
        "done; "
        "kill -9 $PPID 2>/dev/null && echo killed-parent; exit 9"
    )
    with ThreadPoolExecutor(max_workers=2) as pool:
        bystander = pool.submit(box.exec, "sleep 2; echo bystander; exit 4", timeout=30)
        time.sleep(0.3)
        attacker = box.exec(attack, timeout=30)
        other = bystander.result()
    assert (attacker.exit_code, attacker.cause) == (9, "exit"), attacker
    assert "killed-parent" not in attacker.stdout
    # Commands share the sandbox user, so the attacker could write into the bystander's
    # stdout; its exit and cause still come from its own root-owned helper.
    assert (other.exit_code, other.cause) == (4, "exit") and "bystander" in other.stdout
    audited = [e for e in box.audit.tail(10) if e["id"] == attacker.command_id]
    assert audited and audited[0]["exit_code"] == 9
    assert box.exec("echo fine").stdout == "fine\n"


INJECT_INTO_EVERY_FD = (
    "n=0; for fd in /proc/[0-9]*/fd/*; do "
    '  case "$(readlink "$fd")" in pipe:*|socket:*) ;; *) continue ;; esac; '
    '  [ "${fd%%/fd/*}" = "/proc/$$" ] && continue; '
    '  printf "INJECTED\\n" 2>/dev/null > "$fd" && n=$((n+1)); '
    "done; echo wrote-$n"
)


def test_a_command_cannot_write_into_the_next_commands_prestarted_shell(box):
    """The attack on the shells warm helpers start ahead of commands (`bash`, as the
    sandbox user, holding the next command's stdout and stderr): a command writes into
    every pipe and socket of every process it can open through /proc. The shells are
    there and not one of their descriptors opens (a bash copy the user cannot read is
    non-dumpable), so the next commands say only what they print."""
    attacks = []

    def attack_a_waiting_shell() -> bool:
        """Whether the attack found a shell waiting besides its own (on a loaded machine
        the one taken last may not be replaced yet: then it is tried again)."""
        attacks.append(
            box.exec(
                "for pid in $(pgrep -u sandbox -f __stigmer_script); do "
                '  [ "$pid" = "$$" ] && continue; echo tried-$pid; '
                "  for fd in 0 1 2 3; do "
                '    : 2>/dev/null >"/proc/$pid/fd/$fd" && echo opened-$pid-$fd; '
                "  done; "
                "done; " + INJECT_INTO_EVERY_FD
            )
        )
        return "tried-" in attacks[-1].stdout

    assert wait_for(attack_a_waiting_shell, seconds=10), "no prestarted shell was waiting"
    assert not any("opened-" in attack.stdout for attack in attacks), attacks[-1].stdout
    for _ in range(4):  # each runs in a shell that was waiting during the attack
        assert box.exec("echo clean").stdout == "clean\n"
    merged = box.exec("echo out; echo err >&2", merge_output=True)
    assert merged.stdout == "out\nerr\n" and merged.stderr == ""


def test_a_forged_timeout_is_still_a_timeout(box):
    forged = (
        '{"id": 1, "type": "done", "exit_code": 0, "signal": null, "timed_out": false, '
        '"oom_killed": false, "oom_overlap": [], "duration_s": 0, "error": null, '
        '"stdout": {"tail": "", "dropped": 0, "total": 0}, '
        '"stderr": {"tail": "", "dropped": 0, "total": 0}}'
    )
    attack = (
        f"for fd in /proc/$PPID/fd/1 /proc/1/fd/1 /proc/self/fd/1; do "
        f"echo '{forged}' > $fd 2>/dev/null; done; sleep 60"
    )
    started = time.monotonic()
    result = box.exec(attack, timeout=3)
    assert result.timed_out and result.exit_code == 124 and result.cause == "timeout"
    assert time.monotonic() - started >= 2.9


def test_the_agent_cannot_be_signalled_traced_or_read(box):
    probe = box.exec(
        "id -u; grep -E '^(Uid|CapEff)' /proc/$PPID/status; "
        "kill -0 $PPID 2>&1; kill -STOP 1 2>&1; ls /proc/$PPID/fd 2>&1 | head -1; "
        "cat /proc/$PPID/environ 2>&1 | head -c 100; echo; "
        "python3 -c 'import ctypes,os; libc=ctypes.CDLL(None); "
        'print("ptrace", libc.ptrace(16, os.getppid(), 0, 0), ctypes.get_errno())\''
    )
    text = probe.stdout
    assert text.splitlines()[0] != "0"
    assert "Uid:\t0\t0\t0\t0" in text  # the helper above the command is root's
    assert text.count("Operation not permitted") >= 2
    assert "Permission denied" in text
    assert "ptrace -1" in text


def test_planted_files_never_run_in_a_later_agent(box):
    planted = box.exec(
        "set -e; site=$(python -c 'import site; print(site.getsitepackages()[0])'); "
        'echo \'import os; open("/tmp/pth-ran", "w").close()\' > $site/zz-evil.pth; '
        "mv /opt/venv/bin/python3 /opt/venv/bin/python3.orig; "
        "printf '#!/bin/sh\\ntouch /tmp/fake-ran\\nexec /usr/bin/python3 \"$@\"\\n' "
        "> /opt/venv/bin/python3; chmod +x /opt/venv/bin/python3; "
        "for tool in bash sh timeout realpath cat; do "
        "cp /opt/venv/bin/python3 /opt/venv/bin/$tool; done; echo planted"
    )
    assert planted.stdout == "planted\n", planted
    try:
        box.close()  # the next command starts a fresh agent
        fresh = box.exec("echo $((6*7))")
        assert (fresh.exit_code, fresh.stdout, fresh.via) == (0, "42\n", "agent")
        box.put_file("planted-check.txt", "ok\n")
        assert box.get_file("planted-check.txt") == b"ok\n"
        ran = box.exec("ls /tmp/pth-ran /tmp/fake-ran 2>&1; true").stdout
        assert ran.count("No such file") == 2, ran
    finally:
        box.exec(
            "cd /opt/venv/bin && /bin/rm -f bash sh timeout realpath cat "
            "/opt/venv/lib/python3*/site-packages/zz-evil.pth && /bin/mv python3.orig python3"
        )


ROOT_RUN_TOOLS = ("id", "setpriv", "sleep", "timeout", "sh", "cat", "stat", "bash", "kill")


def test_root_never_runs_the_sandbox_users_tools(tmp_path, docker_engine):
    """The health check, the keep-alive, a restart and the fallback runner run as root: none
    of them may pick up a tool the sandbox user planted first on its PATH. (Root cannot
    write into the workspace, so the planted tools leave their mark in /tmp.)"""
    planted = (
        "#!/bin/sh\n/usr/bin/touch /tmp/planted-ran-as-$(/usr/bin/id -u)\n"
        'exec /usr/bin/$(/usr/bin/basename "$0") "$@"\n'
    )

    def ran_as_root(box: Sandbox) -> bool:
        return "planted-ran-as-0" in box.exec("/bin/ls /tmp").stdout

    with make_sandbox(tmp_path) as victim:
        for tool in ROOT_RUN_TOOLS:
            victim.put_file(f"planted-{tool}", planted, mode=0o755)
        moved = victim.exec(
            f"for t in {' '.join(ROOT_RUN_TOOLS)}; do /bin/mv /workspace/planted-$t "
            "/opt/venv/bin/$t; done"
        )
        assert moved.exit_code == 0, moved
        victim.exec("id -u")
        assert "planted-ran-as-" in victim.exec("/bin/ls /tmp").stdout  # the tools work
        time.sleep(12)  # at least one engine health check (every 5 s), as root
        fallback = Sandbox(victim.settings, use_agent=False, extra_labels=TEST_LABELS)
        assert fallback.exec("echo via-exec").stdout == "via-exec\n"  # root OOM probe
        assert not ran_as_root(victim)
        victim.stop()  # /tmp is a tmpfs: the restart starts it empty
        assert victim.exec("echo restarted").stdout == "restarted\n"  # keep-alive, timeout
        victim.up(timeout=30)  # readiness probe as root
        time.sleep(6)  # and one more health check
        assert not ran_as_root(victim)


def agent_of(box: Sandbox) -> int:
    box.exec("true")
    channel = box.connection.channel
    assert channel is not None and channel.agent_pid
    return channel.agent_pid


@pytest.mark.parametrize("how", ["KILL", "STOP"])
def test_agent_killed_or_stopped_mid_command_is_reported_lost(box, docker_engine, how):
    pid = agent_of(box)
    m = marker()
    container = docker_engine.containers.get(box.name)
    outcome: dict = {}

    def slow() -> None:
        started = time.monotonic()
        command = f"setsid sleep {m} & {running_until_seen(m, 'bg')}; sleep 30"
        outcome["result"] = box.exec(command, timeout=20)
        outcome["seconds"] = time.monotonic() - started

    worker = threading.Thread(target=slow)
    worker.start()
    deadline = time.monotonic() + 15
    while f"sleep {m}" not in processes(box) and time.monotonic() < deadline:
        time.sleep(0.1)
    container.exec_run(["kill", f"-{how}", str(pid)], user="0:0")
    worker.join(60)
    result = outcome["result"]
    assert result.cause == "lost" and result.exit_code is None, result
    assert "agent" in (result.error or "")
    assert outcome["seconds"] < 20 + 15
    audited = [e for e in box.audit.tail(20) if e["id"] == result.command_id]
    assert audited and audited[0]["cause"] == "lost"
    assert wait_for(lambda: f"sleep {m}" not in processes(box)), processes(box)
    assert box.exec("echo next").stdout == "next\n"


# 70 s of silence: `inv test --all`; CI keeps the shorter freeze and heartbeat-spam checks
# of the same property (test_capture_guards, test_an_agent_spamming_heartbeats_...).
@pytest.mark.stress
def test_silence_is_not_failure(box):
    result = box.exec("sleep 70; echo ok", timeout=120)
    assert (result.exit_code, result.stdout) == (0, "ok\n"), result


# Hostile agents: what arrives on the channel is hostile too.
HOSTILE_PREFIX = """
import json, sys, time
def say(raw):
    sys.stdout.buffer.write(raw); sys.stdout.buffer.flush()
for line in sys.stdin.buffer:
    request = json.loads(line)
    if request["op"] == "ping":
        pong = {"id": request["id"], "type": "pong", "pid": __import__("os").getpid()}
        say(json.dumps(pong).encode() + b"\\n")
        continue
"""
HOSTILE_FRAMES = {
    "non-object": b"[1]\n",
    "id-list": b'{"id":[1],"type":"done"}\n',
    "deep-nesting": b"[" * 100_000 + b"]" * 100_000 + b"\n",
    "missing-fields": b'{"id":2,"type":"done","exit_code":0}\n',
    "wrong-types": (
        b'{"id":2,"type":"done","exit_code":"0","signal":null,"timed_out":false,'
        b'"oom_killed":false,"oom_overlap":[],"duration_s":0,"error":null,'
        b'"stdout":{"tail":"","dropped":0,"total":0},"stderr":{"tail":"","dropped":0,"total":0}}\n'
    ),
    "bad-base64": b'{"id":2,"type":"out","stream":"stdout","data":"!!!"}\n',
    "invalid-utf8": b'{"id":2,"type":"beat","x":"\xff\xfe"}\n',
    "over-long": b"x" * 5_000_000,
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_FRAMES))
def test_hostile_frames_never_crash_the_host(box, kind):
    payload = HOSTILE_FRAMES[kind]
    source = HOSTILE_PREFIX + f"    say({payload!r})\n    time.sleep(60)\n"
    channel = AgentChannel(box._container.id, box.sandbox_user, max_line=1_000_000, source=source)
    channel.ping()
    request = Request(argv=["true"], env={}, cwd="/workspace", timeout=5, limit=1000)
    started = time.monotonic()
    with pytest.raises(AgentLost, match=r"protocol|exited|answer"):
        channel.run(request)
    assert time.monotonic() - started < 5 + 11
    assert not channel.alive
    assert box.exec("echo intact").stdout == "intact\n"


def test_an_agent_spamming_heartbeats_cannot_stretch_the_deadline(box):
    source = (
        HOSTILE_PREFIX + '    while True:\n        say(b\'{"id":0,"type":"beat"}\\n\')\n'
        "        time.sleep(0.01)\n"
    )
    channel = AgentChannel(box._container.id, box.sandbox_user, max_line=1_000_000, source=source)
    channel.ping()
    request = Request(argv=["true"], env={}, cwd="/workspace", timeout=2, limit=1000)
    started = time.monotonic()
    result = channel.run(request)  # the agent beats, so this command alone is lost
    assert result.exit_code is None and "hard deadline" in (result.error or "")
    assert time.monotonic() - started < 2 + HOST_GRACE_S + 1
    channel.close()


def test_requests_that_cannot_start_fail_alone(box):
    with ThreadPoolExecutor(max_workers=4) as pool:
        long_runner = pool.submit(box.exec, "sleep 2; echo survivor", timeout=30)
        time.sleep(0.3)
        too_long = box.exec(["echo", "a" * 200_000])
        missing = box.exec(["/no/such/program"])
        bad_cwd = box.exec("pwd", cwd="/no/such/dir")
        script = box.exec("x=" + "b" * 300_000 + "; echo ${#x}")
        survivor = long_runner.result()
    assert too_long.exit_code == 126 and "too long" in (too_long.error or "").lower(), too_long
    assert missing.exit_code == 127 and missing.error
    assert bad_cwd.exit_code != 0 and bad_cwd.error
    assert script.stdout == "300000\n", script
    assert survivor.stdout == "survivor\n"


def test_a_full_tmp_does_not_break_long_scripts(box):
    box.exec("head -c 100000000 /dev/zero > /tmp/fill 2>/dev/null; true")
    try:
        result = box.exec("x=" + "c" * 200_000 + "; echo ${#x}")
        assert result.stdout == "200000\n", result
    finally:
        box.exec("rm -f /tmp/fill")


def test_output_limit_per_call_up_to_the_maximum(box):
    result = box.exec("head -c 5000000 /dev/zero | tr '\\0' z", output_limit=8_000_000)
    assert not result.truncated["stdout"] and len(result.stdout) == 5_000_000
    with pytest.raises(UsageError, match="output_limit must be between"):
        box.exec("true", output_limit=config.MAX_OUTPUT_LIMIT + 1)


def test_the_pid_limit_fails_only_the_request_that_hits_it(tmp_path, docker_engine):
    with make_sandbox(tmp_path, pids_limit=60) as small:
        hog = threading.Thread(
            target=small.exec, args=("for i in $(seq 80); do sleep 5 & done; wait",), daemon=True
        )
        hog.start()
        time.sleep(1.5)
        squeezed = small.exec("echo squeezed")
        hog.join(30)
        assert small.exec("echo after").stdout == "after\n"
        assert squeezed.exit_code is not None  # a result, never a crash of the channel


ALLOCATE_TWICE = 'python3 -c "b = bytearray(512 * 1024 * 1024)"'


@pytest.mark.parametrize(
    "shape",
    [f"{ALLOCATE_TWICE}; echo done", f"{ALLOCATE_TWICE} | cat", f"bash -c '{ALLOCATE_TWICE}'"],
)
def test_oom_is_reported_whichever_process_was_killed(box, shape):
    result = box.exec(shape, timeout=60)
    assert result.oom_killed and result.cause == "oom", result
    assert box.exec("echo alive").stdout == "alive\n"


def test_oom_names_the_commands_that_overlapped_it(box):
    with ThreadPoolExecutor(max_workers=2) as pool:
        quiet = pool.submit(box.exec, "sleep 4; echo quiet", timeout=30)
        time.sleep(0.5)
        hog = box.exec(ALLOCATE_TWICE, timeout=60)
        bystander = quiet.result()
    assert hog.oom_killed and bystander.command_id in hog.oom_overlap
    assert bystander.oom_killed and hog.command_id in bystander.oom_overlap


def test_fallback_runner_keeps_the_same_meanings(tmp_path, docker_engine):
    settings = make_sandbox(tmp_path).settings
    m = marker()
    slow_box = Sandbox.create_ephemeral(settings, use_agent=False, extra_labels=TEST_LABELS)
    with slow_box as slow:
        timed = slow.exec(f"setsid sleep {m} & sleep 60", timeout=2)
        assert timed.via == "exec" and timed.timed_out
        assert (timed.exit_code, timed.cause) == (124, "timeout")
        assert f"sleep {m}" not in processes(slow)
        killed = slow.exec("kill -TERM $$")
        assert (killed.exit_code, killed.cause) == (143, "signal")
        assert slow.exec("cat", stdin=b"in").stdout == "in"
        assert slow.exec("exit 3").exit_code == 3


def test_get_file_refuses_directories_and_oversize_files_before_reading(box):
    box.exec("mkdir -p /workspace/adir && head -c 30000000 /dev/zero > /workspace/big")
    try:
        with pytest.raises(UsageError, match=r"is a directory|not a regular file"):
            box.get_file("adir")
        tracemalloc.start()
        try:
            with pytest.raises(UsageError, match="limit"):
                box.get_file("big", max_bytes=1_000_000)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 5 * 1024**2
    finally:
        box.exec("rm -rf /workspace/adir /workspace/big")


def test_put_file_never_writes_as_root_through_a_swapped_symlink(box):
    target = "/usr/local/share/stigmer-sandbox/setuid-allowlist.txt"
    before = box.exec(f"sha256sum {target}").stdout
    stop = box.exec(
        f"( for i in $(seq 3000); do ln -sfn {target} /workspace/swap; "
        "rm -f /workspace/swap; : > /workspace/swap; done ) >/dev/null 2>&1 &",
        keep_background=True,
    )
    assert stop.exit_code == 0
    for _ in range(20):
        with contextlib.suppress(UsageError):
            box.put_file("swap", "owned\n")
    box.exec("pkill -f 'seq 3000'; true")
    assert box.exec(f"sha256sum {target}").stdout == before
    written = box.exec("stat -c %u /workspace/swap 2>/dev/null || echo gone").stdout.strip()
    assert written in (str(box.sandbox_user[0]), "gone")


def test_tmp_is_executable_and_git_commit_works(box):
    compiled = box.exec(
        "cd /tmp && printf 'int main(void){return 7;}' > t.c && gcc t.c -o t && ./t", timeout=60
    )
    assert compiled.exit_code == 7, compiled
    venv = box.exec("python3 -m venv /tmp/v && /tmp/v/bin/python -c 'print(1)'", timeout=120)
    assert venv.stdout.strip() == "1", venv
    repo = f"/tmp/repo-{uuid.uuid4().hex[:6]}"
    commit = box.exec(
        f"git init -q {repo} && cd {repo} && echo a > a && git add a && git commit -qm first "
        "&& git log --format='%an <%ae>'"
    )
    assert commit.exit_code == 0 and "Stigmer Sandbox" in commit.stdout, commit


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_caps_keep_head_tail_and_the_streamed_copy_agrees(box, stream):
    redirect = ">&2" if stream == "stderr" else ""
    command = (
        f"{{ echo HEAD-MARK; head -c 5000000 /dev/zero | tr '\\0' x; echo; echo TAIL-MARK; }} "
        f"{redirect}; exit 5"
    )
    streamed: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    result = box.exec(
        command,
        output_limit=100_000,
        on_stdout=streamed["stdout"].append,
        on_stderr=streamed["stderr"].append,
    )
    kept = getattr(result, stream)
    assert (result.exit_code, result.cause) == (5, "exit")
    assert result.truncated[stream] and result.output_bytes[stream] == 5_000_000 + 21
    assert kept.startswith("HEAD-MARK\nxxx") and kept.endswith("xxx\nTAIL-MARK\n")
    assert "bytes truncated by stigmer-sandbox" in kept and len(kept) < 100_200
    assert b"".join(streamed[stream]).decode() == kept
