"""Issue 6 on a real engine: safe cleanup, fix-permissions, dev-full.

This module runs last (pytest orders modules by name) and its last test proves
`inv clean --all`, which removes this project's images: `inv dev-full` rebuilds them.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid

import pytest

from stigmer_sandbox import labels
from stigmer_sandbox.host import cleanup

from .conftest import TEST_LABELS


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
def decoys(docker_engine):
    """Unlabelled image, container and volume, plus a user image built FROM ours."""
    suffix = uuid.uuid4().hex[:8]
    client = docker_engine
    image = empty_image(client, f"decoy-image:{suffix}")
    derived = empty_image(
        client, f"decoy-app:{suffix}", {labels.MANAGED: "true", labels.KIND: "basic"}
    )
    container = client.containers.create(
        "stigmer-sandbox-debian:bookworm-slim", ["true"], name=f"decoy-{suffix}"
    )
    inherited = client.containers.create(
        "stigmer-sandbox-basic:local", ["true"], name=f"decoy-guide-{suffix}"
    )
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


def build_stage(client) -> str:
    """An untagged stage image as Dockerfile.sandbox.basic leaves one (build cache)."""
    stage_labels = {labels.MANAGED: "true", labels.KIND: cleanup.BUILD_STAGE_KIND}
    return empty_image(client, None, {**stage_labels, **TEST_LABELS})


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


def exists(getter, key) -> bool:
    try:
        getter(key)
    except Exception:
        return False
    return True


def test_dry_run_changes_nothing(inv, docker_engine):
    image, container, volume = project_resources(docker_engine, uuid.uuid4().hex[:8])
    stage = build_stage(docker_engine)
    done = inv("clean", "--all", "--volumes", "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    listed = {r["id"] for r in json.loads(done.stdout)["would_remove"]}
    assert {image, container, stage} <= listed
    default_tier = inv("clean", "--dry-run", "--json")
    assert stage not in {r["id"] for r in json.loads(default_tier.stdout)["would_remove"]}
    assert exists(docker_engine.images.get, stage)
    assert exists(docker_engine.images.get, image)
    assert exists(docker_engine.containers.get, container)
    assert exists(docker_engine.volumes.get, volume)


def test_destructive_tiers_need_confirmation_without_a_terminal(inv, docker_engine):
    project_resources(docker_engine, uuid.uuid4().hex[:8])
    done = inv("clean", "--all")
    assert done.returncode == 2
    assert "--yes" in done.stderr and "Traceback" not in done.stderr


def test_orphaned_sandbox_of_a_dead_owner_is_removed(inv, docker_engine):
    orphan = docker_engine.containers.run(
        "stigmer-sandbox-basic:local",
        ["sandbox-keepalive"],
        detach=True,
        name=f"stigmer-sandbox-orphan-{uuid.uuid4().hex[:6]}",
        labels={
            **labels.project_labels(
                "sandbox", owner_pid="999999999", owner_host=os.uname().nodename
            ),
            **TEST_LABELS,
        },
    )
    done = inv("clean")
    assert done.returncode == 0, done.stderr
    assert "owner (pid 999999999) is gone" in done.stdout
    assert not exists(docker_engine.containers.get, orphan.id)


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


# Last on purpose: it removes every image of this project, as `inv clean --all` must.
def test_clean_all_removes_only_labelled_resources(inv, docker_engine, decoys, tmp_path):
    workspace_file = tmp_path / "workspace" / "keep.txt"
    workspace_file.parent.mkdir()
    workspace_file.write_text("mine")
    image, container, volume = project_resources(docker_engine, uuid.uuid4().hex[:8])
    stage = build_stage(docker_engine)
    done = inv(
        "clean",
        "--all",
        "--volumes",
        "--yes",
        env={"INVOKE_STIGMER_WORKSPACE": str(tmp_path / "workspace")},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert not exists(docker_engine.images.get, image)
    assert not exists(docker_engine.containers.get, container)
    assert not exists(docker_engine.volumes.get, volume)
    assert not exists(docker_engine.images.get, stage)
    managed = docker_engine.images.list(filters=labels.managed_filter())
    assert not [i.id for i in managed if cleanup.is_our_build_stage(i)]
    for decoy in decoys["images"]:
        assert exists(docker_engine.images.get, decoy)
    for decoy in decoys["containers"]:
        assert exists(docker_engine.containers.get, decoy)
    assert exists(docker_engine.volumes.get, decoys["volume"])
    assert workspace_file.read_text() == "mine"
