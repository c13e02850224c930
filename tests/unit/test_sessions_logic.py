"""Sessions' and background processes' pure logic, without an engine: the state a session
command writes and how it is parsed, restored and bounded; names and ids that reach paths;
option checks; the idle timeout of `Pump`. Session commands run in this host's bash, with
the very prelude and save trap the sandbox's agent uses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stigmer_sandbox import config
from stigmer_sandbox.errors import UsageError
from stigmer_sandbox.runtime import Sandbox, agent, keeper, processes, sessions
from stigmer_sandbox.runtime.commands import make_request

from ..conftest import ROOT


def run_in_session(
    state: dict | None, script: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[subprocess.CompletedProcess[bytes], dict | None]:
    """Run `script` as a session command on this host from `state`; its result and the
    state it saved (None when it saved none the agent would accept)."""
    session = agent.SessionState("unit", 10)
    monkeypatch.setattr(session, "load", lambda: state)
    read_fd, write_fd = os.pipe()
    base = {"PATH": os.environ["PATH"], "HOME": "/tmp", "LANG": "C.UTF-8"}
    request = {"argv": ["/bin/bash", "-c", script], "cwd": None if state else "/tmp"}
    argv, env = session.command(request, base, write_fd)
    try:
        done = subprocess.run(
            argv, env=env, pass_fds=[write_fd], capture_output=True, timeout=30, check=False
        )
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        raw = pipe.read()
    return done, agent.parse_state(raw) if raw else None


def state_bytes(cwd: bytes, pairs: list[bytes], functions: bytes = b"") -> bytes:
    return cwd + b"\0" + b"".join(p + b"\0" for p in pairs) + b"\0" + functions + agent.STATE_END


# -- the state a command writes ------------------------------------------------------------


def test_state_round_trips_cwd_exports_and_functions(tmp_path, monkeypatch):
    folder = tmp_path / "it's a dir"
    folder.mkdir()
    script = (
        f"cd {agent.shell_quote(str(folder))} && export K='a b=c\nd' EMPTY= && "
        "greet() { echo hi; }"
    )
    done, state = run_in_session(None, script, monkeypatch)
    assert done.returncode == 0, done.stderr
    assert state is not None and state["cwd"] == str(folder)
    assert state["env"]["K"] == "a b=c\nd" and state["env"]["EMPTY"] == ""
    assert "greet ()" in state["functions"]
    assert not set(state["env"]) & agent.SESSION_OWN_VARIABLES
    again, _ = run_in_session(state, 'greet; printf "%s|%s" "$PWD" "$K"', monkeypatch)
    assert again.stdout == f"hi\n{folder}|a b=c\nd".encode()


@pytest.mark.parametrize("ending", ["exit 3", "set -e; false", "kill -KILL $$"])
def test_state_is_saved_by_exit_and_set_e_but_not_by_sigkill(tmp_path, monkeypatch, ending):
    done, state = run_in_session(None, f"cd {tmp_path}; export K=v; {ending}", monkeypatch)
    if ending.startswith("kill"):
        assert done.returncode == -9 and state is None
    else:
        assert done.returncode in (1, 3)
        assert state is not None and (state["cwd"], state["env"]["K"]) == (str(tmp_path), "v")


@pytest.mark.parametrize("escape", ["trap - EXIT", "exec true"])
def test_a_command_that_drops_the_trap_saves_nothing(tmp_path, monkeypatch, escape):
    done, state = run_in_session(None, f"cd {tmp_path}; {escape}", monkeypatch)
    assert done.returncode == 0 and state is None


def test_deactivate_of_a_restored_virtualenv_restores_path(tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    done, state = run_in_session(None, f"source {venv}/bin/activate", monkeypatch)
    assert done.returncode == 0 and state is not None
    assert state["env"]["PATH"].startswith(f"{venv}/bin:")
    after, _ = run_in_session(state, 'deactivate; echo "$PATH"', monkeypatch)
    assert after.returncode == 0, after.stderr
    assert f"{venv}/bin" not in after.stdout.decode()  # _OLD_VIRTUAL_PATH must survive


# -- parsing what a (hostile) command wrote ------------------------------------------------


def test_parse_state_keeps_valid_names_and_drops_bash_bookkeeping():
    raw = state_bytes(b"/w", [b"A=1", b"SHLVL=9", b"_=x", b"1BAD=2", b"B-C=3", b"D=e=f"])
    assert agent.parse_state(raw) == {"cwd": "/w", "env": {"A": "1", "D": "e=f"}, "functions": ""}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"/w\0A=1\0\0",  # no end marker: the shell died while writing
        state_bytes(b"/w", [b"A=" + b"x" * agent.STATE_LIMIT]),  # over the limit
    ],
)
def test_parse_state_refuses_truncated_or_oversized_state(raw):
    assert agent.parse_state(raw) is None


def test_parse_state_drops_functions_over_their_limit():
    state = agent.parse_state(state_bytes(b"/w", [b"A=1"], b"f" * (agent.MAX_FUNCTIONS + 1)))
    assert state == {"cwd": "/w", "env": {"A": "1"}, "functions": ""}


VALID = state_bytes(b"/tmp/new", [b"K=new"], b"f () \n{ \n    echo f\n}\n")


@pytest.mark.parametrize(
    "garbage",
    [b"garbage", b"garbage\0\0junk", b"/etc\0\0\0STIGMER-STATE-END"],
    ids=["text", "nul", "forged-end-marker"],
)
def test_garbage_before_the_trap_s_state_is_never_restored(garbage):
    """A command writes garbage to its state fd, then exits: the trap appends the real
    state. The agent must keep the real state or none, never one it cannot restore."""
    state = agent.parse_state(garbage + VALID)
    assert state in (None, agent.parse_state(VALID)), state


def test_a_restored_state_always_starts_a_command(tmp_path, monkeypatch):
    """Whatever parse_state accepts must give the next command an environment it can
    start with: no NUL bytes and no single string over Linux's 128 KiB."""
    big = state_bytes(str(tmp_path).encode(), [b"BIG=" + b"a" * 200_000])
    state = agent.parse_state(big)
    if state is not None:
        done, _ = run_in_session(state, "echo started", monkeypatch)
        assert done.stdout == b"started\n"


