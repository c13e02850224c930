"""The sandbox policy: mounts, the sandbox user, and the container's confinement."""

import hashlib
import os
from pathlib import Path

import pytest

from stigmer_sandbox import config, policy
from stigmer_sandbox.errors import ConfigError, SandboxError
from stigmer_sandbox.runtime.containers import spec_hash


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


def with_helper_copy(spec: dict, folder: Path, content: bytes) -> dict:
    """`spec` with a host helper copy of `content` in `folder` mounted, as Sandbox.up does."""
    folder.mkdir(parents=True)
    (folder / "stigmer-exec").write_bytes(content)
    digest = hashlib.sha256(content).hexdigest()
    (folder / "stigmer-exec.sha256").write_text(digest)
    mount = {"Target": policy.EXEC_HELPER, "Source": str(folder / "stigmer-exec")}
    return {**spec, "mounts": [*spec["mounts"], mount]}


def test_spec_hash_knows_the_helper_by_its_bytes_not_where_its_copy_lives(tmp_path):
    """Two callers with different state folders must not recreate each other's sandbox
    (an `inv run` beside a library user did, once the helper was mounted from the host)."""
    spec = policy.container_spec(settings(tmp_path), "img:1", {})
    here = with_helper_copy(spec, tmp_path / "a", b"helper")
    there = with_helper_copy(spec, tmp_path / "b", b"helper")
    changed = with_helper_copy(spec, tmp_path / "c", b"another helper")
    assert spec_hash(here, "sha256:a") == spec_hash(there, "sha256:a")
    assert spec_hash(here, "sha256:a") != spec_hash(changed, "sha256:a")


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
    from stigmer_sandbox.runtime.guest import agent

    assert agent.RUN_DIR == policy.RUN_DIR


def test_resolution_trail_lists_every_entry_looked_up_through_symlinks(tmp_path):
    (tmp_path / "real" / "inner").mkdir(parents=True)
    (tmp_path / "hop").symlink_to(tmp_path / "real")
    (tmp_path / "rel").symlink_to("hop/./inner/..")
    trail = policy.resolution_trail(tmp_path / "rel" / "inner")
    looked_up = [entry for entry in trail if tmp_path in entry.parents]
    assert looked_up == [
        tmp_path / "rel",
        tmp_path / "hop",
        tmp_path / "real",
        tmp_path / "real" / "inner",
        tmp_path / "real" / "inner",
    ]


