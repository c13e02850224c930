"""Issue 13 on a real engine: named shell sessions and idle timeouts.

A session's state (working directory, exports, functions such as a virtualenv's
`deactivate`) is restored before each command and saved when it exits, by root, in the
sandbox. These tests prove what carries over, what a failed, killed or timed-out command
leaves behind, that 16 sessions used at once never cross, that another host process (and
`inv run --session`) continues a session, and that hostile commands cannot break a
session or read another one's state.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from stigmer_sandbox.errors import UsageError
from stigmer_sandbox.runtime import Sandbox, Session

from ..conftest import ROOT
from .test_runtime import make_sandbox


@pytest.fixture(scope="module")
def box(tmp_path_factory, docker_engine):
    """One sandbox with the default settings of `make_sandbox` (so `inv` and a second
    host process find the very same container), shared by this module's sessions."""
    tmp = tmp_path_factory.mktemp("sessions")
    with make_sandbox(tmp) as sandbox:
        sandbox.container_id = sandbox.inspect()["Id"]
        yield sandbox


def fresh(box: Sandbox, label: str) -> Session:
    """A session no other test uses."""
    return box.session(f"{label}-{uuid.uuid4().hex[:8]}")


def where(session: Session) -> tuple[str, str]:
    """The session's working directory and $K, read by a later command."""
    result = session.exec('printf "%s|%s" "$PWD" "${K-}"')
    assert result.exit_code == 0, result
    directory, _, value = result.stdout.partition("|")
    return directory, value


def settled(session: Session, folder: str, value: str) -> None:
    """Put the session in `folder` (made if missing) with K=value."""
    result = session.exec(f"mkdir -p {folder} && cd {folder} && export K={value}")
    assert result.exit_code == 0, result
    assert where(session) == (folder, value)


