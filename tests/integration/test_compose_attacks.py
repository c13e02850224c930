"""Issue 20, red team, on a real Compose (v1 here): compose files that would weaken the
sandbox are refused by `inv compose.up` with one line naming the file, service and key,
a non-zero exit, and nothing started or created, however the setting gets there:
directly, through `extends` (same file or another), a second `--file`, `.env` or the
environment, or a YAML anchor and merge key."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings

from stigmer_sandbox import config, policy
from stigmer_sandbox.errors import ConfigError
from stigmer_sandbox.host import compose, compose_check

from ..conftest import ROOT
from ..unit.test_compose_logic import extends_chains, write_chain
from .compose_support import sandbox_env, unique_name

# key -> a value that weakens the sandbox, as written in a user's compose file.
ATTACKS = {
    "cap_add": ["SYS_ADMIN"],
    "privileged": True,
    "pid": "host",
    "ipc": "host",
    "network_mode": "host",
    "uts": "host",
    "userns_mode": "host",
    "devices": ["/dev/kmsg:/dev/kmsg"],
    "cgroup_parent": "/",
    "sysctls": {"net.ipv4.ip_unprivileged_port_start": "0"},
    "environment": ["LD_PRELOAD=/workspace/evil.so"],
}
SECURITY_OPTS = ["seccomp=unconfined", "seccomp:unconfined", "apparmor=unconfined", "label:disable"]
VOLUMES = ["/var/run/docker.sock:/var/run/docker.sock", "/etc:/host-etc", "/:/host:ro"]


@pytest.fixture
def project(tmp_path, docker_engine):
    """A copy of the project's compose files in tmp, and settings pointing into tmp."""
    folder = tmp_path / "project"
    folder.mkdir()
    for name in (compose.BASE_FILE, compose.ADVANCED_FILE, compose.DATABASE_FILE):
        shutil.copy(ROOT / name, folder / name)
    env = sandbox_env(tmp_path, unique_name(), project_dir=str(folder))
    return folder, env


def write(folder: Path, name: str, document: dict, prefix: str = "") -> str:
    (folder / name).write_text(prefix + yaml.safe_dump(document), encoding="utf-8")
    return name


def assert_refused(inv, env, docker_engine, args, key, file_name, service="sandbox"):
    done = inv("compose.up", *args, env=env)
    line = done.stderr.strip()
    assert done.returncode == 2, done.stdout + done.stderr
    assert "\n" not in line and "Traceback" not in line, line
    if "Unsupported config option" in line:  # compose itself refuses it (v1: uts)
        assert f"services.{service}: '{key}'" in line, line
    else:
        assert f"service '{service}': {key}: " in line and file_name in line, line
    name = env["INVOKE_STIGMER_CONTAINER_NAME"]
    assert not docker_engine.containers.list(all=True, filters={"name": name})
    assert not Path(env["INVOKE_STIGMER_WORKSPACE"]).exists(), "nothing on disk changes"


def sandbox_with(setting: dict) -> dict:
    return {"services": {"sandbox": setting}}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        *ATTACKS.items(),
        *(("security_opt", [option]) for option in SECURITY_OPTS),
        *(("volumes", [volume]) for volume in VOLUMES),
    ],
)
def test_a_second_file_cannot_weaken_the_sandbox(inv, project, docker_engine, key, value):
    folder, env = project
    name = write(folder, "mine.yml", sandbox_with({key: value}))
    assert_refused(inv, env, docker_engine, ["--file", name], key, "mine.yml")


def test_extends_from_another_file(inv, project, docker_engine):
    folder, env = project
    write(folder, "base.yml", {"services": {"root": {"image": "x", "pid": "host"}}})
    name = write(
        folder, "mine.yml", sandbox_with({"extends": {"file": "base.yml", "service": "root"}})
    )
    assert_refused(inv, env, docker_engine, ["--file", name], "pid", "base.yml")


