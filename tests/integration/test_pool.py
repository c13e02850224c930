"""Issue 14 on a real engine: the warm pool (SandboxPool).

A pool fills with started, healthy, hardened sandboxes labelled with its id and its
owner's pid; acquire hands a ready one over at once and never twice; each has a private
workspace of its own, destroyed with the sandbox on release; closing the pool removes
everything it made. The cap holds, a missing image or snapshot is one clear error, 16
sandboxes run commands at once, and a host process killed with its pool leaves nothing
that `inv clean` does not remove. Hostile workspaces (unreadable folders, symlinks out)
are removed without following a link.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from stigmer_sandbox import labels
from stigmer_sandbox.errors import SandboxNotReady, UsageError
from stigmer_sandbox.runtime import Sandbox, SandboxPool, workspaces

from ..conftest import ROOT, run_inv
from .conftest import SESSION_ID, TEST_LABEL, TEST_LABELS, wait_for

POOL_LABEL = f"{labels.PREFIX}.pool"
PRIVATE_LABEL = f"{labels.PREFIX}.private"


def private_settings(project_settings, tmp: Path, **changes):
    """Settings whose folders live in `tmp`: the project's own state is never touched."""
    folders = {
        "state_dir": str(tmp / "state"),
        "workspace": str(tmp / "workspace"),
        "logs": str(tmp / "logs"),
    }
    return project_settings.replace(**{**folders, **changes})


def pool_containers(client, pool_id: str, status: str | None = None) -> list:
    """Every sandbox container (any state) carrying the pool's label (their egress
    gateways carry it too, and go with them: see `pool_gateways`)."""
    found = client.containers.list(all=True, filters={"label": [f"{POOL_LABEL}={pool_id}"]})
    sandboxes = [c for c in found if c.labels.get(labels.KIND) == "sandbox"]
    return [c for c in sandboxes if status is None or c.status == status]


def pool_gateways(client, pool_id: str) -> list:
    """The egress gateways of the pool's sandboxes."""
    found = client.containers.list(all=True, filters={"label": [f"{POOL_LABEL}={pool_id}"]})
    return [c for c in found if c.labels.get(labels.KIND) == labels.EGRESS_GATEWAY]


def private_folders(settings) -> list[Path]:
    """The private sandbox folders under the state folder's `sandboxes`."""
    root = workspaces.sandboxes_root(settings)
    return sorted(root.iterdir()) if root.is_dir() else []


def gone(client, name: str) -> bool:
    return not client.containers.list(all=True, filters={"name": f"^/{name}$"})


def one_line(exc: BaseException) -> bool:
    return "\n" not in str(exc) and str(exc).strip() != ""


@pytest.fixture(scope="module")
def settings(tmp_path_factory, project_settings):
    return private_settings(project_settings, tmp_path_factory.mktemp("pool"))


@pytest.fixture(scope="module")
def pool(settings, docker_engine):
    """One pool of 3, shared by the tests that leave it as they found it (nothing held)."""
    with SandboxPool(size=3, settings=settings, extra_labels=TEST_LABELS) as made:
        made.wait_ready(timeout=120)
        yield made


@pytest.fixture
def refilled(pool):
    """The module's pool, full when the test starts."""
    assert wait_for(lambda: pool.ready == pool.size, 60), pool.notes
    yield pool
    assert pool.in_use == 0, "a test kept a sandbox acquired"


