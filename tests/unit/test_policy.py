"""The sandbox policy: mounts, the sandbox user, and the container's confinement."""

import os
from pathlib import Path

import pytest

from stigmer_sandbox import config, policy
from stigmer_sandbox.errors import ConfigError
from stigmer_sandbox.runtime.sandbox import spec_hash


def settings(tmp_path: Path, **changes) -> config.Settings:
    return config.Settings(project_dir=str(tmp_path / "project")).replace(**changes)


def test_container_spec_is_hardened_by_default(tmp_path):
    spec = policy.container_spec(settings(tmp_path), "img:1", {})
    assert spec["cap_drop"] == ["ALL"]
    assert spec["cap_add"] == ["SETUID", "SETGID", "KILL"]
    assert spec["user"] == "0:0"  # PID 1 and the agent; commands run as the sandbox user
    assert spec["security_opt"] == ["no-new-privileges:true"]
    assert spec["privileged"] is False
    assert spec["pids_limit"] == 512
    assert spec["mem_limit"] == spec["memswap_limit"] == 2 * 1024**3
    assert spec["nano_cpus"] == 2_000_000_000
    assert spec["tmpfs"] == {
        "/tmp": "rw,exec,nosuid,nodev,size=512m",
        "/run/stigmer": "rw,noexec,nosuid,nodev,mode=0700,size=256m",
    }
    assert spec["network_mode"] == "bridge"
    assert all(m["BindOptions"]["Propagation"] == "rprivate" for m in spec["mounts"])
    assert [m["Target"] for m in spec["mounts"]] == ["/workspace", "/logs"]
    assert spec["environment"]["GIT_AUTHOR_NAME"] == "Stigmer Sandbox"


def test_git_identity_is_configurable(tmp_path):
    spec = policy.container_spec(settings(tmp_path, git_name="Bot", git_email="b@x"), "i:1", {})
    assert spec["environment"]["GIT_COMMITTER_NAME"] == "Bot"
    assert spec["environment"]["GIT_AUTHOR_EMAIL"] == "b@x"


def test_lifetime_wraps_the_keepalive(tmp_path):
    spec = policy.container_spec(settings(tmp_path, max_lifetime_hours=1.5), "img:1", {})
    keepalive = "/usr/local/bin/sandbox-keepalive"
    assert spec["command"] == ["/usr/bin/timeout", "-s", "TERM", "5400", keepalive]
    spec = policy.container_spec(settings(tmp_path, max_lifetime_hours=0.0), "img:1", {})
    assert spec["command"] == [keepalive]


def test_spec_hash_changes_with_image_and_limits(tmp_path):
    spec = policy.container_spec(settings(tmp_path), "img:1", {})
    other = policy.container_spec(settings(tmp_path, memory="1g"), "img:1", {})
    assert spec_hash(spec, "sha256:a") == spec_hash(spec, "sha256:a")
    assert spec_hash(spec, "sha256:a") != spec_hash(spec, "sha256:b")
    assert spec_hash(spec, "sha256:a") != spec_hash(other, "sha256:a")


@pytest.mark.parametrize(
    "folder",
    [
        "/",
        "/etc",
        "/etc/cron.d",
        "/var/run",
        "/run",
        "/var",
        "/var/lib/docker/volumes",
        "/usr/local/bin",
        "/root",
        "/home",
        "/tmp",
        "/proc/self",
        "/boot/grub",
    ],
)
def test_system_and_shared_folders_are_refused_and_so_is_anything_inside(tmp_path, folder):
    with pytest.raises(ConfigError, match=r"^workspace: .*refusing to mount it"):
        policy.checked_mount(settings(tmp_path), "workspace", Path(folder))


def test_the_docker_socket_and_folders_holding_it_are_refused(tmp_path):
    for path in ("/var/run/docker.sock", "/run"):
        with pytest.raises(ConfigError, match=r"Docker socket|system folder|shared"):
            policy.checked_mount(settings(tmp_path), "workspace", Path(path))


def test_project_state_and_home_folders_are_refused(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    current = config.Settings(project_dir=str(tmp_path / "work" / "project"))
    current = current.replace(state_dir=str(tmp_path / "state"))
    cases = {
        current.root: "the project folder",
        current.root.parent: "the project folder",
        tmp_path: "is or contains",
        tmp_path / "state": "the tool's state folder",
        home: "your home folder",
        home / ".ssh" / "keys": "credentials folder",
        home / ".aws": "credentials folder",
    }
    for path, reason in cases.items():
        with pytest.raises(ConfigError, match=reason):
            policy.checked_mount(current, "workspace", path)
    assert policy.checked_mount(current, "workspace", home / "sandboxes" / "ws")
    assert policy.checked_mount(current, "workspace", tmp_path / "work" / "elsewhere")
    assert policy.checked_mount(current, "workspace", current.root / "workspace")


def test_a_root_users_home_may_hold_a_workspace_but_not_its_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", "/root")
    current = settings(tmp_path)
    assert policy.checked_mount(current, "workspace", Path("/root/projects/ws"))
    for path in ("/root", "/root/.ssh", "/root/.kube/config-dir"):
        with pytest.raises(ConfigError):
            policy.checked_mount(current, "workspace", Path(path))


def test_read_only_mounts_may_show_system_folders_never_the_socket_or_home(tmp_path):
    protected = policy.Protected.of(settings(tmp_path))
    assert policy.mount_problem(Path("/etc/localtime"), protected, read_only=True) is None
    assert policy.mount_problem(Path(f"{Path.home()}/.aws"), protected, read_only=True) is None
    assert policy.mount_problem(Path("/var/run/docker.sock"), protected, read_only=True)
    assert policy.mount_problem(Path("/"), protected, read_only=True)


def test_prepare_folders_changes_nothing_when_a_check_fails(tmp_path):
    logs = tmp_path / "project" / "logs"
    current = settings(tmp_path, logs="/etc/stigmer-logs")
    with pytest.raises(ConfigError, match=r"^logs: "):
        policy.prepare_folders(current, (0, 0))
    assert not (tmp_path / "project" / "workspace").exists() and not logs.exists()


def test_prepare_folders_gives_a_root_users_new_folders_to_the_sandbox_user(tmp_path):
    if os.getuid() != 0:
        pytest.skip("chown needs root")  # CI and these machines run as root
    folders = policy.prepare_folders(settings(tmp_path), (0, 0))
    assert {f.stat().st_uid for f in folders.values()} == {policy.SANDBOX_UID}


@pytest.mark.parametrize(
    ("user", "expected"), [((0, 0), (1000, 1000)), ((4321, 99), (4321, 99)), ((1000, 5), (1000, 5))]
)
def test_sandbox_user_rule(user, expected):
    assert policy.sandbox_user(user) == expected


def test_missing_credentials_folder_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(ConfigError, match="mount_aws is on but"):
        policy.credential_folders(settings(tmp_path, mount_aws=True))
    (tmp_path / "home" / ".aws").mkdir(parents=True)
    spec = policy.container_spec(settings(tmp_path, mount_aws=True), "img:1", {})
    aws = spec["mounts"][-1]
    assert aws["ReadOnly"] is True and aws["Target"] == "/home/sandbox/.aws"


def test_the_agent_and_the_policy_agree_on_the_shared_state_folder():
    from stigmer_sandbox.runtime import agent

    assert agent.RUN_DIR == policy.RUN_DIR
