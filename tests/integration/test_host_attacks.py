"""The host side under attack on a real engine: mount folders swapped for symlinks while a
sandbox starts, and hard links in a workspace handed to `fix-permissions`.

The "home folder" each test protects is a stand-in made under tmp (HOME points at it), so
a mount that went wrong would expose only the test's own canary. The racer is a separate
process (a thread would take turns with the code under test on the GIL, not race it)
that atomically exchanges a real folder and a symlink to that home with renameat2.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from stigmer_sandbox import engine, policy
from stigmer_sandbox.config import Settings
from stigmer_sandbox.errors import ConfigError, SandboxError
from stigmer_sandbox.host import permissions
from stigmer_sandbox.runtime import Sandbox
from stigmer_sandbox.runtime.backends.docker import DockerBackend

from .conftest import SUITE_ISOLATION, TEST_LABELS

RACE_SECONDS = 4.0
CHANGED = "changed while the sandbox was starting"
# Swap two names as fast as one core allows until the deadline (RENAME_EXCHANGE is atomic:
# the path always exists, as a folder or as the symlink).
RACER = """
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
first, second, seconds = sys.argv[1].encode(), sys.argv[2].encode(), float(sys.argv[3])
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    if libc.renameat2(-100, first, -100, second, 2) != 0:
        raise SystemExit(f"renameat2 failed: errno {ctypes.get_errno()}")
"""


def exchange(first: Path, second: Path) -> None:
    """Swap two names at once (what the racer does, one time)."""
    code = RACER.replace("while time.monotonic() < deadline:", "if True:")
    subprocess.run([sys.executable, "-c", code, str(first), str(second), "0"], check=True)


def start_racer(first: Path, second: Path, seconds: float = RACE_SECONDS) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RACER, str(first), str(second), str(seconds)])


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A stand-in home folder (root-owned, holding a canary and a credentials folder with a
    subfolder) the policy protects."""
    folder = tmp_path / "home"
    (folder / ".ssh" / "victim").mkdir(parents=True)
    (folder / "canary").write_text("secret\n")
    monkeypatch.setenv("HOME", str(folder))
    return folder


def settings_in(tmp_path: Path, **changes: object) -> Settings:
    name = f"stigmer-test-hostattack-{uuid.uuid4().hex[:8]}"
    made = Settings(project_dir=str(tmp_path / "project"), container_name=name)
    return made.replace(isolation=SUITE_ISOLATION).replace(**changes)


def decoy_for(settings: Settings, key: str, home: Path) -> tuple[Path, Path]:
    """The real folder of `key` and a symlink to `home` beside it, ready to be exchanged."""
    real = settings.path_unresolved(key)
    decoy = real.with_name(real.name + ".decoy")
    decoy.symlink_to(home)
    return real, decoy


def start_checked(settings: Settings, image: str) -> object:
    """What `Sandbox.up` does for a new sandbox, with the pin and the check around it."""
    spec = policy.container_spec(settings, image, dict(TEST_LABELS))
    policy.prepare_folders(settings, (0, 0))
    pins = policy.pin_mounts(spec["mounts"])
    container = engine.client().containers.create(**spec)
    container.start()
    policy.verify_mounts(pins, DockerBackend(), container)
    return container


def assert_home_untouched(home: Path) -> None:
    tree = [home, *sorted(home.rglob("*"))]
    assert [str(p.relative_to(home)) for p in tree] == [".", ".ssh", ".ssh/victim", "canary"]
    assert {p.lstat().st_uid for p in tree} == {0}
    assert (home / "canary").read_text() == "secret\n"