def proc_status(box: Sandbox) -> dict[str, str]:
    result = box.exec("cat /proc/self/status")
    assert result.exit_code == 0, result
    fields = (line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    return {key: value.strip() for key, value in fields}


# -- fill and acquire ----------------------------------------------------------------------


def test_a_pool_fills_with_running_healthy_hardened_labelled_sandboxes(
    pool, settings, docker_engine
):
    assert pool.ready == 3 and pool.in_use == 0
    waiting = pool_containers(docker_engine, pool.id)
    assert len(waiting) == 3, [c.name for c in waiting]
    boxes = [pool.acquire() for _ in range(3)]
    try:
        # The three handed over are the three that waited: none was started for acquire.
        assert {box.name for box in boxes} == {c.name for c in waiting}

        def healthy() -> bool:
            return all(box.status()["health"] == "healthy" for box in boxes)

        assert wait_for(healthy, 30), [box.status() for box in boxes]
        for box in boxes:
            state = box.inspect()
            assert state["State"]["Status"] == "running"
            found = state["Config"]["Labels"]
            assert found[POOL_LABEL] == pool.id
            assert found[labels.OWNER_PID] == str(os.getpid())
            assert found[TEST_LABEL] == SESSION_ID
            assert found[labels.KIND] == "sandbox"
            assert found[PRIVATE_LABEL] == str(box.private_folder)
            status = proc_status(box)
            assert int(status["CapEff"], 16) == 0, status["CapEff"]
            assert status["NoNewPrivs"] == "1"
            assert box.exec("id -u").stdout.strip() not in ("", "0")
            host = state["HostConfig"]
            assert host["Privileged"] is False and host["CapDrop"]
    finally:
        for box in boxes:
            pool.release(box)


def test_acquire_is_immediate_and_the_pool_refills_in_the_background(refilled):
    pool = refilled
    started = time.monotonic()
    box = pool.acquire()
    took = time.monotonic() - started
    try:
        assert took < 2.0, f"acquire from a full pool took {took:.2f} s"
        assert pool.in_use == 1
        assert wait_for(lambda: pool.ready == 3, 30), (pool.ready, pool.notes)
        assert box.exec("echo $HOSTNAME-works").stdout.strip().endswith("-works")
    finally:
        pool.release(box)


def test_acquire_with_none_ready_starts_one_at_once(settings, docker_engine):
    with SandboxPool(size=0, settings=settings, extra_labels=TEST_LABELS) as empty:
        assert empty.ready == 0
        box = empty.acquire(timeout=60)
        assert box.exec("echo started-now").stdout == "started-now\n"
        assert box.inspect()["State"]["Status"] == "running"
        assert box.connected
        assert empty.ready == 0 and empty.in_use == 1  # size 0: nothing refilled
        pool_id = empty.id
    assert pool_containers(docker_engine, pool_id) == []


def test_a_sandbox_is_never_handed_out_twice(refilled):
    pool = refilled
    barrier = threading.Barrier(6)

    def grab(_index: int) -> Sandbox:
        barrier.wait(timeout=30)
        return pool.acquire(timeout=60)

    with ThreadPoolExecutor(max_workers=6) as threads:
        boxes = list(threads.map(grab, range(6)))
    try:
        assert len({box.name for box in boxes}) == 6
        assert len({id(box) for box in boxes}) == 6
        assert len({box.private_folder for box in boxes}) == 6
        assert pool.in_use == 6
    finally:
        for box in boxes:
            pool.release(box)


def test_release_twice_or_of_a_foreign_sandbox_is_a_usage_error(refilled, settings):
    pool = refilled
    box = pool.acquire()
    pool.release(box)
    with pytest.raises(UsageError, match="released twice") as caught:
        pool.release(box)
    assert one_line(caught.value)
    stranger = Sandbox(settings, name=f"stigmer-sandbox-stranger-{uuid.uuid4().hex[:6]}")
    with pytest.raises(UsageError):
        pool.release(stranger)
    with SandboxPool(size=0, settings=settings, extra_labels=TEST_LABELS) as other:
        theirs = other.acquire(timeout=60)
        with pytest.raises(UsageError):
            pool.release(theirs)
        assert theirs.exec("true").exit_code == 0  # refusing it did not retire it
    assert pool.in_use == 0


def test_a_released_sandbox_refuses_use_at_once(refilled):
    pool = refilled
    box = pool.acquire()
    pool.release(box)
    with ThreadPoolExecutor(max_workers=1) as thread:
        for use in (
            lambda: box.exec("echo never"),
            lambda: box.put_file("x.txt", "never"),
            box.up,
            lambda: box.session().exec("echo never"),
        ):
            attempt = thread.submit(use)
            with pytest.raises(SandboxNotReady, match="released"):
                attempt.result(timeout=15)  # raises, never hangs
    assert not box.connected


# -- isolation and release -----------------------------------------------------------------


def test_two_acquired_sandboxes_do_not_share_a_workspace(refilled, settings):
    pool = refilled
    first, second = pool.acquire(), pool.acquire()
    try:
        secret = uuid.uuid4().hex
        assert first.exec(f"echo {secret} > /workspace/only-here.txt").exit_code == 0
        assert first.exec("cat /workspace/only-here.txt").stdout.strip() == secret
        assert second.exec("test -e /workspace/only-here.txt").exit_code == 1
        assert second.exec(f"grep -rl {secret} /workspace").exit_code != 0
        root = workspaces.sandboxes_root(settings)
        assert first.private_folder != second.private_folder
        for box in (first, second):
            assert box.private_folder.parent == root
            mounts = {m["target"]: m["source"] for m in box.status()["mounts"]}
            assert mounts["/workspace"] == str(box.private_folder / "workspace")
            assert workspaces.is_private(box.private_folder, root)
        assert (first.private_folder / "workspace" / "only-here.txt").is_file()
        assert not (second.private_folder / "workspace" / "only-here.txt").exists()
        assert not (settings.path("workspace") / "only-here.txt").exists()
    finally:
        pool.release(first)
        pool.release(second)


def test_release_destroys_the_container_and_its_folder_and_a_fresh_one_replaces_it(
    refilled, docker_engine
):
    pool = refilled
    box = pool.acquire()
    name, folder = box.name, box.private_folder
    assert box.exec("echo data > /workspace/kept.txt").exit_code == 0
    pool.release(box)
    assert wait_for(lambda: gone(docker_engine, name), 30), name
    assert wait_for(lambda: not folder.exists(), 30), folder
    assert wait_for(lambda: pool.ready == 3, 60)
    names = {c.name for c in pool_containers(docker_engine, pool.id)}
    assert name not in names and len(names) == 3


def test_a_hostile_workspace_is_removed_without_following_links(refilled, settings):
    pool = refilled
    state = settings.path("state_dir")
    keep = state / f"keep-{uuid.uuid4().hex[:6]}"
    keep.mkdir(mode=0o750)
    keep.chmod(0o750)
    (keep / "sentinel").write_text("stay")
    box = pool.acquire()
    folder = box.private_folder
    try:
        hostile = (
            "mkdir -p /workspace/d/e && touch /workspace/d/e/f && "
            "chmod 000 /workspace/d/e /workspace/d && "
            "ln -s /etc /workspace/link && "
            f"ln -s {state} /workspace/state-link && "
            f"ln -s {keep} /workspace/keep-link && "
            f"ln -s {keep}/sentinel /workspace/sentinel-link && "
            f"ln -s {folder} /workspace/self-link"
        )
        done = box.exec(hostile)
        assert done.exit_code == 0, done
        assert (folder / "workspace" / "link").is_symlink()
    finally:
        pool.release(box)
    assert wait_for(lambda: not folder.exists() and not folder.is_symlink(), 30), folder
    assert (keep / "sentinel").read_text() == "stay"
    assert keep.stat().st_mode & 0o777 == 0o750  # never opened up through a link
    assert Path("/etc/hostname").exists() and Path("/etc/passwd").stat().st_size > 0
    assert state.is_dir() and workspaces.sandboxes_root(settings).is_dir()


# -- closing, caps, errors -----------------------------------------------------------------


def test_closing_removes_ready_and_acquired_sandboxes_and_their_folders(
    tmp_path, project_settings, docker_engine
):
    settings = private_settings(project_settings, tmp_path)
    made = SandboxPool(size=2, settings=settings, extra_labels=TEST_LABELS)
    made.wait_ready(timeout=120)
    held = made.acquire()
    assert wait_for(lambda: made.ready == 2, 60)
    assert len(pool_containers(docker_engine, made.id)) == 3
    assert len(pool_gateways(docker_engine, made.id)) == 3  # one egress gateway each
    assert len(private_folders(settings)) == 3
    made.close()
    assert pool_containers(docker_engine, made.id) == []
    assert pool_gateways(docker_engine, made.id) == []
    assert private_folders(settings) == []
    assert not [note for note in made.notes if "could not remove" in note], made.notes
    with pytest.raises(SandboxNotReady):
        held.exec("true")
    with pytest.raises(UsageError, match="closed"):
        made.acquire()
    made.close()  # idempotent


def test_a_pool_above_the_cap_is_refused_in_one_line(settings):
    for size in (settings.pool_max_size + 1, -1):
        with pytest.raises(UsageError, match="pool size") as caught:
            SandboxPool(size=size, settings=settings, extra_labels=TEST_LABELS)
        assert one_line(caught.value), str(caught.value)
        assert str(settings.pool_max_size) in caught.value.message


def test_acquire_beyond_the_cap_waits_then_says_so(tmp_path, project_settings, docker_engine):
    settings = private_settings(project_settings, tmp_path, pool_max_size=2)
    with SandboxPool(size=1, settings=settings, extra_labels=TEST_LABELS) as capped:
        first, second = capped.acquire(timeout=60), capped.acquire(timeout=60)
        started = time.monotonic()
        with pytest.raises(SandboxNotReady, match="cap of 2") as caught:
            capped.acquire(timeout=0.5)
        assert time.monotonic() - started < 10
        assert one_line(caught.value)
        assert capped.ready == 0
        assert len(pool_containers(docker_engine, capped.id)) == 2
        # A waiting acquire gets a sandbox as soon as one is released.
        with ThreadPoolExecutor(max_workers=1) as thread:
            waiting = thread.submit(capped.acquire, 60)
            time.sleep(0.3)
            assert not waiting.done()
            capped.release(first)
            third = waiting.result(timeout=60)
        assert third.exec("echo third").stdout == "third\n"
        assert third.name not in (first.name, second.name)
        # The released one is removed in the background; then two are left, never more.
        assert wait_for(lambda: len(pool_containers(docker_engine, capped.id)) == 2, 30)


def test_a_pool_whose_memory_exceeds_the_host_says_so_and_still_works(
    tmp_path, project_settings, docker_engine
):
    settings = private_settings(project_settings, tmp_path, memory="64g")
    host = docker_engine.info()["MemTotal"]
    assert host < 64 * 2**30, "this test needs a host with less than 64 GiB"
    with SandboxPool(size=1, settings=settings, extra_labels=TEST_LABELS) as big:
        assert len(big.notes) == 1, big.notes
        note = big.notes[0]
        assert "64g" in note and "64.0 GiB" in note and f"{host / 2**30:.1f} GiB" in note
        box = big.acquire(timeout=60)
        assert box.exec("echo fine").stdout == "fine\n"
    with SandboxPool(size=0, settings=settings, extra_labels=TEST_LABELS) as empty:
        assert empty.notes == []


def test_a_missing_image_fails_at_construction_and_leaves_nothing(
    tmp_path, project_settings, docker_engine
):
    settings = private_settings(project_settings, tmp_path)
    mark = {f"{TEST_LABEL}-case": uuid.uuid4().hex}
    missing = f"stigmer-sandbox-test-missing:{uuid.uuid4().hex[:8]}"
    threads = {t.name for t in threading.enumerate()}
    with pytest.raises(SandboxNotReady, match="image not found") as caught:
        SandboxPool(size=2, image=missing, settings=settings, extra_labels={**TEST_LABELS, **mark})
    assert one_line(caught.value.message) and missing in caught.value.message
    time.sleep(0.5)
    key, value = next(iter(mark.items()))
    assert docker_engine.containers.list(all=True, filters={"label": [f"{key}={value}"]}) == []
    assert private_folders(settings) == []
    started = {t.name for t in threading.enumerate()} - threads
    assert not [name for name in started if name.startswith("stigmer-pool")], started


def test_a_missing_or_invalid_snapshot_is_a_usage_error(settings):
    missing = f"t-missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(UsageError, match=f"no snapshot named {missing}") as caught:
        SandboxPool(size=1, settings=settings, snapshot=missing, extra_labels=TEST_LABELS)
    assert one_line(caught.value.message)
    for bad in ("../x", "A", ""):
        with pytest.raises(UsageError, match="invalid snapshot name"):
            SandboxPool(size=1, settings=settings, snapshot=bad, extra_labels=TEST_LABELS)


# -- many at once --------------------------------------------------------------------------


def test_sixteen_sandboxes_run_commands_at_the_same_time(tmp_path, project_settings, docker_engine):
    # The cap equals the size: acquiring all 16 starts no replacements to compete with them.
    settings = private_settings(project_settings, tmp_path, pool_max_size=16)
    many = SandboxPool(size=16, settings=settings, extra_labels=TEST_LABELS)
    try:
        many.wait_ready(timeout=180)
        boxes = [many.acquire(timeout=60) for _ in range(16)]
        assert len({box.name for box in boxes}) == 16
        for box in boxes:  # each private workspace says whose it is
            (box.private_folder / "workspace" / "who.txt").write_text(box.name)

        def run(box: Sandbox):
            return box.exec("sleep 1; echo $(cat /workspace/who.txt)-ok", timeout=60)

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=16) as threads:
            results = list(threads.map(run, boxes))
        elapsed = time.monotonic() - started
        assert all(r.exit_code == 0 for r in results), [r for r in results if r.exit_code]
        assert [r.stdout for r in results] == [f"{box.name}-ok\n" for box in boxes]
        assert elapsed < 12, f"16 one-second commands took {elapsed:.1f} s"
    finally:
        many.close()
    assert pool_containers(docker_engine, many.id) == []
    assert private_folders(settings) == []


