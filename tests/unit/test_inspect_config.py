"""The inspect_ai provider's configuration and result mapping, without an engine."""

from __future__ import annotations

import asyncio
import errno
import json
from types import SimpleNamespace

import pytest

pytest.importorskip(
    "inspect_ai", reason="inspect_ai is not installed (pip install 'stigmer-sandbox[inspect]')"
)

from inspect_ai.util import (
    OutputLimitExceededError,
    SandboxEnvironmentSpec,
    SandboxUnavailableError,
    SandboxUserUnsupportedError,
)
from inspect_ai.util._sandbox.registry import registry_find_sandboxenv
from pydantic import BaseModel

from stigmer_sandbox.errors import ConfigError, SandboxNotReady, UsageError
from stigmer_sandbox.integrations import adapter
from stigmer_sandbox.integrations import inspect_ai as provider
from stigmer_sandbox.integrations.inspect_ai import (
    INSPECT_LABEL,
    StigmerSandboxConfig,
    StigmerSandboxEnvironment,
)
from stigmer_sandbox.runtime import ExecResult

from ..conftest import ROOT


def result(**changes) -> ExecResult:
    return ExecResult(**{"exit_code": 0, "stdout": "", "stderr": "", "duration_s": 0.1, **changes})


# -- configuration ---------------------------------------------------------------------------


def test_the_type_is_registered_as_stigmer_and_finds_its_config_files():
    assert registry_find_sandboxenv("stigmer") is StigmerSandboxEnvironment
    assert "stigmer-sandbox.yaml" in StigmerSandboxEnvironment.config_files()
    assert not StigmerSandboxEnvironment.is_docker_compatible()