def test_a_folder_swapped_after_the_pin_is_found_and_the_sandbox_removed(tmp_path, home):
    settings = settings_in(tmp_path)
    image = settings.image
    spec = policy.container_spec(settings, image, dict(TEST_LABELS))
    policy.prepare_folders(settings, (0, 0))
    pins = policy.pin_mounts(spec["mounts"])
    exchange(*decoy_for(settings, "logs", home))  # between the check and the mount
    container = engine.client().containers.create(**spec)
    container.start()
    exposed = container.exec_run(["/usr/bin/ls", "/logs"], user="0:0").output.decode()
    assert "canary" in exposed  # the attack is real: the engine followed the symlink
    with pytest.raises(SandboxError, match=rf"^logs: .*{CHANGED}"):
        policy.verify_mounts(pins, DockerBackend(), container)
    assert engine.find_container(container.id) is None
    assert_home_untouched(home)


def test_a_symlink_swapped_in_after_the_check_is_never_pinned(tmp_path, home):
    settings = settings_in(tmp_path)
    spec = policy.container_spec(settings, settings.image, dict(TEST_LABELS))
    policy.prepare_folders(settings, (0, 0))
    exchange(*decoy_for(settings, "workspace", home))
    with pytest.raises(SandboxError, match=rf"^workspace: .*{CHANGED}"):
        policy.pin_mounts(spec["mounts"])


class SwappingBackend(DockerBackend):
    """Docker, but a folder is swapped for a symlink right after the container is created
    (after every check, before the engine mounts it): the race won every time."""

    def __init__(self, real: Path, decoy: Path) -> None:
        self.swap = (real, decoy)

    def create(self, spec: dict) -> object:
        container = super().create(spec)
        if not spec["name"].endswith("-egress-gw"):  # the sandbox's own, not its gateway
            exchange(*self.swap)
        return container


def test_sandbox_up_refuses_a_folder_swapped_between_its_check_and_its_mount(tmp_path, home):
    settings = settings_in(tmp_path)
    policy.prepare_folders(settings, (0, 0))
    backend = SwappingBackend(*decoy_for(settings, "logs", home))
    box = Sandbox(settings, extra_labels=TEST_LABELS, host_user=(0, 0), backend=backend)
    try:
        with pytest.raises(SandboxError, match=rf"^logs: .*{CHANGED}"):
            box.up()
        assert engine.find_container(settings.container_name) is None
    finally:
        box.remove()
    assert_home_untouched(home)


def test_a_sandbox_never_starts_on_a_folder_swapped_during_its_start(tmp_path, home):
    settings = settings_in(tmp_path)
    policy.prepare_folders(settings, (0, 0))
    racer = start_racer(*decoy_for(settings, "logs", home))
    outcomes = []
    try:
        while racer.poll() is None:
            outcomes.append(one_start_under_race(settings))
    finally:
        racer.kill()
        racer.wait()
    assert racer.returncode in (0, -9), "the racer itself failed"
    assert outcomes and set(outcomes) <= {"verified", "refused"}
    assert_home_untouched(home)


def one_start_under_race(settings: Settings) -> str:
    """One start under the race: 'verified' (and then /logs really is the folder checked)
    or 'refused' (and then no container is left)."""
    try:
        container = start_checked(settings, settings.image)
    except (ConfigError, SandboxError) as exc:
        assert exc.message.startswith("logs: "), exc.message  # one line naming the key
        assert engine.find_container(settings.container_name) is None
        return "refused"
    try:
        listing = container.exec_run(["/usr/bin/ls", "-a", "/logs"], user="0:0").output
        assert b"canary" not in listing
    finally:
        container.remove(force=True)
    return "verified"


def test_folders_are_never_made_through_a_racing_symlink(tmp_path, home):
    """mkdir of a new `parent/logsN` while `parent` flips to a symlink to ~/.ssh."""
    settings = settings_in(tmp_path, logs="parent/logs0")
    attempts = race_prepare(settings, home / ".ssh", lambda n: {"logs": f"parent/logs{n}"})
    assert attempts > 10
    assert_home_untouched(home)


