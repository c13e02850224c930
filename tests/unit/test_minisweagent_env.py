"""The mini-swe-agent environment's mapping (integrations/minisweagent.py), without an engine:
results in the docker environment's shape, the config, and the calls it makes."""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")  # its banner, printed on import
os.environ.setdefault(  # not the user's own config folder (created on import)
    "MSWEA_GLOBAL_CONFIG_DIR", str(Path(tempfile.gettempdir()) / "stigmer-tests-mswea")
)
pytest.importorskip("minisweagent", reason="mini-swe-agent is not installed (extra `swe`)")

from minisweagent.environments import get_environment_class
from minisweagent.environments.docker import DockerEnvironmentConfig
from minisweagent.exceptions import Submitted

from stigmer_sandbox.errors import ConfigError, SandboxNotReady, UsageError
from stigmer_sandbox.integrations import adapter
from stigmer_sandbox.integrations import minisweagent as swe
from stigmer_sandbox.runtime import ExecResult

from ..conftest import ROOT

ARGV = ["bash", "-lc", "sleep 9"]


def result(**changes: Any) -> ExecResult:
    values = {"exit_code": 0, "stdout": "", "stderr": "", "duration_s": 0.1, "command_id": "c1"}
    return ExecResult(**{**values, **changes})


# -- results ---------------------------------------------------------------------------------


def test_a_result_keeps_its_output_and_exit_code_and_names_the_sandbox():
    output = swe.to_output(result(exit_code=3, stdout="out\nerr\n"), ARGV, 30, "box")
    assert output == {
        "output": "out\nerr\n",
        "returncode": 3,
        "exception_info": "",
        "extra": {"sandbox": "box", "command_id": "c1"},
    }


def test_a_timeout_is_worded_as_the_docker_environment_words_it_with_the_partial_output():
    done = result(exit_code=124, stdout="started\n", timed_out=True, signal=9)
    output = swe.to_output(done, ARGV, 1, "box")
    # What the docker environment's `except Exception as e` makes of subprocess's timeout.
    expired = subprocess.TimeoutExpired(ARGV, 1)
    assert str(expired) == "Command '['bash', '-lc', 'sleep 9']' timed out after 1 seconds"
    assert output == {
        "output": "started\n",
        "returncode": -1,
        "exception_info": f"An error occurred while executing the command: {expired}",
        "extra": {
            "exception_type": "TimeoutExpired",
            "exception": str(expired),
            "sandbox": "box",
            "command_id": "c1",
        },
    }


def test_a_lost_result_and_an_oom_kill_say_so():
    lost = swe.to_output(result(exit_code=None, error="the agent died"), ARGV, 30, "box")
    assert lost["returncode"] == -1
    assert lost["exception_info"] == (
        "An error occurred while executing the command: "
        "the command's result was lost: the agent died"
    )
    assert lost["extra"]["exception_type"] == "ResultLost"
    oom = swe.to_output(result(exit_code=137, stdout="x\n", oom_killed=True), ARGV, 30, "box")
    assert oom["returncode"] == 137
    assert oom["output"] == f"x\n\n{adapter.OOM_NOTICE}\n"


def test_truncated_output_keeps_its_marker_and_the_extra_says_how_much_there_was():
    kept = "head\n[... 10 bytes truncated by stigmer-sandbox ...]\ntail"
    done = result(
        stdout=kept, truncated={"stdout": True, "stderr": False}, output_bytes={"stdout": 18}
    )
    output = swe.to_output(done, ARGV, 30, "box")
    assert output["output"] == kept and output["returncode"] == 0
    assert output["exception_info"] == ""
    assert output["extra"]["truncated"] is True
    assert output["extra"]["output_bytes"] == {"stdout": 18}


def test_a_command_that_could_not_start_says_why_in_its_output():
    done = result(exit_code=126, error="cd: /nope: No such file or directory")
    output = swe.to_output(done, ARGV, 30, "box")
    assert output["returncode"] == 126
    assert output["output"] == (
        "stigmer-sandbox: the command could not start: cd: /nope: No such file or directory\n"
    )


def test_the_submit_marker_on_the_first_line_of_a_success_submits_the_rest():
    with pytest.raises(Submitted) as raised:
        swe.check_finished(
            {"output": "\n COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT\npatch\n", "returncode": 0}
        )
    assert raised.value.messages[0]["extra"] == {
        "exit_status": "Submitted",
        "submission": "patch\n",
    }
    swe.check_finished({"output": "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT\n", "returncode": 1})
    swe.check_finished({"output": "x\nCOMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT\n", "returncode": 0})


# -- configuration ---------------------------------------------------------------------------


def test_the_docker_environments_keys_keep_their_defaults():
    config = swe.parse_config({})
    docker = DockerEnvironmentConfig(image="any")
    assert config.timeout == docker.timeout
    assert config.interpreter == docker.interpreter
    assert config.env == docker.env and config.forward_env == docker.forward_env
    assert config.cwd == "/workspace"  # docker's is "/", which the sandbox user cannot write


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"run_args": ["--rm"]}, "environment config: run_args: a docker environment key"),
        ({"imagee": "x"}, "environment config: imagee: Extra inputs are not permitted"),
        ({"timeout": 0}, "environment config: timeout: Input should be greater than 0"),
        ({"egress": "some"}, "environment config: egress: Input should be 'public'"),
    ],
)
def test_a_bad_key_is_one_line_naming_it(values, message):
    with pytest.raises(ConfigError) as raised:
        swe.parse_config(values)
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


