"""Issue 14 on a real engine: fork and snapshot.

A sandbox with a package installed by pip (from a wheel made here: no network) and a
50 MB workspace file is forked and snapshotted. The fork and every sandbox started from
the snapshot have the package and the same file, then diverge from their source and from
each other; running processes are not carried. Snapshot names are checked, an existing
one is replaced only when asked, the listing shows it, deleting removes image and folder,
and a pool starts its sandboxes from a snapshot. Removing a fork removes its container,
private folder and image. FIFOs and symlinks in a workspace survive a fork as they are.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import uuid
import zipfile
from pathlib import Path

import pytest

from stigmer_sandbox import engine, labels
from stigmer_sandbox.errors import UsageError
from stigmer_sandbox.runtime import Sandbox, SandboxPool, snapshots, workspaces

from .conftest import SESSION_ID, TEST_LABEL, TEST_LABELS, wait_for
from .test_pool import POOL_LABEL, gone, pool_containers, private_settings

PACKAGE = "stigmer_probe_pkg"
VALUE = uuid.uuid4().hex[:12]
BIG_BYTES = 50_000_000
PY = "python -I -c"  # -I: never importable from the workspace or cwd, only from the venv


def tiny_wheel(module: str, version: str, source: str) -> tuple[str, bytes]:
    """A pure-Python wheel (file name, bytes) with one module: pip installs it offline."""
    dist = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": source.encode(),
        f"{dist}/METADATA": (
            f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: {version}\n"
        ).encode(),
        f"{dist}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: stigmer-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return f"{module}-{version}-py3-none-any.whl", buffer.getvalue()


def ok(box: Sandbox, command: str, timeout: float = 120) -> str:
    result = box.exec(command, timeout=timeout)
    assert result.exit_code == 0, (command, result)
    return result.stdout


def package_value(box: Sandbox) -> str:
    return ok(box, f"{PY} 'import {PACKAGE}; print({PACKAGE}.VALUE)'").strip()


def big_hash(box: Sandbox) -> str:
    return ok(box, "sha256sum /workspace/big").split()[0]


def image_labels(reference: str) -> dict[str, str]:
    return dict(engine.image(reference).labels or {})


@pytest.fixture(scope="module")
def settings(tmp_path_factory, project_settings):
    return private_settings(project_settings, tmp_path_factory.mktemp("snapshots"))


@pytest.fixture(scope="module")
def source(settings, docker_engine):
    """A sandbox with a pip-installed package, a file in the home folder and a 50 MB
    workspace file; `source.big` is that file's sha256."""
    box = Sandbox.create_ephemeral(settings, extra_labels=TEST_LABELS)
    with box:
        name, wheel = tiny_wheel(PACKAGE, "1.0", f"VALUE = {VALUE!r}\n")
        box.put_file(name, wheel)
        ok(
            box,
            f"PIP_DISABLE_PIP_VERSION_CHECK=1 pip install --no-index --no-deps /workspace/{name}"
            f" && rm /workspace/{name}",
        )
        ok(box, "echo from-home > /home/sandbox/home-file")
        ok(box, f"head -c {BIG_BYTES} /dev/urandom > /workspace/big")
        box.big = big_hash(box)
        assert package_value(box) == VALUE
        yield box


@pytest.fixture(scope="module")
def snapshot_names(settings, docker_engine):
    """Names of the snapshots this module takes; all deleted at the end."""
    names: list[str] = []
    yield names
    for name in names:
        snapshots.delete(settings, name)
    for name in names:
        assert not engine.image_id(snapshots.snapshot_image(name)), name


def new_snapshot_name(names: list[str]) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    names.append(name)
    return name


@pytest.fixture(scope="module")
def snapshot(source, snapshot_names):
    """A snapshot of `source` taken while a background `sleep` runs in it."""
    process = source.start("sleep 1000")
    assert wait_for(lambda: source.exec("pgrep -f '[s]leep 1000'").exit_code == 0, 15)
    name = new_snapshot_name(snapshot_names)
    info = source.snapshot(name)
    info["sleeping"] = process
    return info


@pytest.fixture(scope="module")
def fork(source):
    """A fork of `source`, removed at the end (removal is also a test)."""
    forked = source.fork()
    yield forked
    forked.remove()


# -- fork ----------------------------------------------------------------------------------


def test_a_fork_has_the_installed_package_home_files_and_workspace(source, fork):
    assert package_value(fork) == VALUE
    assert ok(fork, "pip show stigmer-probe-pkg | head -2").splitlines()[1] == "Version: 1.0"
    assert ok(fork, "cat /home/sandbox/home-file") == "from-home\n"
    assert big_hash(fork) == source.big
    assert fork.inspect()["State"]["Status"] == "running"


