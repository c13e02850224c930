"""Issue 6 on a real engine: safe cleanup, fix-permissions, dev-full.

The cleanup tests give `inv clean` a state folder of their own, so it reads only the
image record of the images they built. The test of `inv clean --all` removes this
project's images; it is marked to run after every other test, and the next session's
`basic_image` fixture builds them again.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from stigmer_sandbox import config, engine, images, labels
from stigmer_sandbox.host import cleanup
from stigmer_sandbox.images import smoke
from stigmer_sandbox.images.builder import SilentWatcher

from ..conftest import ROOT
from .conftest import SESSION_ID, TEST_LABEL, TEST_LABELS

BUSY_IMAGE = re.compile(r"has dependent child images|is being used by running container")
TINY_DOCKERFILE = f"ARG BASE_IMAGE\nFROM ${{BASE_IMAGE}}\nLABEL {TEST_LABEL}={SESSION_ID}\n"


def empty_image(client, tag: str | None, image_labels: dict[str, str] | None = None) -> str:
    """A tiny image with a fresh id (imported from a one-file tar), optionally labelled
    and optionally untagged (like a build stage the legacy builder leaves)."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as archive:
        info = tarfile.TarInfo("marker")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"x\n"))
    changes = [f"LABEL {k}={v}" for k, v in (image_labels or {}).items()]
    repository, tag_name = tag.split(":") if tag else (None, None)
    answer = client.api.import_image_from_data(
        data.getvalue(), repository=repository, tag=tag_name, changes=changes
    )
    return client.images.get(tag or json.loads(answer.splitlines()[-1])["status"]).id


@pytest.fixture
def users_untagged_image(docker_engine, basic_image):
    """What a user builds `FROM` one of our images without a tag: it inherits our labels.
    Removed right after the test: while it exists, our image cannot be removed."""
    dockerfile = f"FROM {basic_image.tags[0]}\nLABEL x=1\n".encode()
    image, _logs = docker_engine.images.build(
        fileobj=io.BytesIO(dockerfile), labels=TEST_LABELS, rm=True
    )
    assert not image.tags and image.labels[labels.KIND] == "basic"
    yield image.id
    docker_engine.images.remove(image.id, force=True)


@pytest.fixture
def decoys(docker_engine, base_image, basic_image):
    """Unlabelled image, container and volume, a user's image labelled like ours (it was
    imported with them), and containers of our images a user made."""
    suffix = uuid.uuid4().hex[:8]
    client = docker_engine
    image = empty_image(client, f"decoy-image:{suffix}")
    derived = empty_image(
        client, f"decoy-app:{suffix}", {labels.MANAGED: "true", labels.KIND: "basic"}
    )
    container = client.containers.create(base_image.id, ["true"], name=f"decoy-{suffix}")
    inherited = client.containers.create(basic_image.id, ["true"], name=f"decoy-guide-{suffix}")
    volume = client.volumes.create(f"decoy-{suffix}")
    yield {
        "images": [image, derived],
        "containers": [container.id, inherited.id],
        "volume": volume.name,
    }
    for cid in (container.id, inherited.id):
        client.containers.get(cid).remove(force=True)
    client.volumes.get(volume.name).remove(force=True)
    for iid in (image, derived):
        client.images.remove(iid, force=True)


@pytest.fixture
def clean_env(tmp_path) -> dict[str, str]:
    """A state folder of the test's own: `inv clean` reads the image record there only."""
    return {"INVOKE_STIGMER_STATE_DIR": str(tmp_path / "state")}


def build_stage(client) -> str:
    """An untagged stage image as Dockerfile.sandbox.basic leaves one (build cache)."""
    stage_labels = {labels.MANAGED: "true", labels.KIND: cleanup.BUILD_STAGE_KIND}
    return empty_image(client, None, {**stage_labels, **TEST_LABELS})


def build_through_the_library(project: Path, tag: str) -> str:
    """Build `tag` from a one-line Dockerfile in `project`, never from the cache, through
    the library (which records it in the project's state folder); the image's id."""
    context = project / images.CONTEXT_DIR
    context.mkdir(parents=True, exist_ok=True)
    (context / "Dockerfile.sandbox.basic").write_text(TINY_DOCKERFILE)
    settings = config.load_settings(project, environ={})
    watcher = SilentWatcher()
    options = images.BuildOptions(tags=(tag,), no_cache=True)
    return images.build(images.plan(settings, "basic", options, watcher), watcher).image_id


def project_resources(client, suffix: str):
    """A labelled project image, stopped container and volume to be cleaned."""
    image = empty_image(
        client,
        f"stigmer-sandbox-basic:cleanme-{suffix}",
        {labels.MANAGED: "true", labels.KIND: "basic", **TEST_LABELS},
    )
    container = client.containers.create(
        image,
        ["true"],
        name=f"stigmer-sandbox-cleanme-{suffix}",
        labels={**labels.project_labels("sandbox"), **TEST_LABELS},
    )
    volume = client.volumes.create(
        f"stigmer-cleanme-{suffix}", labels={**labels.project_labels("volume"), **TEST_LABELS}
    )
    return image, container.id, volume.name


