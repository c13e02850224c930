"""Defences of fork and snapshot: a sandbox paused for one keeps its agent connection (a
long freeze, a big workspace being copied, is not mistaken for a dead agent, and
commands in flight finish), and a root filesystem a command bloated is refused before
the engine spends the disk on it, with nothing left behind."""

from __future__ import annotations

import threading
import time

import pytest

from stigmer_sandbox.config import load_settings
from stigmer_sandbox.errors import SandboxError
from stigmer_sandbox.runtime import Sandbox
from stigmer_sandbox.runtime.client.channel import LIVENESS_S

from ..conftest import ROOT
from .conftest import TEST_LABELS


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    folder = tmp_path_factory.mktemp("freeze")
    settings = load_settings(ROOT).replace(
        state_dir=str(folder / "state"), workspace=str(folder / "ws"), logs=str(folder / "logs")
    )
    sandbox = Sandbox.create_ephemeral(settings, extra_labels=TEST_LABELS).up().connect()
    yield sandbox
    sandbox.remove()


def test_a_freeze_longer_than_the_liveness_window_keeps_the_channel(box):
    channel = box.connection.channel
    results = []
    running = threading.Thread(target=lambda: results.append(box.exec("sleep 1; echo done")))
    running.start()
    time.sleep(0.3)
    with box.paused():
        time.sleep(LIVENESS_S + 3)
    running.join(30)
    assert results and results[0].exit_code == 0 and results[0].stdout == "done\n"
    assert box.exec("echo again").stdout == "again\n"
    assert box.connection.channel is channel and channel.alive


def test_only_a_running_sandbox_can_be_paused(box, tmp_path):
    stopped = Sandbox.create_ephemeral(box.settings, extra_labels=TEST_LABELS).up()
    try:
        stopped.stop()
        with pytest.raises(SandboxError, match="only a running sandbox"), stopped.paused():
            pass
    finally:
        stopped.remove()


def test_a_bloated_root_filesystem_is_refused_with_nothing_left(box):
    from stigmer_sandbox import engine
    from stigmer_sandbox.errors import UsageError
    from stigmer_sandbox.runtime import snapshots, workspaces

    own = box.settings.path("state_dir").parent / "small-workspace"
    small = Sandbox.create_ephemeral(
        box.settings.replace(snapshot_max_size="4m", workspace=str(own)), extra_labels=TEST_LABELS
    ).up()
    try:
        filler = "head -c 8000000 /dev/zero > /home/sandbox/filler"
        assert small.exec(filler).exit_code == 0
        root = workspaces.sandboxes_root(small.settings)
        root.mkdir(parents=True, exist_ok=True)
        before = set(root.iterdir())
        with pytest.raises(UsageError, match="snapshot_max_size"):
            small.fork()
        with pytest.raises(UsageError, match="added 8 MiB outside /workspace"):
            small.snapshot("bloated")
        assert set(root.iterdir()) == before
        assert not engine.image_id(snapshots.snapshot_image("bloated"))
        assert small.exec("rm /home/sandbox/filler").exit_code == 0
        small.fork().remove()  # within the limit again
    finally:
        small.remove()


def test_a_workspace_another_running_container_mounts_is_not_copied(box):
    """The other container could swap a folder for a symlink while the copy runs."""
    twin = Sandbox.create_ephemeral(box.settings, extra_labels=TEST_LABELS).up()
    try:
        shared = f"also mounted by the running container.*{twin.name}"
        with pytest.raises(SandboxError, match=shared):
            box.fork()
        with pytest.raises(SandboxError, match="also mounted"):
            box.snapshot("shared-workspace")
    finally:
        twin.remove()
    box.fork().remove()  # alone again: allowed


def test_a_failed_replacement_keeps_the_old_snapshot(box):
    from stigmer_sandbox.runtime import snapshots

    own = box.settings.path("state_dir").parent / "replace-workspace"
    other = Sandbox.create_ephemeral(
        box.settings.replace(workspace=str(own)), extra_labels=TEST_LABELS
    ).up()
    name = f"replace-{other.name[-8:]}"
    try:
        assert other.exec("echo old > /workspace/version").exit_code == 0
        first = other.snapshot(name)
        other.stop()
        with pytest.raises(SandboxError, match="only a running sandbox"):
            other.snapshot(name, replace=True)
        kept = {s["name"]: s for s in snapshots.listing()}
        assert kept[name]["workspace"] == first["workspace"]
        other.up()
        assert other.exec("echo new > /workspace/version").exit_code == 0
        other.snapshot(name, replace=True)
        with Sandbox.from_snapshot(name, other.settings) as born:
            assert born.exec("cat /workspace/version").stdout == "new\n"
        root = snapshots.workspaces.snapshots_root(other.settings)
        assert [p.name for p in root.iterdir()] == [name]  # no staging left
        assert len([s for s in snapshots.listing() if s["name"].startswith(name)]) == 1
    finally:
        snapshots.delete(other.settings, name)
        other.remove()


def test_a_pause_by_another_process_is_not_a_dead_agent(box):
    """Another host process's fork or snapshot pauses the container without telling this
    channel: past the liveness window and a command's hard deadline, nothing is lost."""
    from stigmer_sandbox.runtime.client.channel import HOST_GRACE_S

    channel = box.connection.channel
    results = []
    running = threading.Thread(target=lambda: results.append(box.exec("sleep 60", timeout=2)))
    running.start()
    time.sleep(0.5)
    container = box._existing()
    container.pause()  # as `docker pause` from elsewhere: this channel is not told
    try:
        time.sleep(max(LIVENESS_S, 2 + HOST_GRACE_S) + 2)
    finally:
        container.unpause()
    running.join(30)
    assert results, "the command never came back"
    assert results[0].timed_out and results[0].exit_code == 124, results[0]
    assert box.connection.channel is channel and channel.alive
    assert box.exec("echo alive").stdout == "alive\n"