# -- names and ids that become paths -------------------------------------------------------


@pytest.mark.parametrize("name", ["", "../x", "a/b", "x" * 65, "a b", "a\0b", "é"])
def test_bad_session_names_are_refused_on_both_sides(name):
    with pytest.raises(UsageError, match="invalid session name"):
        sessions.check_name(name)
    with pytest.raises(ValueError, match="invalid session name"):
        agent.SessionState(name, 1)
    with pytest.raises(ValueError, match="invalid session name"):
        agent.SessionState.close(name)


@pytest.mark.parametrize("name", ["build", "a.b_c-1", ".", "..", "x" * 64])
def test_good_session_names_stay_inside_the_state_folder(name):
    assert sessions.check_name(name) == name
    path = agent.SessionState(name, 1).path
    assert os.path.dirname(path) == agent.SESSION_DIR and path.endswith(".json")


def test_a_session_runs_shell_strings_only(monkeypatch):
    session = agent.SessionState("unit", 1)
    monkeypatch.setattr(session, "load", lambda: None)
    with pytest.raises(ValueError, match="shell command strings"):
        session.command({"argv": ["ls", "-la"]}, {}, 5)


def test_the_caller_s_env_and_cwd_override_the_saved_state(monkeypatch):
    session = agent.SessionState("unit", 1)
    saved = {"cwd": "/saved", "env": {"K": "saved", "KEEP": "1"}, "functions": ""}
    monkeypatch.setattr(session, "load", lambda: saved)
    request = {"argv": ["/bin/bash", "-c", "true"], "env": {"K": "asked"}, "cwd": "/asked"}
    _argv, env = session.command(request, {"BASE": "1"}, 5)
    assert (env["K"], env["KEEP"]) == ("asked", "1") and "BASE" not in env
    assert "cd -- '/asked' || exit 1" in env[agent.PRELUDE_VAR]


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
        processes.start(offline_box, "sleep 1", **options)


@pytest.mark.parametrize("idle", [0, -1, config.MAX_TIMEOUT_S + 1])
def test_idle_timeout_must_be_positive_and_at_most_a_week(idle):
    settings = config.load_settings(ROOT, environ={})
    with pytest.raises(UsageError, match="idle_timeout"):
        make_request(settings, "true", "/workspace", {"idle_timeout": idle})


def test_a_session_with_a_bad_name_is_refused_before_any_command(offline_box):
    with pytest.raises(UsageError, match="invalid session name"):
        offline_box.session("../x")


def test_idle_is_its_own_cause_and_a_timeout_wins():
    assert agent.exit_cause(124, None, False, False, idle_timed_out=True) == "idle"
    assert agent.exit_cause(124, None, True, False, idle_timed_out=True) == "timeout"


# -- the idle timeout in Pump --------------------------------------------------------------


def pump(script: str, idle_s: float) -> tuple[bool, bytes]:
    process = subprocess.Popen(
        ["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    captures = {"stdout": agent.OutputCapture(1000), "stderr": agent.OutputCapture(1000)}
    runner = agent.Pump(
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
    capture = agent.OutputCapture(10)
    for _ in range(10):
        capture.feed(b"0123456789")
    text, total, cut = processes.stream_text(keeper.stream_record(capture), 10)
    assert (text, total, cut) == (capture.text(), 100, True)
    assert processes.stream_text(None, 10) == (b"", 0, False)


def test_the_session_state_folder_lives_in_the_root_only_run_dir():
    assert Path(agent.SESSION_DIR).parent == Path(agent.RUN_DIR)
    assert Path(keeper.PROCESS_DIR).parent == Path(agent.RUN_DIR)