def test_extends_within_the_same_file_through_an_edited_base_file(inv, project, docker_engine):
    folder, env = project
    base = (folder / compose.BASE_FILE).read_text()
    helper = "  weak:\n    image: x\n    privileged: true\n"
    edited = base.replace("  sandbox:\n", "  sandbox:\n    extends: weak\n", 1) + helper
    (folder / compose.BASE_FILE).write_text(
        edited.replace("services:\n", "services:\n" + helper, 1)
    )
    assert_refused(inv, env, docker_engine, [], "privileged", compose.BASE_FILE, "sandbox")


@pytest.mark.parametrize("source", ["dotenv", "environment"])
def test_interpolation_from_dotenv_or_the_environment(inv, project, docker_engine, source):
    folder, env = project
    name = write(folder, "mine.yml", sandbox_with({"privileged": "${STIGMER_TEST_X:-false}"}))
    if source == "dotenv":
        (folder / ".env").write_text("STIGMER_TEST_X=true\n")
    else:
        env = {**env, "STIGMER_TEST_X": "true"}
    assert_refused(inv, env, docker_engine, ["--file", name], "privileged", "mine.yml")


def test_a_yaml_anchor_and_merge_key(inv, project, docker_engine):
    folder, env = project
    text = (
        "x-weak: &weak\n  security_opt: ['seccomp:unconfined']\n"
        "services:\n  sandbox:\n    <<: *weak\n"
    )
    (folder / "mine.yml").write_text(text)
    assert_refused(inv, env, docker_engine, ["--file", "mine.yml"], "security_opt", "mine.yml")


def test_top_level_volumes_and_secrets_cannot_bind_the_host(inv, project, docker_engine):
    folder, env = project
    bound = {"driver_opts": {"type": "none", "o": "bind", "device": "/var/run"}}
    document = {"services": {"sandbox": {"volumes": ["run:/hostrun"]}}, "volumes": {"run": bound}}
    name = write(folder, "mine.yml", document)
    done = inv("compose.up", "--file", name, env=env)
    assert done.returncode == 2 and "mine.yml: volumes: run binds /var/run" in done.stderr
    secret = sandbox_with({"secrets": ["s"]}) | {"secrets": {"s": {"file": "/var/run/docker.sock"}}}
    done = inv("compose.up", "--file", write(folder, "secret.yml", secret), env=env)
    assert done.returncode == 2 and "secret.yml: secrets: s mounts" in done.stderr
    assert not Path(env["INVOKE_STIGMER_WORKSPACE"]).exists()


def test_a_broken_or_missing_extends_is_one_line(inv, project):
    folder, env = project
    name = write(
        folder, "mine.yml", sandbox_with({"extends": {"file": "nope.yml", "service": "x"}})
    )
    done = inv("compose.up", "--file", name, env=env)
    line = done.stderr.strip()
    assert done.returncode == 2 and "\n" not in line and "compose config refused" in line, line


def test_the_project_files_pass_the_resolved_check(inv, project):
    _folder, env = project
    done = inv("compose.config", "--advanced", "--database", env=env)
    assert done.returncode == 0, done.stderr
    assert "cap_add" in done.stdout and "SETUID" in done.stdout


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chain=extends_chains())
def test_generated_extends_and_merge_chains_resolved_by_compose_are_refused(chain, docker_engine):
    """Hypothesis: a dangerous key at a random depth of an `extends` chain across files,
    or behind a merge key, resolved by the real compose, is refused naming that key and
    the file it is written in."""
    files, where, key, value, via_anchor = chain
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_chain(root, files, where, key, value, via_anchor)
        target = compose.ComposeProject(compose.detect("auto"), root, (root / "f0.yml",), {})
        mounts = compose_check.MountContext(root, policy.Protected.of(config.Settings()))
        try:
            compose_check.refuse(compose.resolved_config(target), target.files, mounts)
        except ConfigError as exc:
            message = exc.message
        else:
            pytest.fail(f"{key}: {value} at {where} was not refused")
        assert "\n" not in message
        if message.startswith("compose config refused"):  # compose refused the value itself
            assert key in message, message
            return
        # Every service of f0.yml is a service of the project, refused in its own name.
        services = files["f0.yml"]["services"]
        assert any(f"service '{s}': {key}: " in message for s in services), message
        assert message.startswith(f"{root / where[0]}: "), message
