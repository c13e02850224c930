"""Property tests (Hypothesis) for what parses untrusted input on the host: mount paths,
configuration values and files, and the command line's `--env` pairs.

The properties: nothing raises but the tool's own errors (ConfigError, UsageError), and
whatever is accepted obeys the rule it was checked against (an accepted mount is never
in a refused folder, an accepted setting is one the runtime and Docker take).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from stigmer_sandbox import config, policy
from stigmer_sandbox.errors import ConfigError, SandboxError, UsageError
from stigmer_sandbox.relay import env_pairs
from stigmer_sandbox.runtime.client import commands

PROTECTED = policy.Protected(Path("/work/project"), Path("/work/project/.state"), Path("/root"))
# Path pieces that reach every rule: system, shared, scratch and credential folders, the
# protected ones, dot entries, empty components (//), NUL, a lone surrogate, a long name.
PIECES = st.sampled_from(
    [
        "", ".", "..", "etc", "var", "tmp", "run", "home", "root", "work", "project", ".state",
        ".ssh", ".aws", ".config", "docker.sock", "usr", "opt", "ws", "a", "\0", "\udc80",
        "\ud800", "x" * 300,
    ]
)  # fmt: skip
PATH_TEXT = st.one_of(
    st.lists(PIECES, max_size=12).map("/".join),
    st.lists(PIECES, max_size=12).map(lambda parts: "/" + "/".join(parts)),
    st.text(max_size=300),
    st.text(alphabet="/.a", min_size=4000, max_size=5000),
)
PROPERTY = settings(max_examples=150, deadline=None)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


@PROPERTY
@given(PATH_TEXT, st.booleans(), st.booleans())
def test_mount_problem_answers_every_path_without_raising(text, credentials, read_only):
    problem = policy.mount_problem(Path(text), PROTECTED, credentials, read_only)
    assert problem is None or isinstance(problem, str)


@PROPERTY
@given(PATH_TEXT)
def test_an_accepted_mount_is_never_in_a_refused_folder(text):
    if policy.mount_problem(Path(text), PROTECTED) is not None:
        return
    resolved = Path(text).resolve()
    assert str(resolved) not in policy.SHARED_FOLDERS
    for folder in PROTECTED.project, PROTECTED.state, PROTECTED.home:
        assert not _inside(folder, resolved), folder
    for socket in policy.DOCKER_SOCKETS:
        assert not _inside(Path(socket).resolve(), resolved)
    scratch = any(_inside(resolved, Path(folder)) for folder in policy.SCRATCH_FOLDERS)
    assert scratch or not any(_inside(resolved, Path(f)) for f in policy.SYSTEM_FOLDERS)
    assert not any(_inside(resolved, PROTECTED.home / n) for n in policy.CREDENTIAL_FOLDERS)


@settings(max_examples=50, deadline=None)
@given(PATH_TEXT)
def test_a_configured_folder_is_checked_or_refused_with_one_config_error(text):
    try:
        current = config.Settings(project_dir="/work/project", logs=text)
        folders = policy.sandbox_folders(current)
    except ConfigError as exc:
        assert "\n" not in exc.message
        return
    assert folders["logs"].is_absolute()


# Random symlink-free trees: each entry a relative folder path.
TREES = st.lists(
    st.lists(st.sampled_from(["a", "b", "ws", "c d", "é"]), min_size=1, max_size=4).map("/".join),
    min_size=1,
    max_size=8,
)
LOOKUPS = st.lists(st.sampled_from(["a", "b", "ws", "..", ".", "c d", "é", "zz"]), max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TREES, LOOKUPS)
def test_in_a_symlink_free_tree_the_trail_and_the_pin_agree_with_the_kernel(tree, lookup):
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch).resolve()
        for folder in tree:
            (root / folder).mkdir(parents=True, exist_ok=True)
        path = root.joinpath(*lookup)
        resolved = Path(os.path.realpath(path))
        trail = policy.resolution_trail(path)
        assert ".." in lookup or trail[-1] == resolved  # ".." steps back after a lookup
        workspace = {"workspace": root / "ws"}
        if (root / "ws") in resolved.parents:
            assert policy.planted_problem(path, workspace), "a path into the workspace passed"
        if ".." not in lookup and (root / "ws") not in resolved.parents:
            assert policy.planted_problem(path, workspace) is None
        if resolved.is_dir():
            with policy.open_folder("logs", resolved) as fd:
                assert os.fstat(fd).st_ino == resolved.stat().st_ino


NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=20),
    st.none(),
    st.lists(st.integers(), max_size=2),
)
NUMERIC_KEYS = ["cpus", "pids_limit", "timeout", "output_limit", "relay_idle_s"]
NUMERIC_KEYS += ["pool_max_size", "max_lifetime_hours"]
SIZE_KEYS = ["memory", "tmp_size", "snapshot_max_size"]
SIZES = st.one_of(
    st.text(max_size=30),
    st.from_regex(r"\A\s?[0-9]{0,25}(\.[0-9]{0,3})?\s?[bkmgBKMG]?[bB]?\s?\Z"),
)


@PROPERTY
@given(st.sampled_from(NUMERIC_KEYS), NUMBERS)
def test_a_number_setting_is_accepted_within_bounds_or_refused(key, value):
    try:
        current = config.Settings().replace(**{key: value})
    except ConfigError:
        return
    accepted = getattr(current, key)
    metadata = config._FIELDS[key].metadata
    assert accepted >= 0 and (metadata["maximum"] is None or accepted <= metadata["maximum"])
    assert metadata["above"] is None or accepted > metadata["above"]


@PROPERTY
@given(st.sampled_from(SIZE_KEYS), SIZES)
def test_a_size_setting_is_a_size_docker_and_the_kernel_take_or_refused(key, value):
    try:
        current = config.Settings().replace(**{key: value})
    except ConfigError:
        return
    size = config.parse_size(getattr(current, key))
    assert 0 <= size <= config.MAX_SIZE
    assert key == "snapshot_max_size" or size > 0
    kernel = policy.tmpfs_size(value)
    assert kernel.isascii() and policy._KERNEL_SIZE.fullmatch(kernel)


@PROPERTY
@given(
    st.floats(min_value=0, max_value=2 * config.MAX_TIMEOUT_S),
    st.integers(min_value=-3, max_value=2 * config.MAX_OUTPUT_LIMIT),
)
def test_every_accepted_timeout_and_output_limit_make_a_request(timeout, limit):
    try:
        current = config.Settings(timeout=timeout, output_limit=limit)
    except ConfigError:
        return
    request = commands.Request.build(current, "true", {})
    assert (request.timeout, request.limit) == (current.timeout, current.output_limit)


@PROPERTY
@given(st.text(max_size=140))
def test_a_container_name_is_one_docker_takes_or_refused(name):
    try:
        config.Settings(container_name=name)
    except ConfigError:
        return
    # Docker's own rule: [a-zA-Z0-9][a-zA-Z0-9_.-]+ (two characters at least), ASCII.
    assert len(name) >= 2 and name.isascii() and name[0].isalnum() and "\n" not in name
    assert all(ch.isalnum() or ch in "_.-" for ch in name)


@PROPERTY
@given(st.text(max_size=80))
def test_an_image_reference_without_a_newline_or_refused(reference):
    try:
        config.Settings(image=reference)
    except ConfigError:
        return
    assert reference.isascii() and reference == reference.strip() and reference


@PROPERTY
@given(st.dictionaries(st.sampled_from(list(config._FIELDS)), st.text(max_size=30), max_size=4))
def test_environment_variables_are_refused_only_with_a_config_error(values):
    environ = {config.ENV_PREFIX + key.upper(): value for key, value in values.items()}
    try:
        config.check_environment(environ)
    except ConfigError as exc:
        assert exc.message.startswith(config.ENV_PREFIX)


YAML_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), YAML_VALUES.map(yaml.safe_dump)))
def test_a_project_file_is_read_or_refused_with_one_config_error(text):
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "invoke.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        try:
            section = config.read_project_file(path)
        except ConfigError as exc:
            assert str(path) in exc.message
            return
        assert isinstance(section, dict)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(list(config._FIELDS)), YAML_VALUES, max_size=3))
def test_a_stigmer_section_is_read_or_refused_naming_the_file(section):
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "invoke.yaml"
        path.write_text(yaml.safe_dump({"stigmer": section}), encoding="utf-8")
        try:
            config.read_project_file(path)
        except ConfigError as exc:
            assert exc.message.startswith(str(path)) and "\n" not in exc.message


@PROPERTY
@given(st.lists(st.text(max_size=30), max_size=5))
def test_env_pairs_parse_or_refuse_with_a_usage_error(pairs):
    try:
        parsed = env_pairs(pairs)
    except UsageError:
        assert any("=" not in pair or pair.startswith("=") for pair in pairs)
        return
    assert set(parsed) == {pair.partition("=")[0] for pair in pairs}
    with contextlib.suppress(UsageError):  # what the runtime refuses (NUL), it says so
        commands.check_env(parsed)


@PROPERTY
@given(st.text(alphabet="abcé=\0\udc80 ", max_size=20), st.text(max_size=20))
def test_env_pairs_keep_the_value_after_the_first_equals_sign(key, value):
    assume(key and "=" not in key)
    assert env_pairs([f"{key}={value}"]) == {key: value}


def test_sandbox_errors_are_the_only_errors_the_policy_raises_for_a_missing_folder(tmp_path):
    with pytest.raises(SandboxError):
        policy.pin_mounts([{"Source": str(tmp_path / "gone"), "Target": "/logs"}])