def test_a_fork_and_its_source_diverge(source, fork):
    ok(fork, "echo fork > /workspace/fork-only && echo changed > /home/sandbox/home-file")
    ok(source, "echo source > /workspace/source-only")
    assert fork.exec("test -e /workspace/source-only").exit_code == 1
    assert source.exec("test -e /workspace/fork-only").exit_code == 1
    assert ok(source, "cat /home/sandbox/home-file") == "from-home\n"
    assert ok(fork, "cat /home/sandbox/home-file") == "changed\n"
    ok(fork, "printf x >> /workspace/big")
    assert big_hash(source) == source.big != big_hash(fork)
    ok(source, "rm /workspace/source-only")


def test_a_fork_has_its_own_private_folder_labels_and_image(source, fork, settings):
    root = workspaces.sandboxes_root(settings)
    assert fork.private_folder is not None and fork.private_folder.parent == root
    assert workspaces.is_private(fork.private_folder, root)
    mounts = {m["target"]: m["source"] for m in fork.status()["mounts"]}
    assert mounts["/workspace"] == str(fork.private_folder / "workspace")
    assert mounts["/workspace"] != str(settings.path("workspace"))
    assert fork.name != source.name
    container = fork.inspect()["Config"]["Labels"]
    assert container[TEST_LABEL] == SESSION_ID  # inherited from the image
    assert container[labels.OWNER_PID] == str(os.getpid())
    assert container[labels.KIND] == "sandbox"
    assert fork.owned_image == snapshots.fork_image(fork.name)
    image = image_labels(fork.owned_image)
    assert image[labels.KIND] == "fork" and image[f"{labels.PREFIX}.source"] == source.name
    assert image[TEST_LABEL] == SESSION_ID
    for per_container in ("owner-pid", "owner-host", "expires", "sandbox", "config", "pool"):
        assert image.get(f"{labels.PREFIX}.{per_container}", "") == "", per_container


def test_the_source_runs_on_after_a_fork(source, fork):
    assert source.inspect()["State"]["Status"] == "running"
    assert source.inspect()["State"]["Paused"] is False
    assert ok(source, "echo still-here") == "still-here\n"


def test_removing_a_fork_removes_its_container_folder_and_image(source, fork, docker_engine):
    folder, image = fork.private_folder, fork.owned_image
    assert engine.image_id(image)
    fork.remove()
    assert gone(docker_engine, fork.name)
    assert not folder.exists()
    assert not engine.image_id(image)
    assert ok(source, "echo source-untouched") == "source-untouched\n"
    assert big_hash(source) == source.big


def test_a_fork_keeps_fifos_and_symlinks_as_they_are(source):
    ok(
        source,
        "mkdir -p /workspace/odd && mkfifo /workspace/odd/fifo && "
        "ln -s /etc/passwd /workspace/odd/to-etc && ln -s fifo /workspace/odd/to-fifo",
    )
    try:
        forked = source.fork()
        try:
            checks = (
                "test -p /workspace/odd/fifo && test -L /workspace/odd/to-etc && "
                "test -L /workspace/odd/to-fifo && readlink /workspace/odd/to-etc && "
                "readlink /workspace/odd/to-fifo"
            )
            assert ok(forked, checks) == "/etc/passwd\nfifo\n"
            copied = forked.private_folder / "workspace" / "odd"
            assert (copied / "to-etc").is_symlink() and (copied / "fifo").is_fifo()
        finally:
            forked.remove()
    finally:
        ok(source, "rm -rf /workspace/odd")


# -- snapshot ------------------------------------------------------------------------------


def test_a_snapshot_is_an_image_and_a_private_workspace_copy(snapshot, source, settings):
    name = snapshot["name"]
    assert snapshot["image"] == snapshots.snapshot_image(name) == f"stigmer-sandbox-snapshot:{name}"
    root = workspaces.snapshots_root(settings)
    folder = root / name
    assert snapshot["workspace"] == str(folder / "workspace")
    assert workspaces.is_private(folder, root)
    digest = hashlib.sha256((folder / "workspace" / "big").read_bytes()).hexdigest()
    assert digest == source.big
    image = image_labels(snapshot["image"])
    assert image[labels.KIND] == "snapshot"
    assert image[TEST_LABEL] == SESSION_ID  # the test label is inherited: cleanup finds it
    assert image[f"{labels.PREFIX}.source"] == source.name
    for per_container in ("owner-pid", "owner-host", "expires", "sandbox", "config", "pool"):
        assert image.get(f"{labels.PREFIX}.{per_container}", "") == "", per_container
    assert snapshots.find(name) == (snapshot["image"], folder)
    assert snapshot["sleeping"].running  # the source's process was only paused