def sandbox_state(state: Path, suffix: str):
    """A running private sandbox, its snapshot and its fork, all kept under `state`; and a
    folder in the private-folder root without our marker (not ours: it must stay)."""
    from stigmer_sandbox.runtime import Sandbox

    settings = config.load_settings(ROOT).replace(
        state_dir=str(state), workspace=str(state.parent / "ws"), logs=str(state.parent / "lg")
    )
    box = Sandbox.create_ephemeral(settings, extra_labels=TEST_LABELS).up()
    assert box.exec("echo kept > /workspace/f").exit_code == 0
    snapshot = box.snapshot(f"cleanme-{suffix}")
    fork = box.fork()
    stranger = state / "sandboxes" / "not-ours"
    stranger.mkdir(parents=True)
    (stranger / "data").write_text("mine")
    box.close()
    fork.close()
    return {"box": box, "snapshot": snapshot, "fork": fork, "stranger": stranger}


def volume_exists(client, name: str) -> bool:
    return bool(client.volumes.list(filters={"name": f"^{name}$"}))


def listed(done) -> dict[str, str]:
    """id → reason of what a `clean --json` run removed or would remove."""
    assert done.returncode == 0, done.stdout + done.stderr
    answer = json.loads(done.stdout)
    return {r["id"]: r["reason"] for r in answer.get("removed", answer.get("would_remove"))}


def test_dry_run_changes_nothing(inv, docker_engine, clean_env):
    image, container, volume = project_resources(docker_engine, uuid.uuid4().hex[:8])
    stage = build_stage(docker_engine)
    everything = listed(inv("clean", "--all", "--volumes", "--dry-run", "--json", env=clean_env))
    assert {image, container, stage} <= everything.keys()
    assert stage not in listed(inv("clean", "--dry-run", "--json", env=clean_env))
    assert engine.image_id(stage)
    assert engine.image_id(image)
    assert engine.find_container(container)
    assert volume_exists(docker_engine, volume)


def test_clean_plans_snapshots_forks_and_private_folders_by_tier(inv, clean_env):
    kept = sandbox_state(Path(clean_env["INVOKE_STIGMER_STATE_DIR"]), uuid.uuid4().hex[:8])
    fork, snapshot = kept["fork"], kept["snapshot"]
    try:
        everything = listed(inv("clean", "--all", "--dry-run", "--json", env=clean_env))
        default = listed(inv("clean", "--dry-run", "--json", env=clean_env))
        snapshot_folder = str(Path(snapshot["workspace"]).parent)
        fork_image = engine.image_id(fork.owned_image)
        for planned in (str(fork.private_folder), snapshot_folder, fork_image):
            assert planned in everything, (planned, everything)
        assert engine.image_id(snapshot["image"]) in everything
        assert str(kept["stranger"]) not in everything
        # In use by a living owner: the default tier keeps all of it.
        for kept_now in (str(fork.private_folder), snapshot_folder, fork_image):
            assert kept_now not in default
    finally:
        fork.remove()
        kept["box"].remove()
        from stigmer_sandbox.runtime import snapshots

        snapshots.delete(config.load_settings(ROOT), snapshot["name"])
    assert not fork.private_folder.exists() and not engine.image_id(fork.owned_image)
    assert not kept["box"].private_folder


def test_clean_keeps_a_fork_image_a_user_tagged(inv, clean_env, docker_engine):
    kept = sandbox_state(Path(clean_env["INVOKE_STIGMER_STATE_DIR"]), uuid.uuid4().hex[:8])
    fork = kept["fork"]
    users_tag = f"users-fork-keep:{uuid.uuid4().hex[:8]}"
    try:
        docker_engine.images.get(fork.owned_image).tag(users_tag)
        docker_engine.containers.get(fork.name).remove(force=True)  # as after a crash
        planned = listed(inv("clean", "--dry-run", "--json", env=clean_env))
        assert engine.image_id(users_tag) not in planned
    finally:
        fork.remove()
        kept["box"].remove()
        docker_engine.images.remove(users_tag, force=True)
        from stigmer_sandbox.runtime import snapshots

        snapshots.delete(config.load_settings(ROOT), kept["snapshot"]["name"])


def test_destructive_tiers_need_confirmation_without_a_terminal(inv, docker_engine):
    project_resources(docker_engine, uuid.uuid4().hex[:8])
    done = inv("clean", "--all")
    assert done.returncode == 2
    assert "--yes" in done.stderr and "Traceback" not in done.stderr


def expired_sandbox(client, image, owner_pid: int):
    """A running sandbox past its lifetime (an hour ago), owned by `owner_pid` on this host."""
    owner = {"owner_pid": str(owner_pid), "owner_host": os.uname().nodename}
    expired = str(int(time.time()) - 3600)
    return client.containers.run(
        image.id,
        smoke.KEEPALIVE,
        detach=True,
        name=f"stigmer-sandbox-expired-{uuid.uuid4().hex[:6]}",
        labels={**labels.project_labels("sandbox", expires=expired, **owner), **TEST_LABELS},
    )