def another_process(box: Sandbox, code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a separate Python process where `box` is this sandbox, found again
    by name with the same settings (so nothing is recreated)."""
    tmp = box.settings.path("workspace").parent
    prelude = (
        "from pathlib import Path\n"
        "from stigmer_sandbox.runtime import Sandbox\n"
        "from tests.integration.test_runtime import settings_in\n"
        f"box = Sandbox(settings_in(Path({str(tmp)!r})), name={box.name!r})\n"
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def inv_env(box: Sandbox) -> dict[str, str]:
    """Environment that points `inv` at `box` instead of the checkout's own sandbox."""
    settings = box.settings
    return {
        "INVOKE_STIGMER_CONTAINER_NAME": box.name,
        "INVOKE_STIGMER_WORKSPACE": str(settings.path("workspace")),
        "INVOKE_STIGMER_LOGS": str(settings.path("logs")),
        "INVOKE_STIGMER_STATE_DIR": str(settings.path("state_dir")),
    }


def one_error_line(stderr: str) -> bool:
    return len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


# -- state carried over --------------------------------------------------------------------


def test_cwd_and_exports_carry_over_to_the_next_command(box):
    shell = fresh(box, "carry")
    shell.exec("mkdir -p /tmp/carry/sub && cd /tmp/carry/sub && export GREETING='a b=c'")
    result = shell.exec('echo "$PWD|$GREETING"')
    assert result.stdout == "/tmp/carry/sub|a b=c\n", result
    assert shell.exec("greet() { echo hi $1; }").exit_code == 0
    assert shell.exec("greet there").stdout == "hi there\n"


def test_an_activated_virtualenv_is_active_in_the_next_command(box):
    shell = fresh(box, "venv")
    made = shell.exec(
        "mkdir -p /tmp/project && cd /tmp/project && python3 -m venv --without-pip .venv "
        "&& source .venv/bin/activate",
        timeout=60,
    )
    assert made.exit_code == 0, made
    active = shell.exec('which python; echo "$VIRTUAL_ENV"')
    assert active.stdout == "/tmp/project/.venv/bin/python\n/tmp/project/.venv\n", active


def test_deactivate_works_in_a_later_command(box):
    shell = fresh(box, "deactivate")
    shell.exec(
        "mkdir -p /tmp/deact && cd /tmp/deact && python3 -m venv --without-pip .venv "
        "&& source .venv/bin/activate",
        timeout=60,
    )
    assert shell.exec("which python").stdout == "/tmp/deact/.venv/bin/python\n"
    gone = shell.exec('deactivate; echo "[$VIRTUAL_ENV]"; which python')
    assert gone.exit_code == 0, gone
    assert gone.stdout.startswith("[]\n"), gone
    assert "/tmp/deact/.venv" not in gone.stdout, gone  # PATH must lose the venv too
    after = shell.exec('echo "$PATH"; which python')
    assert "/tmp/deact/.venv" not in after.stdout, after


def test_heredocs_run_and_their_results_carry_over(box):
    shell = fresh(box, "heredoc")
    script = (
        "mkdir -p /tmp/heredoc && cd /tmp/heredoc\n"
        "cat > notes.txt <<'EOF'\n"
        "literal $HOME `date`\n"
        "EOF\n"
        "read -r K <<EOF\n"
        "from-heredoc\n"
        "EOF\n"
        "export K\n"
        "cat notes.txt\n"
    )
    result = shell.exec(script)
    assert (result.exit_code, result.stdout) == (0, "literal $HOME `date`\n"), result
    assert where(shell) == ("/tmp/heredoc", "from-heredoc")


def test_set_e_false_exits_1_and_keeps_the_state_as_of_that_command(box):
    shell = fresh(box, "set-e")
    settled(shell, "/tmp/set-e-before", "before")
    failed = shell.exec("set -e; mkdir -p /tmp/set-e && cd /tmp/set-e; export K=e; false; echo NO")
    assert (failed.exit_code, failed.cause, failed.stdout) == (1, "exit", ""), failed
    assert where(shell) == ("/tmp/set-e", "e")
    usable = shell.exec("false; echo set-e-did-not-stick")  # shell options are not state
    assert (usable.exit_code, usable.stdout) == (0, "set-e-did-not-stick\n")


def test_exit_3_is_the_result_and_the_session_goes_on(box):
    shell = fresh(box, "exit3")
    ended = shell.exec("mkdir -p /tmp/exit3 && cd /tmp/exit3; export K=three; exit 3")
    assert (ended.exit_code, ended.cause) == (3, "exit"), ended
    assert where(shell) == ("/tmp/exit3", "three")


def test_a_timed_out_command_keeps_the_state_of_the_last_finished_one(box):
    shell = fresh(box, "timeout")
    settled(shell, "/tmp/timeout-kept", "kept")
    slow = shell.exec("cd /etc; export K=lost; echo before-the-kill; sleep 30", timeout=2)
    assert (slow.exit_code, slow.cause, slow.timed_out) == (124, "timeout", True), slow
    assert slow.stdout == "before-the-kill\n"
    assert where(shell) == ("/tmp/timeout-kept", "kept")  # the `cd /etc` is not kept


@pytest.mark.parametrize("runner", ["exec", "session"])
def test_output_printed_before_a_timeout_is_in_the_result(box, runner):
    run = box.exec if runner == "exec" else fresh(box, "partial").exec
    result = run("echo partial-out; echo partial-err >&2; sleep 30", timeout=2)
    assert (result.exit_code, result.cause) == (124, "timeout"), result
    assert (result.stdout, result.stderr) == ("partial-out\n", "partial-err\n")


@pytest.mark.parametrize("runner", ["exec", "session"])
def test_idle_timeout_ends_a_silent_command_and_keeps_its_output(box, runner):
    run = box.exec if runner == "exec" else fresh(box, "idle").exec
    result = run("echo said-something; sleep 60", idle_timeout=1, timeout=30)
    assert (result.exit_code, result.cause, result.idle_timed_out) == (124, "idle", True), result
    assert not result.timed_out
    assert result.stdout == "said-something\n"
    assert result.duration_s < 10, result


def test_idle_timeout_spares_a_command_that_keeps_printing(box):
    chatty = "for i in 1 2 3 4 5 6 7 8; do echo tick $i; sleep 0.3; done"
    result = box.exec(chatty, idle_timeout=1, timeout=30)
    assert (result.exit_code, result.cause) == (0, "exit"), result
    assert result.stdout.count("tick") == 8 and result.duration_s > 2


def test_an_idle_ended_session_command_keeps_the_previous_state(box):
    shell = fresh(box, "idle-state")
    settled(shell, "/tmp/idle-kept", "kept")
    idle = shell.exec("cd /; export K=lost; echo waiting; sleep 60", idle_timeout=1, timeout=30)
    assert idle.cause == "idle" and idle.stdout == "waiting\n", idle
    assert where(shell) == ("/tmp/idle-kept", "kept")


def test_sixteen_sessions_at_once_never_cross(box):
    run_id = uuid.uuid4().hex[:6]

    def use(n: int) -> list[str]:
        shell = box.session(f"many-{run_id}-{n}")
        folder = f"/tmp/many/{n}"
        shell.exec(f"mkdir -p {folder} && cd {folder} && export MINE=value-{n}")
        return [shell.exec('echo "$PWD $MINE"').stdout for _ in range(5)]

    with ThreadPoolExecutor(max_workers=16) as pool:
        seen = list(pool.map(use, range(16)))
    for n, reads in enumerate(seen):
        assert reads == [f"/tmp/many/{n} value-{n}\n"] * 5, (n, reads)


def test_another_host_process_continues_the_session(box):
    shell = fresh(box, "shared")
    settled(shell, "/tmp/shared", "from-the-first")
    code = (
        f"shell = box.session({shell.name!r})\n"
        "print(shell.exec('echo \"$PWD $K\"').stdout, end='')\n"
        "shell.exec('export K=from-the-second')\n"
    )
    other = another_process(box, code)
    assert (other.returncode, other.stdout) == (0, "/tmp/shared from-the-first\n"), other.stderr
    assert where(shell) == ("/tmp/shared", "from-the-second")


def test_closing_a_session_forgets_its_state(box):
    shell = fresh(box, "close")
    settled(shell, "/tmp/close", "x")
    assert shell.close() is True
    assert where(shell) == ("/workspace", "")
    assert shell.close() is True  # the command above started it again
    assert shell.close() is False


# -- the CLI -------------------------------------------------------------------------------


def test_inv_run_session_twice_carries_state(box, inv):
    name = f"cli-{uuid.uuid4().hex[:8]}"
    first = inv(
        "run",
        "--session",
        name,
        "mkdir -p /tmp/cli && cd /tmp/cli && export K=cli",
        env=inv_env(box),
    )
    assert first.returncode == 0, first.stderr
    second = inv("run", "--session", name, 'echo "$PWD $K"', env=inv_env(box))
    assert (second.returncode, second.stdout) == (0, "/tmp/cli cli\n"), second.stderr
    assert where(box.session(name)) == ("/tmp/cli", "cli")  # the library sees it too
    assert box.inspect()["Id"] == box.container_id  # the CLI used this very container


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--session", "../x", "pwd"), "invalid session name"),
        (("--session", "a/b", "pwd"), "invalid session name"),
        (("--session", "x" * 65, "pwd"), "invalid session name"),
        (("--session", "ok", "--background", "pwd"), "--background"),
    ],
)
def test_inv_run_refuses_bad_session_input_in_one_line(box, inv, args, says):
    refused = inv("run", *args, env=inv_env(box))
    assert refused.returncode != 0
    assert one_error_line(refused.stderr) and says in refused.stderr, refused.stderr
    assert refused.stdout == ""