def test_folders_are_never_given_away_through_a_racing_symlink(tmp_path, home):
    """A root host user's root-owned `parent/victim` handed to the sandbox user while
    `parent` flips to a symlink to ~/.ssh, which holds a root-owned `victim` too."""
    settings = settings_in(tmp_path, logs="parent/victim")
    victim = settings.path_unresolved("logs")
    victim.mkdir(parents=True)
    attempts = race_prepare(settings, home / ".ssh", lambda n: {}, reset_owner=victim)
    assert attempts > 10
    assert_home_untouched(home)


def race_prepare(
    settings: Settings,
    target: Path,
    changes: Callable[[int], dict[str, str]],
    reset_owner: Path | None = None,
) -> int:
    """`prepare_folders` (as a root host user) again and again while the logs folder's
    parent flips with a symlink to `target`; how many times it ran."""
    parent = settings.path_unresolved("logs").parent
    parent.mkdir(parents=True, exist_ok=True)
    decoy = parent.with_name("parent.decoy")
    decoy.symlink_to(target)
    owned = os.open(reset_owner, os.O_RDONLY | os.O_DIRECTORY) if reset_owner else None
    racer = start_racer(parent, decoy)
    attempts = 0
    try:
        while racer.poll() is None:
            attempts += 1
            if owned is not None:
                os.fchown(owned, 0, 0)  # root's again: the next run wants to give it away
            # refused at the check, or the swap seen on the way: both safe
            with contextlib.suppress(ConfigError, SandboxError):
                policy.prepare_folders(settings.replace(**changes(attempts)), (0, 0))
    finally:
        racer.kill()
        racer.wait()
        if owned is not None:
            os.close(owned)
    return attempts


def test_a_tmp_size_the_kernel_would_refuse_as_written_still_starts(tmp_path):
    # The kernel's tmpfs refused size=1.5g: the container never started.
    settings = settings_in(tmp_path, tmp_size="1.5g")
    container = start_checked(settings, settings.image)
    try:
        shown = container.exec_run(["/usr/bin/df", "-B1", "--output=size", "/tmp"]).output
    finally:
        container.remove(force=True)
    assert str(3 * 512 * 1024**2) in shown.decode()


@pytest.fixture
def linked_workspace(tmp_path) -> tuple[Settings, Path, Path]:
    """A root-owned workspace holding a file, and a hard link to a file outside it."""
    settings = settings_in(tmp_path)
    workspace = settings.path("workspace")
    (workspace / "sub").mkdir(parents=True)
    (workspace / "sub" / "own.txt").write_text("mine")
    outside = tmp_path / "outside.txt"
    outside.write_text("host secret")
    os.link(outside, workspace / "sub" / "linked.txt")
    return settings, workspace, outside


def test_fix_permissions_leaves_a_hard_link_to_an_outside_file_alone(linked_workspace):
    settings, workspace, outside = linked_workspace
    dry = permissions.fix_ownership(settings, 1000, 1000, dry_run=True)
    assert [change.skipped for change in dry] == [(workspace / "sub" / "linked.txt",)]
    assert "linked.txt" in dry[0].skipped_line()
    changes = permissions.fix_ownership(settings, 1000, 1000, dry_run=False)
    assert changes[0].entries == 3 and changes[0].skipped == dry[0].skipped
    assert (workspace / "sub" / "own.txt").stat().st_uid == 1000
    assert outside.stat().st_uid == 0, "a file outside the workspace changed owner"


def test_fix_permissions_task_changes_nothing_outside(inv, linked_workspace):
    settings, workspace, outside = linked_workspace
    env = {
        "INVOKE_STIGMER_WORKSPACE": str(workspace),
        "INVOKE_STIGMER_LOGS": str(settings.path("logs")),
    }
    done = inv("fix-permissions", env=env)
    assert done.returncode == 0, done.stderr
    assert "changed 3 entries" in done.stdout
    assert outside.stat().st_uid == 0 and (workspace / "sub").stat().st_uid == 1000