def test_clean_spares_a_sandbox_in_use_and_removes_one_whose_owner_is_gone(
    inv, docker_engine, basic_image, clean_env
):
    in_use = expired_sandbox(docker_engine, basic_image, os.getpid())
    orphan = expired_sandbox(docker_engine, basic_image, 999999999)
    removed = listed(inv("clean", "--json", env=clean_env))
    assert in_use.id not in removed
    assert docker_engine.containers.get(in_use.id).status == "running"
    assert removed[orphan.id] == "its owner (pid 999999999) is gone"
    assert not engine.find_container(orphan.id)


def test_clean_keeps_a_users_untagged_image_and_removes_our_dangling_one(
    inv, docker_engine, users_untagged_image, tmp_path
):
    users = users_untagged_image
    project, tag = tmp_path / "project", f"stigmer-sandbox-test-basic:{uuid.uuid4().hex[:8]}"
    superseded = build_through_the_library(project, tag)
    current = build_through_the_library(project, tag)
    assert current != superseded and not docker_engine.images.get(superseded).tags
    env = {"INVOKE_STIGMER_STATE_DIR": str(project / ".state")}
    assert users not in listed(inv("clean", "--all", "--dry-run", "--json", env=env))
    removed = listed(inv("clean", "--json", env=env))
    assert removed.get(superseded) == "dangling"
    assert not engine.image_id(superseded)
    assert users not in removed and engine.image_id(users)
    assert current not in removed and engine.image_id(current)


def test_fix_permissions_stays_inside_the_workspace(inv, tmp_path):
    workspace, logs, outside = tmp_path / "workspace", tmp_path / "logs", tmp_path / "outside"
    (workspace / "sub").mkdir(parents=True)
    logs.mkdir()
    outside.write_text("host file")
    (workspace / "sub" / "a.txt").write_text("a")
    (workspace / "link").symlink_to(outside)
    env = {"INVOKE_STIGMER_WORKSPACE": str(workspace), "INVOKE_STIGMER_LOGS": str(logs)}
    dry = inv("fix-permissions", "--dry-run", env=env)
    assert dry.returncode == 0 and "would change 4 entries" in dry.stdout
    assert (workspace / "sub" / "a.txt").stat().st_uid == 0
    done = inv("fix-permissions", env=env)
    assert done.returncode == 0, done.stderr
    assert "changed 4 entries" in done.stdout
    for path in (workspace, workspace / "sub", workspace / "sub" / "a.txt"):
        assert (path.stat().st_uid, path.stat().st_gid) == (1000, 1000)
    assert (workspace / "link").lstat().st_uid == 1000
    assert outside.stat().st_uid == 0, "a file outside the workspace changed owner"
    back = inv("fix-permissions", "--to-host", env=env)
    assert back.returncode == 0
    assert (workspace / "sub" / "a.txt").stat().st_uid == os.getuid()


def test_dev_full_second_run_is_a_noop(inv):
    first = inv("dev-full", timeout=1800)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr
    second = inv("dev-full")
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout
    assert "built" not in second.stdout.replace("up to date", "")
    assert "Python 3.11." in second.stdout and "v20." in second.stdout
    assert 'inv run "python --version"' in second.stdout


# After every other test: it removes every image of this project, as `inv clean --all` must.
@pytest.mark.destroys_project_images
def test_clean_all_removes_only_labelled_resources(inv, docker_engine, decoys, tmp_path, clean_env):
    workspace_file = tmp_path / "workspace" / "keep.txt"
    workspace_file.parent.mkdir()
    workspace_file.write_text("mine")
    image, container, volume = project_resources(docker_engine, uuid.uuid4().hex[:8])
    stage = build_stage(docker_engine)
    kept = sandbox_state(Path(clean_env["INVOKE_STIGMER_STATE_DIR"]), uuid.uuid4().hex[:8])
    env = {**clean_env, "INVOKE_STIGMER_WORKSPACE": str(tmp_path / "workspace")}
    done = inv("clean", "--all", "--volumes", "--yes", env=env)
    # The engine is shared: another session may be building on our images or running
    # them right now. Docker removes no such image, and clean says so, exit 1. No other
    # failure is allowed.
    problems = [line for line in done.stderr.splitlines() if "could not remove" in line]
    assert all(BUSY_IMAGE.search(line) for line in problems), done.stderr
    assert done.returncode == (1 if problems else 0), done.stdout + done.stderr
    assert not engine.image_id(image)
    assert not engine.find_container(container)
    assert not volume_exists(docker_engine, volume)
    assert not engine.image_id(stage)
    for decoy in decoys["images"]:
        assert engine.image_id(decoy)
    for decoy in decoys["containers"]:
        assert engine.find_container(decoy)
    assert volume_exists(docker_engine, decoys["volume"])
    assert workspace_file.read_text() == "mine"
    fork = kept["fork"]
    assert not engine.image_id(kept["snapshot"]["image"])
    assert not Path(kept["snapshot"]["workspace"]).exists()
    assert not engine.find_container(fork.name) and not engine.image_id(fork.owned_image)
    assert not fork.private_folder.exists()
    assert (kept["stranger"] / "data").read_text() == "mine"
