from pathlib import Path

import pytest

from stigmer_sandbox import config
from stigmer_sandbox.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "invoke.yaml").write_text(text, encoding="utf-8")
    return tmp_path


def test_defaults_match_the_guide():
    s = config.load_settings("/nonexistent-project", environ={})
    assert s.image == "stigmer-sandbox-basic:local"
    assert s.container_name == "stigmer-sandbox"
    assert s.execution_mode == "sandbox"
    assert s.memory_bytes == 2 * 1024**3


def test_precedence_file_then_invoke_env_then_guide_env_then_arguments(tmp_path):
    write(tmp_path, "stigmer:\n  image: from-file:1\n  cpus: 1\n  pids_limit: 100\n")
    assert config.load_settings(tmp_path, environ={}).image == "from-file:1"
    env = {"INVOKE_STIGMER_IMAGE": "from-invoke-env:1", "INVOKE_STIGMER_CPUS": "1.5"}
    s = config.load_settings(tmp_path, environ=env)
    assert (s.image, s.cpus, s.pids_limit) == ("from-invoke-env:1", 1.5, 100)
    env["STIGMER_SANDBOX_IMAGE"] = "from-guide-env:1"
    assert config.load_settings(tmp_path, environ=env).image == "from-guide-env:1"
    s = config.load_settings(tmp_path, environ=env, image="from-flag:1")
    assert s.image == "from-flag:1"


def test_invoke_merged_config_then_guide_env_then_flags():
    merged = {"stigmer": {**config.defaults(), "execution_mode": "local"}}
    s = config.settings_from_invoke(merged, environ={})
    assert s.execution_mode == "local"
    s = config.settings_from_invoke(merged, environ={"STIGMER_EXECUTION_MODE": "sandbox"})
    assert s.execution_mode == "sandbox"
    s = config.settings_from_invoke(merged, environ={}, network="none")
    assert s.network == "none"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("stigmer: [1, 2\n", "invalid YAML at line"),
        ("stigmer:\n  imagee: x:1\n", "unknown key 'imagee'"),
        ("stigmer:\n  cpus: lots\n", "key 'cpus' must be float"),
        ("stigmer:\n  pids_limit: true\n", "key 'pids_limit' must be int"),
        ("stigmer:\n  image: Not An Image\n", "key 'image' must be an image reference"),
        ("stigmer:\n  network: host\n", "key 'network' must be one of bridge, none"),
        ("stigmer:\n  memory: lots\n", "key 'memory' must be a size"),
        ("- just\n- a list\n", "must be a mapping"),
    ],
)
def test_invalid_project_file_names_file_and_key(tmp_path, text, expected):
    write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        config.load_settings(tmp_path, environ={})
    message = str(caught.value)
    assert str(tmp_path / "invoke.yaml") in message
    assert expected in message
    assert "\n" not in message


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match="INVOKE_STIGMER_PIDS_LIMIT: must be int"):
        config.load_settings("/nonexistent", environ={"INVOKE_STIGMER_PIDS_LIMIT": "many"})
    with pytest.raises(ConfigError, match="INVOKE_STIGMER_MOUNT_AWS: must be bool"):
        config.load_settings("/nonexistent", environ={"INVOKE_STIGMER_MOUNT_AWS": "maybe"})


def test_bad_guide_variable_is_a_config_error():
    with pytest.raises(ConfigError, match="execution_mode"):
        config.load_settings("/nonexistent", environ={"STIGMER_EXECUTION_MODE": "cloud"})


@pytest.mark.parametrize(
    "good",
    [
        "stigmer-sandbox-basic:local",
        "debian:bookworm-slim",
        "registry.example:5000/team/img:v1.0.0",
        "img",
    ],
)
def test_image_names_accepted(good):
    assert config.Settings(image=good).image == good


@pytest.mark.parametrize("bad", ["UPPER:tag", "name:bad tag", "name;rm -rf /", "", "a:b:c"])
def test_image_names_rejected(bad):
    with pytest.raises(ConfigError):
        config.Settings(image=bad)


@pytest.mark.parametrize(
    ("text", "value"),
    [("2g", 2 * 1024**3), ("512m", 512 * 1024**2), ("1024", 1024), ("1.5g", int(1.5 * 1024**3))],
)
def test_parse_size(text, value):
    assert config.parse_size(text) == value


def test_split_image():
    assert config.split_image("a/b:c") == ("a/b", "c")
    assert config.split_image("host:5000/b") == ("host:5000/b", "latest")
    assert config.split_image("b") == ("b", "latest")


def test_example_config_lists_every_key_and_is_valid():
    root = Path(__file__).resolve().parents[2]
    example = root / "invoke.example.yaml"
    text = example.read_text(encoding="utf-8")
    for key in config.key_help():
        assert f"  {key}:" in text, key
    config.read_project_file(example)