def test_resolution_trail_stops_in_a_symlink_loop(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    trail = policy.resolution_trail(tmp_path / "a" / "x")
    assert len(trail) <= (policy.MAX_SYMLINK_HOPS + 1) * (len(tmp_path.parts) + 1)


@pytest.mark.parametrize("logs", ["workspace/logs", "workspace/deep/logs"])
def test_logs_inside_the_workspace_are_refused(tmp_path, logs):
    # A command could replace workspace/logs with a symlink to any host folder.
    with pytest.raises(ConfigError, match=r"^logs: .* inside the workspace folder"):
        policy.sandbox_folders(settings(tmp_path, logs=logs))


def test_the_workspace_inside_logs_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^workspace: .* inside the logs folder"):
        policy.sandbox_folders(settings(tmp_path, workspace="logs/ws"))


def test_a_path_reaching_the_workspace_through_a_symlink_is_refused(tmp_path):
    (tmp_path / "project" / "workspace" / "logs").mkdir(parents=True)
    (tmp_path / "mylogs").symlink_to(tmp_path / "project" / "workspace" / "logs")
    # Resolved, logs would be a folder inside the workspace: refused even if a command
    # later points workspace/logs somewhere else.
    with pytest.raises(ConfigError, match=r"^logs: .*goes through"):
        policy.sandbox_folders(settings(tmp_path, logs=str(tmp_path / "mylogs")))


def test_side_by_side_folders_are_accepted(tmp_path):
    folders = policy.sandbox_folders(settings(tmp_path))
    assert set(folders) == {"workspace", "logs"}


def test_open_folder_refuses_a_symlink_on_the_way(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    changed = r"^logs: .*changed while the sandbox was starting"
    with (
        pytest.raises(SandboxError, match=changed),
        policy.open_folder("logs", tmp_path / "link" / "made", create=True),
    ):
        pass
    assert not (tmp_path / "real" / "made").exists()


def test_open_folder_creates_missing_folders(tmp_path):
    with policy.open_folder("logs", tmp_path / "a" / "b", create=True) as fd:
        assert os.fstat(fd).st_ino == (tmp_path / "a" / "b").stat().st_ino


def test_open_folder_without_create_names_a_missing_folder(tmp_path):
    missing = tmp_path / "missing"
    with (
        pytest.raises(SandboxError, match=r"cannot be opened"),
        policy.open_folder("logs", missing),
    ):
        pass


def test_pins_name_each_mount_by_its_key(tmp_path):
    spec = policy.container_spec(settings(tmp_path), "img:1", {})
    policy.prepare_folders(settings(tmp_path))
    pins = policy.pin_mounts(spec["mounts"])
    assert [(pin.key, pin.target) for pin in pins] == [
        ("workspace", "/workspace"),
        ("logs", "/logs"),
    ]
    assert pins[0].inode == (tmp_path / "project" / "workspace").stat().st_ino


def pins_for(*identities: tuple[int, int]) -> tuple[policy.PinnedMount, ...]:
    return tuple(
        policy.PinnedMount(f"key{n}", Path(f"/src{n}"), f"/t{n}", dev, ino)
        for n, (dev, ino) in enumerate(identities)
    )


@pytest.mark.parametrize(
    ("output", "changed"),
    [(b"1:2\n3:4\n", None), (b"1:2\n3:5\n", 1), (b"1:2\n", 1), (b"", 0), (b"9:2\n3:4\n", 0)],
)
def test_changed_mount_compares_each_target_with_its_pin(output, changed):
    pins = pins_for((1, 2), (3, 4))
    found = policy.changed_mount(pins, output)
    assert found == (None if changed is None else pins[changed])


class FakeContainer:
    id = "c1"
    removed = False

    def remove(self, force: bool) -> None:
        self.removed = force


class FakeBackend:
    def __init__(self, status: int, output: bytes) -> None:
        self.answer = (status, output)
        self.asked: list[list[str]] = []

    def run_root(self, sandbox_id: str, argv: list[str], **options) -> tuple[int, bytes]:
        self.asked.append(argv)
        return self.answer


def test_verify_mounts_keeps_a_sandbox_whose_mounts_are_the_pinned_folders():
    container, backend = FakeContainer(), FakeBackend(0, b"1:2\n")
    policy.verify_mounts(pins_for((1, 2)), backend, container)
    assert not container.removed
    assert backend.asked == [["/usr/bin/stat", "-c", "%d:%i", "--", "/t0"]]


class FlakyBackend(FakeBackend):
    """An engine that first returns an exec's status without its output."""

    def run_root(self, sandbox_id: str, argv: list[str], **options) -> tuple[int, bytes]:
        status, output = super().run_root(sandbox_id, argv, **options)
        return (0, b"") if len(self.asked) == 1 else (status, output)


def test_verify_mounts_asks_again_when_the_answer_came_back_empty(monkeypatch):
    monkeypatch.setattr(policy.time, "sleep", lambda _s: None)
    container, backend = FakeContainer(), FlakyBackend(0, b"1:2\n")
    policy.verify_mounts(pins_for((1, 2)), backend, container)
    assert not container.removed and len(backend.asked) == 2


@pytest.mark.parametrize(
    ("status", "output", "message"),
    [
        (0, b"1:3\n", r"^key0: /src0 changed while the sandbox was starting"),
        (1, b"stat: cannot stat", r"^the sandbox's mounts could not be checked"),
        (0, b"", r"^the sandbox's mounts could not be checked \(\)"),  # never an answer
    ],
)
def test_verify_mounts_removes_a_sandbox_on_a_mismatch(status, output, message, monkeypatch):
    monkeypatch.setattr(policy.time, "sleep", lambda _s: None)
    container = FakeContainer()
    with pytest.raises(SandboxError, match=message):
        policy.verify_mounts(pins_for((1, 2)), FakeBackend(status, output), container)
    assert container.removed


@pytest.mark.parametrize(
    ("size", "mounted"),
    [("512m", "512m"), ("2G", "2G"), ("2gb", str(2 * 1024**3)), ("1.5g", str(3 * 512 * 1024**2))],
)
def test_tmpfs_size_is_one_the_kernel_accepts(size, mounted):
    # The kernel refused size=2gb and size=1.5g (the container never started).
    assert policy.tmpfs_size(size) == mounted
    spec = policy.container_spec(settings(Path("/nonexistent"), tmp_size=size), "img:1", {})
    assert spec["tmpfs"]["/tmp"].endswith(f",size={mounted}")


def test_folder_mounts_pin_the_checked_folders_at_their_targets(tmp_path):
    folders = policy.prepare_folders(settings(tmp_path))
    pins = policy.pin_mounts(policy.folder_mounts(folders))
    assert [(pin.key, pin.target, pin.source) for pin in pins] == [
        ("workspace", "/workspace", folders["workspace"]),
        ("logs", "/logs", folders["logs"]),
    ]