def test_a_config_file_in_yaml_or_json_gives_the_same_config(tmp_path):
    yaml_file = tmp_path / "stigmer-sandbox.yaml"
    yaml_file.write_text("memory: 1g\negress: allowlist\nallow: [pypi.org]\npool_size: 3\n")
    json_file = tmp_path / "config.json"
    values = {"memory": "1g", "egress": "allowlist", "allow": ["pypi.org"], "pool_size": 3}
    json_file.write_text(json.dumps(values))
    from_yaml, from_json = provider.load_config(yaml_file), provider.load_config(json_file)
    assert from_yaml == from_json
    assert (from_yaml.memory, from_yaml.allow, from_yaml.pool_size) == ("1g", ("pypi.org",), 3)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert provider.load_config(empty) == StigmerSandboxConfig()


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("memroy: 1g\n", "memroy: Extra inputs are not permitted"),
        ("egress: sometimes\n", "egress: Input should be"),
        ("pool_size: -1\n", "pool_size: Input should be greater than or equal to 0"),
        ("- a list\n", "must be a mapping of keys, got list"),
        ("memory: [1g\n", "invalid YAML"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_file_and_key(tmp_path, text, said):
    file = tmp_path / "bad.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError) as raised:
        provider.load_config(file)
    message = str(raised.value)
    assert message.startswith(str(file)) and said in message and "\n" not in message


def test_a_missing_config_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        provider.as_config(str(tmp_path / "absent.yaml"))


def test_what_inspect_passes_becomes_a_config():
    assert provider.as_config(None) == StigmerSandboxConfig()
    given = StigmerSandboxConfig(cpus=1)
    assert provider.as_config(given) is given
    assert provider.as_config({"cpus": 1}) == given

    class Other(BaseModel):
        x: int = 1

    with pytest.raises(ConfigError, match="not a Other"):
        provider.as_config(Other())


def test_the_config_round_trips_through_inspects_spec_and_is_hashable():
    config = StigmerSandboxConfig(
        memory="1g", labels={"team": "evals"}, settings={"pids_limit": 64}
    )
    spec = SandboxEnvironmentSpec("stigmer", config)
    again = SandboxEnvironmentSpec.model_validate(json.loads(spec.model_dump_json()))
    assert again.config == config and isinstance(again.config, StigmerSandboxConfig)
    assert hash(spec) == hash(again) and len({spec, again}) == 1


def test_settings_come_from_the_project_then_the_configs_own_keys():
    config = StigmerSandboxConfig(
        memory="1g", timeout=30, project_dir=str(ROOT), settings={"read_only_root": True}
    )
    settings = provider.settings_for(config)
    assert (settings.memory, settings.timeout, settings.read_only_root) == ("1g", 30.0, True)
    assert settings.root == ROOT


def test_a_key_given_twice_or_a_bad_setting_is_one_config_error():
    with pytest.raises(ConfigError, match="'memory' as its own key"):
        provider.settings_for(
            StigmerSandboxConfig(project_dir=str(ROOT), settings={"memory": "1g"})
        )
    with pytest.raises(ConfigError, match="'egress' as its own key"):
        provider.settings_for(
            StigmerSandboxConfig(project_dir=str(ROOT), settings={"egress": "none"})
        )
    with pytest.raises(ConfigError, match="memory"):
        provider.settings_for(StigmerSandboxConfig(project_dir=str(ROOT), memory="lots"))
    with pytest.raises(ConfigError, match="no_such_key"):
        provider.settings_for(
            StigmerSandboxConfig(project_dir=str(ROOT), settings={"no_such_key": 1})
        )


def test_pool_options_carry_the_image_egress_and_labels():
    config = StigmerSandboxConfig(
        image="stigmer-sandbox-basic:local",
        egress="allowlist",
        allow=("pypi.org",),
        isolation="gvisor",
        pool_size=4,
        labels={"team": "evals"},
        project_dir=str(ROOT),
    )
    options = provider.pool_options(config)
    assert options["size"] == 4 and options["image"] == "stigmer-sandbox-basic:local"
    assert options["isolation"] == "gvisor"
    assert (options["egress"], options["allow"]) == ("allowlist", ("pypi.org",))
    assert options["extra_labels"] == {"team": "evals", INSPECT_LABEL: "true"}


def test_a_relative_project_folder_is_fixed_where_the_config_was_first_seen(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = StigmerSandboxConfig(cpus=0.5, labels={"case": tmp_path.name})
    fixed = provider.resolved_config(config)
    assert fixed.project_dir == str(tmp_path.resolve())
    monkeypatch.chdir(ROOT)
    assert provider.resolved_config(config) is fixed


# -- results ---------------------------------------------------------------------------------


def test_an_ordinary_result_keeps_its_streams_and_exit_code():
    mapped = provider.exec_result(result(exit_code=3, stdout="out", stderr="err"), 10, 1024)
    assert (mapped.success, mapped.returncode, mapped.stdout, mapped.stderr) == (
        False,
        3,
        "out",
        "err",
    )
    assert provider.exec_result(result(stdout="fine\n"), 10, 1024).success


def test_a_timeout_raises_timeout_error_with_the_partial_output():
    with pytest.raises(TimeoutError, match="after 2 seconds") as raised:
        provider.exec_result(result(exit_code=124, timed_out=True, stdout="half"), 2, 1024)
    assert raised.value.truncated_output == "half"  # type: ignore[attr-defined]


def test_output_past_the_limit_raises_with_the_head_and_tail_kept():
    cut = result(stdout="head...tail", truncated={"stdout": True, "stderr": False})
    with pytest.raises(OutputLimitExceededError) as raised:
        provider.exec_result(cut, 10, 10 * 1024 * 1024)
    assert raised.value.limit_str == "10 MiB" and raised.value.truncated_output == "head...tail"


def test_a_lost_result_is_an_unavailable_sandbox():
    with pytest.raises(SandboxUnavailableError, match="the agent died"):
        provider.exec_result(result(exit_code=None, error="the agent died"), 10, 1024)


def test_an_oom_kill_and_a_command_that_could_not_start_say_so_on_stderr():
    oom = provider.exec_result(result(exit_code=137, oom_killed=True, stderr="x\n"), 10, 1024)
    assert oom.returncode == 137 and oom.stderr == f"x\n\n{adapter.OOM_NOTICE}\n"
    missing = provider.exec_result(result(exit_code=127, error="nope: not found"), 10, 1024)
    assert missing.stderr == "stigmer-sandbox: the command could not start: nope: not found\n"


def test_file_errors_are_the_ones_inspect_expects():
    too_big = adapter.file_error("big.bin", "file_too_large", provider.READ_ERRORS)
    assert isinstance(too_big, OutputLimitExceededError) and too_big.limit_str == "60 MiB"
    written = adapter.file_error("big.bin", "file_too_large", provider.WRITE_ERRORS)
    assert isinstance(written, OSError) and written.errno == errno.EFBIG
    missing = adapter.file_error("nonexistent", "file_not_found", provider.READ_ERRORS)
    assert isinstance(missing, FileNotFoundError) and "nonexistent" in str(missing)
    gone = adapter.sandbox_error(SandboxNotReady("released"), provider.EXEC_ERRORS)
    assert isinstance(gone, SandboxUnavailableError)
    assert isinstance(
        adapter.sandbox_error(UsageError("empty command"), provider.EXEC_ERRORS), ValueError
    )


def test_only_the_sandbox_user_may_run_commands():
    fake = SimpleNamespace(sandbox_user=(1000, 1000))
    environment = StigmerSandboxEnvironment(fake)  # type: ignore[arg-type]
    asyncio.run(environment._check_user(None))
    asyncio.run(environment._check_user("1000"))
    for other in ("root", "0"):
        with pytest.raises(SandboxUserUnsupportedError, match="uid 1000"):
            asyncio.run(environment._check_user(other))