# -- hostile commands ----------------------------------------------------------------------

# The number of the fd the session's EXIT trap writes the state to, read from the trap.
STATE_FD = "fd=$(declare -f __stigmer_save | grep -o '>&[0-9]*' | tr -d '>&'); "
STATE_ATTACKS = {
    "text-garbage": STATE_FD + "printf 'garbage' >&$fd",
    "nul-garbage": STATE_FD + "printf 'garbage\\0\\0junk' >&$fd",
    "forged-end-marker": STATE_FD + "printf '/etc\\0\\0\\0STIGMER-STATE-END' >&$fd",
    "five-megabytes": STATE_FD + "head -c 5000000 /dev/urandom >&$fd",
    "closed-fd": STATE_FD + 'eval "exec $fd>&-"',
    "trap-removed": "trap - EXIT",
    "exec-replaces-the-shell": "exec sleep 1",
}


@pytest.mark.parametrize("attack", sorted(STATE_ATTACKS))
def test_a_hostile_command_cannot_break_its_session(box, attack):
    shell = fresh(box, attack)
    settled(shell, f"/tmp/{attack}", "old")
    hostile = shell.exec(
        f"mkdir -p /tmp/new && cd /tmp/new && export K=new; {STATE_ATTACKS[attack]}"
    )
    assert hostile.cause in ("exit", "signal"), hostile
    for _ in range(2):  # the next commands run, in the old state or the new one
        state = shell.exec('printf "%s|%s" "$PWD" "${K-}"')
        assert state.exit_code == 0, state
        assert state.stdout in (f"/tmp/{attack}|old", "/tmp/new|new"), state