def test_a_sandbox_from_a_snapshot_has_its_state_but_no_processes(snapshot, source, settings):
    born = Sandbox.from_snapshot(snapshot["name"], settings)
    folder = born.private_folder
    try:
        assert package_value(born) == VALUE
        assert big_hash(born) == source.big
        assert ok(born, "cat /home/sandbox/home-file") == "from-home\n"
        assert born.processes() == []
        assert born.exec("pgrep -f '[s]leep 1000'").exit_code == 1
        assert folder.parent == workspaces.sandboxes_root(settings)
        found = born.inspect()["Config"]["Labels"]
        assert found[TEST_LABEL] == SESSION_ID
        assert found[labels.OWNER_PID] == str(os.getpid())
    finally:
        born.remove()
    assert not folder.exists()
    assert engine.image_id(snapshot["image"])  # the snapshot stays


def test_two_sandboxes_from_one_snapshot_diverge(snapshot, settings):
    first = Sandbox.from_snapshot(snapshot["name"], settings)
    try:
        second = Sandbox.from_snapshot(snapshot["name"], settings)
        try:
            assert first.private_folder != second.private_folder
            ok(first, "echo one > /workspace/mine && echo one > /home/sandbox/mine")
            ok(second, "printf y >> /workspace/big")
            assert second.exec("test -e /workspace/mine || test -e /home/sandbox/mine").exit_code
            assert big_hash(first) != big_hash(second)
            kept = Path(snapshot["workspace"])
            assert not (kept / "mine").exists()
            assert hashlib.sha256((kept / "big").read_bytes()).hexdigest() == big_hash(first)
        finally:
            second.remove()
    finally:
        first.remove()


def test_an_existing_name_is_replaced_only_when_asked_and_delete_removes_it(
    source, settings, snapshot_names, docker_engine
):
    name = new_snapshot_name(snapshot_names)
    source.snapshot(name)
    ok(source, "echo second > /workspace/second-version")
    try:
        with pytest.raises(UsageError, match="already exists"):
            source.snapshot(name)
        replaced = source.snapshot(name, replace=True)
        assert (Path(replaced["workspace"]) / "second-version").is_file()
        born = Sandbox.from_snapshot(name, settings)
        try:
            assert ok(born, "cat /workspace/second-version") == "second\n"
        finally:
            born.remove()
    finally:
        ok(source, "rm -f /workspace/second-version")
    folder = workspaces.snapshots_root(settings) / name
    assert snapshots.delete(settings, name) is True
    assert not engine.image_id(snapshots.snapshot_image(name))
    assert not folder.exists()
    assert snapshots.delete(settings, name) is False
    with pytest.raises(UsageError, match=f"no snapshot named {name}"):
        Sandbox.from_snapshot(name, settings)


def test_invalid_or_missing_snapshot_names_are_usage_errors(source, settings):
    for bad in ("../x", "A", "", "a/b", "-x", "x" * 64):
        with pytest.raises(UsageError, match="invalid snapshot name"):
            source.snapshot(bad)
        with pytest.raises(UsageError, match="invalid snapshot name"):
            Sandbox.from_snapshot(bad, settings)
        with pytest.raises(UsageError, match="invalid snapshot name"):
            snapshots.delete(settings, bad)
    missing = f"t-missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(UsageError, match=f"no snapshot named {missing}"):
        Sandbox.from_snapshot(missing, settings)
    assert not (settings.path("state_dir") / "x").exists()


def test_the_listing_shows_the_snapshot_and_its_workspace_size(snapshot, source):
    found = {entry["name"]: entry for entry in snapshots.listing()}
    entry = found[snapshot["name"]]
    assert entry["image"] == snapshot["image"]
    assert entry["source"] == source.name
    assert entry["size"] > 0 and entry["created"]
    assert entry["workspace"] == snapshot["workspace"]
    assert entry["workspace_bytes"] >= BIG_BYTES


def test_a_pool_starts_its_sandboxes_from_a_snapshot(snapshot, source, settings, docker_engine):
    with SandboxPool(
        size=2, settings=settings, snapshot=snapshot["name"], extra_labels=TEST_LABELS
    ) as pool:
        pool.wait_ready(timeout=120)
        boxes = [pool.acquire(), pool.acquire()]
        for box in boxes:
            assert package_value(box) == VALUE
            assert big_hash(box) == source.big
            assert box.processes() == []
            found = box.inspect()["Config"]["Labels"]
            assert found[POOL_LABEL] == pool.id and found[TEST_LABEL] == SESSION_ID
        ok(boxes[0], "echo only-first > /workspace/first")
        assert boxes[1].exec("test -e /workspace/first").exit_code == 1
        folders = [box.private_folder for box in boxes]
        pool_id = pool.id
    assert pool_containers(docker_engine, pool_id) == []
    assert not [folder for folder in folders if folder.exists()]
    assert engine.image_id(snapshot["image"])