# -- a killed owner ------------------------------------------------------------------------

CHILD = """
import json, sys, time
from pathlib import Path
from stigmer_sandbox.runtime import SandboxPool
from tests.integration.test_runtime import settings_in

tmp, extra = Path(sys.argv[1]), json.loads(sys.argv[2])
pool = SandboxPool(size=2, settings=settings_in(tmp), extra_labels=extra)
box = pool.acquire()
assert box.exec("echo left-behind > /workspace/file.txt").exit_code == 0
pool.wait_ready()
print(json.dumps({"pool": pool.id, "name": box.name}), flush=True)
time.sleep(600)
"""


def read_line(stream, seconds: float) -> str:
    ready, _, _ = select.select([stream], [], [], seconds)
    return stream.readline() if ready else ""


def test_a_killed_owner_leaves_nothing_inv_clean_does_not_remove(tmp_path, docker_engine):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), json.dumps(TEST_LABELS)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = read_line(child.stdout, 120)
        if not line:
            child.kill()
            pytest.fail(f"the pool's host process never got ready: {child.stderr.read()[-2000:]}")
        started = json.loads(line)
        containers = pool_containers(docker_engine, started["pool"])
        assert len(containers) == 3, [c.name for c in containers]
        assert {c.labels[labels.OWNER_PID] for c in containers} == {str(child.pid)}
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
        child.stderr.close()
    state = tmp_path / "state"
    folders = sorted((state / workspaces.SANDBOXES).iterdir())
    assert len(folders) == 3, folders
    assert (state / workspaces.SANDBOXES / started["name"] / "workspace" / "file.txt").exists()
    done = run_inv("clean", env={"INVOKE_STIGMER_STATE_DIR": str(state)}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert pool_containers(docker_engine, started["pool"]) == []
    assert not [f for f in (state / workspaces.SANDBOXES).iterdir()], (
        "inv clean left the private folders of a dead owner: " + done.stdout
    )


LEFT_OPEN = """
import json, sys
from pathlib import Path
from stigmer_sandbox.runtime import SandboxPool
from tests.integration.test_runtime import settings_in

tmp, extra = Path(sys.argv[1]), json.loads(sys.argv[2])
pool = SandboxPool(size=1, settings=settings_in(tmp), extra_labels=extra)
box = pool.acquire()
pool.wait_ready()
print(json.dumps({"pool": pool.id}), flush=True)
# no close(): the interpreter ends with the pool open, a sandbox acquired
"""


def test_a_pool_left_open_is_removed_when_its_process_exits(tmp_path, docker_engine):
    done = subprocess.run(
        [sys.executable, "-c", LEFT_OPEN, str(tmp_path), json.dumps(TEST_LABELS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    started = json.loads(done.stdout)
    assert pool_containers(docker_engine, started["pool"]) == []
    assert not list((tmp_path / "state" / workspaces.SANDBOXES).iterdir())