@pytest.mark.parametrize("size", [200_000, 2_000_000])
def test_a_huge_export_does_not_break_the_session(box, size):
    shell = fresh(box, f"huge-{size}")
    settled(shell, "/tmp/huge", "old")
    big = shell.exec(f"export BIG=$(head -c {size} /dev/zero | tr '\\0' a); echo ${{#BIG}}")
    assert (big.exit_code, big.stdout) == (0, f"{size}\n"), big
    after = shell.exec('echo "$PWD ${#BIG}"')
    assert after.exit_code == 0, after
    assert after.stdout in ("/tmp/huge 0\n", f"/tmp/huge {size}\n"), after
    assert shell.exec("echo still-fine").stdout == "still-fine\n"


def test_a_session_command_cannot_read_the_state_folder_or_another_session(box):
    victim = fresh(box, "victim")
    secret = f"secret-{uuid.uuid4().hex}"
    assert victim.exec(f"export TOKEN={secret}").exit_code == 0
    thief = fresh(box, "thief")
    probe = thief.exec(
        f"ls /run/stigmer; ls /run/stigmer/sessions; cat /run/stigmer/sessions/{victim.name}.json; "
        f"grep -rsl {secret[:20]} /run /tmp /workspace /home /var/tmp /dev/shm; echo done"
    )
    assert probe.stdout == "done\n", probe
    assert probe.stderr.count("Permission denied") == 3, probe.stderr
    assert victim.exec('echo "$TOKEN"').stdout == f"{secret}\n"


def test_a_requested_folder_that_does_not_exist_runs_nothing(box):
    shell = fresh(box, "workdir")
    marker = f"/tmp/ran-{uuid.uuid4().hex[:8]}"
    result = shell.exec(f"touch {marker}", cwd="/nonexistent/typo")
    assert result.exit_code == 126, result
    assert box.exec(f"test -e {marker}").exit_code == 1  # not run anywhere else


def test_a_session_env_name_cannot_smuggle_shell_code(box):
    shell = fresh(box, "envname")
    with pytest.raises(UsageError, match="shell variable names"):
        shell.exec("true", env={"X;touch /tmp/injected;Y": "1"})
    assert box.exec("test -e /tmp/injected").exit_code == 1
