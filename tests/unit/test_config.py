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
        ("stigmer:\n  cpus: lots\n", "key 'cpus' must be a number"),
        ("stigmer:\n  pids_limit: true\n", "key 'pids_limit' must be a whole number"),
        ("stigmer:\n  image: Not An Image\n", "key 'image' must be an image reference"),
        ("stigmer:\n  network: host\n", "key 'network' must be one of bridge, none"),
        ("stigmer:\n  memory: lots\n", "key 'memory' must be a size"),
        ("- just\n- a list\n", "must be a mapping"),
        ("stigmer:\n  memroy: 2g\n", "unknown key 'memroy'"),
        ("stigmer:\n  sandbox:\n    memory: lots\n", "unknown key 'sandbox'"),
        ("stigmer:\n  timeout: -1\n", "key 'timeout' must be more than 0 and at most 604800"),
        ("stigmer:\n  timeout: 0\n", "key 'timeout' must be more than 0"),
        ("stigmer:\n  timeout: .nan\n", "key 'timeout' must be a finite number"),
        ("stigmer:\n  cpus: .inf\n", "key 'cpus' must be a finite number"),
        ("stigmer:\n  timeout: '30'\n", "key 'timeout' must be a number, got '30'"),
        ("stigmer:\n  output_limit: -1\n", "key 'output_limit' must be more than 1"),
        ("stigmer:\n  output_limit: 1\n", "key 'output_limit' must be more than 1"),
        ("stigmer:\n  pids_limit: -1\n", "key 'pids_limit' must not be negative"),
        ("stigmer:\n  pids_limit: 5000000\n", "key 'pids_limit' must be at most 4194304"),
        ("stigmer:\n  pids_limit: 1.5\n", "key 'pids_limit' must be a whole number"),
        ("stigmer:\n  memory: '0'\n", "key 'memory' must be more than 0"),
        ("stigmer:\n  tmp_size: 0k\n", "key 'tmp_size' must be more than 0"),
        ("stigmer:\n  memory: 99999999999999999999g\n", "key 'memory' must be at most"),
        ("stigmer:\n  memory: '" + "9" * 5000 + "'\n", "key 'memory' must be a size"),
        ("stigmer:\n  pids_limit: " + "9" * 5000 + "\n", "cannot be loaded: 'Exceeds the limit"),
        ("stigmer: " + "[" * 100_000 + "\n", "cannot be loaded: 'maximum recursion depth"),
        ("stigmer:\n  bootstrap_npm_packages: [a, b]\n", "'bootstrap_npm_packages' must be text"),
        ("stigmer:\n  workspace: [a]\n", "key 'workspace' must be text"),
        ('stigmer:\n  git_name: "a\\0b"\n', "key 'git_name' must be text without NUL"),
        ('stigmer:\n  workspace: "\\ud800"\n', "key 'workspace' must be text without NUL"),
        ("stigmer:\n  mount_aws: yes please\n", "key 'mount_aws' must be true or false"),
        ("stigmer:\n  cpus: 5000\n", "key 'cpus' must be at most 1024"),
        ("stigmer:\n  1: 2\n", "unknown key '1'"),
        ("stigmer: 3\n", "section 'stigmer' must be a mapping"),
        ("stigmer:\n  container_name: a\n", "key 'container_name' must be letters"),
        ('stigmer:\n  container_name: "ab\\n"\n', "key 'container_name' must be letters"),
        ('stigmer:\n  image: "x:1\\n"\n', "key 'image' must be an image reference"),
        ("stigmer:\n  memory: \u0662g\n", "key 'memory' must be a size"),
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
    with pytest.raises(ConfigError, match="INVOKE_STIGMER_PIDS_LIMIT: must be a whole number"):
        config.load_settings("/nonexistent", environ={"INVOKE_STIGMER_PIDS_LIMIT": "many"})
    with pytest.raises(ConfigError, match="INVOKE_STIGMER_MOUNT_AWS: must be true or false"):
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


def test_an_unknown_key_suggests_the_close_one(tmp_path):
    write(tmp_path, "stigmer:\n  memroy: 2g\n")
    with pytest.raises(ConfigError) as caught:
        config.load_settings(tmp_path, environ={})
    assert caught.value.hint is not None and "did you mean 'memory'?" in caught.value.hint


def test_a_long_bad_value_is_cut_in_the_error_line(tmp_path):
    write(tmp_path, "stigmer:\n  image: " + "X" * 10_000 + "\n")
    with pytest.raises(ConfigError) as caught:
        config.load_settings(tmp_path, environ={})
    assert len(caught.value.message) < 300


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("INVOKE_STIGMER_TIMEOUT", "abc", "INVOKE_STIGMER_TIMEOUT: must be a number"),
        ("INVOKE_STIGMER_TIMEOUT", "0", "INVOKE_STIGMER_TIMEOUT: key 'timeout' must be more"),
        ("INVOKE_STIGMER_TIMEOUT", "nan", "must be a finite number"),
        ("INVOKE_STIGMER_MEMORY", "lots", "INVOKE_STIGMER_MEMORY: key 'memory' must be a size"),
        ("INVOKE_STIGMER_PIDS_LIMIT", "1.5", "must be a whole number"),
    ],
)
def test_check_environment_names_the_variable(variable, value, expected):
    with pytest.raises(ConfigError, match=expected):
        config.check_environment({variable: value})
    merged = {"stigmer": config.defaults()}
    with pytest.raises(ConfigError, match=expected):
        config.settings_from_invoke(merged, environ={variable: value})


class FakeInvokeConfig(dict):
    """What settings_from_invoke reads of Invoke's Config: merged data and each file."""

    def __init__(self, merged: dict, **levels: object) -> None:
        super().__init__(merged)
        for name, value in levels.items():
            setattr(self, name, value)


def test_settings_from_invoke_names_the_file_that_holds_the_bad_key():
    user = {"stigmer": {"timeout": -5}}
    merged = {"stigmer": {**config.defaults(), "timeout": -5}}
    source = FakeInvokeConfig(merged, _user=user, _user_path="/home/me/.invoke.yaml")
    with pytest.raises(ConfigError, match=r"^/home/me/\.invoke\.yaml: key 'timeout'"):
        config.settings_from_invoke(source, environ={})
    source = FakeInvokeConfig(merged, _runtime={"stigmer": "x"}, _runtime_path="/r.yaml")
    with pytest.raises(ConfigError, match=r"^/r\.yaml: section 'stigmer' must be a mapping"):
        config.settings_from_invoke(source, environ={})


@pytest.mark.parametrize(
    ("text", "size"),
    [("2g", 2 * 1024**3), ("1.5k", 1536), (" 512m ", 512 * 1024**2), ("2gb", 2 * 1024**3)],
)
def test_parse_size_is_exact(text, size):
    assert config.parse_size(text) == size


def test_parse_size_of_a_huge_number_does_not_overflow():
    assert config.parse_size("9" * 400 + "g") == int("9" * 400) * 1024**3
