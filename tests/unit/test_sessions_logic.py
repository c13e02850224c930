"""Sessions' and background processes' pure logic, without an engine: the state a session
command writes and how it is parsed, restored and bounded; names and ids that reach paths;
option checks; the idle timeout of `Pump`. Session commands run in this host's bash, with
the very prelude and save trap the sandbox's agent uses."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from stigmer_sandbox import config
from stigmer_sandbox.errors import UsageError
from stigmer_sandbox.runtime import Sandbox
from stigmer_sandbox.runtime.client import processes
from stigmer_sandbox.runtime.client.commands import Request, check_session_name
from stigmer_sandbox.runtime.guest import agent, keeper, protocol, shell_state
from stigmer_sandbox.runtime.guest.capture import OutputCapture, Pump, feed

from ..conftest import ROOT


def run_in_session(
    state: dict | None, script: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[subprocess.CompletedProcess[bytes], dict | None]:
    """Run `script` as a session command on this host from `state`, with the agent's own
    prelude and save trap; its result and the state it saved (None when none counts)."""
    session = shell_state.SessionState("unit", 10)
    monkeypatch.setattr(session, "load", lambda: state)
    state_read, state_write = os.pipe()
    prelude_read, prelude_write = os.pipe()
    base = {"PATH": os.environ["PATH"], "HOME": "/tmp", "LANG": "C.UTF-8"}
    request = {"argv": ["/bin/bash", "-c", script], "cwd": None if state else "/tmp"}
    argv, env, text = session.command(request, base, state_write, prelude_read)
    feed(os.fdopen(prelude_write, "wb"), text.encode())  # as the agent: in a thread
    saved: list[bytes] = []  # read while it runs, as the agent does: a pipe holds 64 KiB
    reader = threading.Thread(target=lambda: saved.append(os.fdopen(state_read, "rb").read()))
    reader.start()
    try:
        done = subprocess.run(
            argv,
            env=env,
            pass_fds=[state_write, prelude_read],
            capture_output=True,
            timeout=30,
            check=False,
        )
    finally:
        os.close(state_write)
        os.close(prelude_read)
    reader.join()
    return done, shell_state.parse_state(saved[0]) if saved[0] else None


def record(cwd: bytes, variables: bytes = b"", functions: bytes = b"") -> bytes:
    """A state record as the save trap frames it."""
    body = b"\0".join([cwd, variables, functions])
    return shell_state.STATE_BEGIN + body + shell_state.STATE_END


# -- the state a command writes ------------------------------------------------------------


def test_state_round_trips_cwd_variables_and_functions(tmp_path, monkeypatch):
    folder = tmp_path / "it's a dir"
    folder.mkdir()
    script = (
        f"cd {shell_state.shell_quote(str(folder))} && export K='a b=c\nd' EMPTY= && "
        "LOCAL=kept && arr=(1 'two words') && greet() { echo hi; }"
    )
    done, state = run_in_session(None, script, monkeypatch)
    assert done.returncode == 0, done.stderr
    assert state is not None and state["cwd"] == str(folder)
    assert "greet ()" in state["functions"]
    assert "SHLVL" not in state["variables"] and "BASHOPTS" not in state["variables"]
    show = 'greet; printf "%s|%s|%s|%s" "$PWD" "$K" "$LOCAL" "${arr[1]}"; env | grep -c ^K='
    again, _ = run_in_session(state, show, monkeypatch)
    assert again.stdout == f"hi\n{folder}|a b=c\nd|kept|two words1\n".encode(), again.stderr


@pytest.mark.parametrize("ending", ["exit 3", "set -e; false", "kill -KILL $$"])
def test_state_is_saved_by_exit_and_set_e_but_not_by_sigkill(tmp_path, monkeypatch, ending):
    done, state = run_in_session(None, f"cd {tmp_path}; export K=v; {ending}", monkeypatch)
    if ending.startswith("kill"):
        assert done.returncode == -9 and state is None
    else:
        assert done.returncode in (1, 3)
        assert state is not None and state["cwd"] == str(tmp_path)
        assert 'declare -x K="v"' in state["variables"]


@pytest.mark.parametrize("escape", ["trap - EXIT", "exec true"])
def test_a_command_that_drops_the_trap_saves_nothing(tmp_path, monkeypatch, escape):
    done, state = run_in_session(None, f"cd {tmp_path}; {escape}", monkeypatch)
    assert done.returncode == 0 and state is None


def test_deactivate_of_a_restored_virtualenv_restores_path(tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    done, state = run_in_session(None, f"source {venv}/bin/activate", monkeypatch)
    assert done.returncode == 0 and state is not None
    after, _ = run_in_session(state, 'echo "$PATH"; deactivate; echo "$PATH"', monkeypatch)
    active, restored = after.stdout.decode().splitlines()
    assert active.startswith(f"{venv}/bin:"), after.stderr
    assert f"{venv}/bin" not in restored  # _OLD_VIRTUAL_PATH (not exported) came back too


def test_an_unset_variable_stays_unset(monkeypatch):
    _done, state = run_in_session(None, "unset HOME LANG", monkeypatch)
    again, _ = run_in_session(state, 'echo "[${HOME-unset}][${LANG-unset}]"', monkeypatch)
    assert again.stdout == b"[unset][unset]\n"


def test_a_function_named_like_a_builtin_cannot_stop_the_next_command(tmp_path, monkeypatch):
    _done, state = run_in_session(None, f"cd {tmp_path}; cd() {{ exit 9; }}", monkeypatch)
    again, _ = run_in_session(state, "builtin pwd", monkeypatch)
    assert (again.returncode, again.stdout) == (0, f"{tmp_path}\n".encode())


def test_a_gone_folder_says_so_and_continues_in_the_workspace(monkeypatch):
    state = {"cwd": "/nonexistent/gone", "variables": "", "functions": ""}
    again, _ = run_in_session(state, "echo ran", monkeypatch)
    assert again.stdout == b"ran\n" and b"is gone" in again.stderr


# -- parsing what a (hostile) command wrote ------------------------------------------------


def test_only_declarations_of_the_session_s_own_variables_are_kept():
    variables = "\n".join(
        [
            'declare -x A="1"',
            'declare -- SHLVL="9"',
            'declare -ar BASH_VERSINFO=([0]="5")',
            'declare -i RANDOM="7"',
            "echo not-a-declaration",
            'declare -a arr=([0]="x")',
            'declare -x __stigmer_x="y"',
        ]
    )
    state = shell_state.parse_state(record(b"/w", variables.encode()))
    assert state == {
        "cwd": "/w",
        "variables": 'declare -x A="1"\ndeclare -a arr=([0]="x")',
        "functions": "",
    }


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        record(b"/w")[:-3],  # no end marker: the shell died while writing
        record(b"/w", b"declare -- A=" + b"x" * shell_state.STATE_LIMIT),  # over the limit
        record(b"relative"),
        shell_state.STATE_BEGIN + b"/w\0a\0b\0c" + shell_state.STATE_END,  # NUL in a part
    ],
)
def test_truncated_oversized_or_malformed_state_is_refused(raw):
    assert shell_state.parse_state(raw) is None


VALID = record(b"/tmp/new", b'declare -x K="new"', b"f () \n{ \n    echo f\n}\n")


@pytest.mark.parametrize(
    "garbage",
    [b"garbage", b"garbage\0\0junk", b"/etc\0\0\0STIGMER-STATE-END", record(b"/forged")],
    ids=["text", "nul", "forged-end-marker", "forged-record"],
)
def test_whatever_a_command_wrote_before_the_trap_s_record_is_ignored(garbage):
    assert shell_state.parse_state(garbage + VALID) == shell_state.parse_state(VALID)


def test_a_huge_export_does_not_stop_the_next_command(tmp_path, monkeypatch):
    """Variables come back through the prelude, not the process environment: a 200 KB
    export (over Linux's 128 KiB per environment string) cannot stop bash starting."""
    _done, state = run_in_session(
        None, "export BIG=$(head -c 200000 /dev/zero | tr '\\0' a)", monkeypatch
    )
    assert state is not None
    done, _ = run_in_session(state, "echo started ${#BIG}", monkeypatch)
    assert done.stdout == b"started 200000\n"


# -- names and ids that become paths -------------------------------------------------------


@pytest.mark.parametrize("name", ["", "../x", "a/b", "x" * 65, "a b", "a\0b", "é"])
def test_bad_session_names_are_refused_on_both_sides(name):
    with pytest.raises(UsageError, match="invalid session name"):
        check_session_name(name)
    with pytest.raises(ValueError, match="invalid session name"):
        shell_state.SessionState(name, 1)
    with pytest.raises(ValueError, match="invalid session name"):
        shell_state.SessionState.close(name)


@pytest.mark.parametrize("name", ["build", "a.b_c-1", ".", "..", "x" * 64])
def test_good_session_names_stay_inside_the_state_folder(name):
    assert check_session_name(name) == name
    path = shell_state.SessionState(name, 1).path
    assert os.path.dirname(path) == shell_state.SESSION_DIR and path.endswith(".json")


def test_a_session_runs_shell_strings_only(monkeypatch):
    session = shell_state.SessionState("unit", 1)
    monkeypatch.setattr(session, "load", lambda: None)
    with pytest.raises(ValueError, match="shell command strings"):
        session.command({"argv": ["ls", "-la"]}, {}, 5, 6)


def test_the_caller_s_env_and_cwd_come_after_the_saved_state(monkeypatch):
    session = shell_state.SessionState("unit", 1)
    saved = {"cwd": "/saved", "variables": 'declare -x K="saved"', "functions": ""}
    monkeypatch.setattr(session, "load", lambda: saved)
    request = {"argv": ["/bin/bash", "-c", "true"], "env": {"K": "asked"}, "cwd": "/asked"}
    _argv, env, text = session.command(request, {"BASE": "1"}, 5, 6)
    assert env == {}  # a saved state brings its own environment
    assert text.index('declare -x K="saved"') < text.index("builtin export K='asked'")
    assert "builtin cd -- '/asked'" in text


@pytest.mark.parametrize("good", ["0123456789ab", "ffffffffffff"])
def test_process_ids_map_to_their_folder(good):
    assert keeper.process_folder(good) == f"{keeper.PROCESS_DIR}/{good}"


@pytest.mark.parametrize(
    "bad", ["", "../../etc/x", "0123456789AB", "0123456789a", "0123456789abc", "../012345678", None]
)
def test_malformed_process_ids_never_become_paths(bad):
    with pytest.raises(ValueError, match="no background process"):
        keeper.process_folder(bad)


# -- option checks before anything reaches a sandbox ---------------------------------------


@pytest.fixture
def offline_box(tmp_path) -> Sandbox:
    """A Sandbox object that never reaches an engine (checks fail before they would)."""
    settings = config.load_settings(ROOT, environ={}).replace(
        workspace=str(tmp_path / "w"), logs=str(tmp_path / "l"), state_dir=str(tmp_path / "s")
    )
    return Sandbox(settings, name="stigmer-never-created")


@pytest.mark.parametrize(
    "options",
    [{"timeout": 0}, {"timeout": -1}, {"timeout": config.MAX_TIMEOUT_S + 1}, {"output_limit": 1}],
)
def test_background_options_are_checked_before_starting(offline_box, options):
    with pytest.raises(UsageError):
        offline_box.start("sleep 1", **options)


@pytest.mark.parametrize("idle", [0, -1, config.MAX_TIMEOUT_S + 1])
def test_idle_timeout_must_be_positive_and_at_most_a_week(idle):
    settings = config.load_settings(ROOT, environ={})
    with pytest.raises(UsageError, match="idle_timeout"):
        Request.build(settings, "true", {"idle_timeout": idle})


def test_a_session_with_a_bad_name_is_refused_before_any_command(offline_box):
    with pytest.raises(UsageError, match="invalid session name"):
        offline_box.session("../x")


def test_idle_is_its_own_cause_and_a_timeout_wins():
    assert protocol.exit_cause(124, None, False, False, idle_timed_out=True) == "idle"
    assert protocol.exit_cause(124, None, True, False, idle_timed_out=True) == "timeout"


# -- the idle timeout in Pump --------------------------------------------------------------


def pump(script: str, idle_s: float) -> tuple[bool, bytes]:
    process = subprocess.Popen(
        ["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    captures = {"stdout": OutputCapture(1000), "stderr": OutputCapture(1000)}
    runner = Pump(
        process,
        captures=captures,
        live=lambda _name, _data: None,
        deadline=__import__("time").monotonic() + 20,
        expire=process.kill,
        ended=lambda: None,
        idle=(idle_s, process.kill),
    )
    runner.run()
    return runner.idled, captures["stdout"].text()


def test_pump_ends_a_silent_process_at_its_idle_timeout_and_keeps_its_output():
    idled, output = pump("echo first; sleep 20", 0.3)
    assert idled and output == b"first\n"


def test_pump_spares_a_process_that_prints_more_often_than_its_idle_timeout():
    idled, output = pump("for i in 1 2 3 4 5; do echo $i; sleep 0.1; done", 0.5)
    assert not idled and output == b"1\n2\n3\n4\n5\n"


def test_output_capture_record_round_trips_through_the_keeper_format():
    capture = OutputCapture(10)
    for _ in range(10):
        capture.feed(b"0123456789")
    text, total, cut = processes.stream_text(keeper.stream_record(capture))
    assert (text, total, cut) == (capture.text(), 100, True)
    assert processes.stream_text(None) == (b"", 0, False)


def test_the_session_state_folder_lives_in_the_root_only_run_dir():
    assert Path(shell_state.SESSION_DIR).parent == Path(agent.RUN_DIR)
    assert Path(keeper.PROCESS_DIR).parent == Path(agent.RUN_DIR)