def test_settings_take_the_limits_and_any_other_setting_but_not_one_twice():
    config = swe.parse_config(
        {"memory": "1g", "project_dir": str(ROOT), "settings": {"read_only_root": True}}
    )
    settings = swe.settings_for(config)
    assert settings.memory == "1g" and settings.read_only_root is True
    twice = swe.parse_config({"project_dir": str(ROOT), "settings": {"timeout": 5}})
    with pytest.raises(ConfigError, match="set 'timeout' as its own key"):
        swe.settings_for(twice)


def test_env_wins_over_forwarded_host_variables_and_unset_ones_are_skipped():
    config = swe.parse_config({"env": {"A": "config"}, "forward_env": ["A", "B", "MISSING"]})
    assert swe.forwarded_env(config, {"A": "host", "B": "host"}) == {"A": "config", "B": "host"}


def test_mini_swe_agent_finds_the_environment_by_its_class_path():
    assert get_environment_class(swe.ENVIRONMENT_CLASS) is swe.StigmerEnvironment


# -- the environment over a sandbox ----------------------------------------------------------


class FakeSandbox:
    """Records `exec` calls and answers with scripted results."""

    name = "stigmer-sandbox-fake"

    def __init__(self, *answers: ExecResult | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[Any, dict[str, Any]]] = []
        self.removed = False

    def exec(self, command: Any, **options: Any) -> ExecResult:
        self.calls.append((command, options))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def remove(self) -> bool:
        self.removed = True
        return True


def environment(sandbox: FakeSandbox, **config: Any) -> swe.StigmerEnvironment:
    return swe.StigmerEnvironment(sandbox=sandbox, **config)  # type: ignore[arg-type]


def test_execute_runs_the_interpreter_in_the_sandbox_with_the_configs_options(monkeypatch):
    monkeypatch.setenv("HOST_ONLY", "h")
    sandbox = FakeSandbox(result(stdout="hi\n"), result())
    env = environment(sandbox, cwd="repo", env={"E": "1"}, forward_env=["HOST_ONLY"], timeout=7)
    assert env.execute({"command": "echo hi"})["output"] == "hi\n"
    env.execute({"command": "pwd"}, cwd="/tmp", timeout=3)
    (first, options), (second, later) = sandbox.calls
    assert first == ["bash", "-lc", "echo hi"]
    assert options == {
        "timeout": 7,
        "cwd": "/workspace/repo",
        "env": {"HOST_ONLY": "h", "E": "1"},
        "merge_output": True,
        "output_limit": None,
    }
    assert second == ["bash", "-lc", "pwd"]
    assert (later["cwd"], later["timeout"]) == ("/tmp", 3)


def test_execute_never_raises_for_a_failure_only_submits():
    sandbox = FakeSandbox(
        UsageError("a command cannot contain NUL bytes"),
        SandboxNotReady("the sandbox is not running"),
        result(stdout="COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT\ndone\n"),
    )
    env = environment(sandbox)
    bad = env.execute({"command": "x\0"})
    assert bad["returncode"] == -1 and bad["output"] == ""
    assert bad["exception_info"] == (
        "An error occurred while executing the command: a command cannot contain NUL bytes"
    )
    assert bad["extra"]["exception_type"] == "UsageError"
    assert env.execute({"command": "true"})["extra"]["exception_type"] == "SandboxNotReady"
    with pytest.raises(Submitted):
        env.execute({"command": "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT; echo done"})


def test_template_vars_hold_the_config_and_the_sandboxs_uname_read_once():
    uname = "Linux\nsandbox\n6.1.0\n#1 SMP\nx86_64\n"
    sandbox = FakeSandbox(result(stdout=uname))
    env = environment(sandbox, timeout=9)
    found = env.get_template_vars(task="t")
    assert found["system"] == "Linux" and found["node"] == "sandbox"
    assert found["release"] == "6.1.0" and found["machine"] == "x86_64"
    assert found["timeout"] == 9 and found["task"] == "t"
    assert env.get_template_vars()["version"] == "#1 SMP"
    assert len(sandbox.calls) == 1


def test_template_vars_fall_back_to_the_hosts_uname_when_the_sandbox_cannot_answer():
    env = environment(FakeSandbox(SandboxNotReady("gone")))
    assert env.get_template_vars()["system"] == platform.uname().system


def test_serialize_names_the_class_and_the_sandbox():
    env = environment(FakeSandbox())
    config = env.serialize()["info"]["config"]
    assert config["environment_type"] == swe.ENVIRONMENT_CLASS
    assert config["environment_sandbox"] == FakeSandbox.name
    assert config["environment"]["interpreter"] == ["bash", "-lc"]


def test_cleanup_leaves_a_given_sandbox_running_and_later_commands_fail_in_one_line():
    sandbox = FakeSandbox()
    env = environment(sandbox)
    env.cleanup()
    assert not sandbox.removed
    after = env.execute({"command": "true"})
    assert after["returncode"] == -1
    assert after["exception_info"].endswith("this environment was cleaned up: its sandbox is gone")
