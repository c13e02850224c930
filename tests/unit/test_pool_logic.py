"""Issue 14 without an engine: private workspace folders, snapshot names and labels, the
engine errors that name what ran out, and the pool's bookkeeping with fake sandboxes
(never handed out twice, the cap, refills, close, dead and failing starts)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from types import SimpleNamespace

import docker.errors
import pytest

from stigmer_sandbox import engine, labels
from stigmer_sandbox.config import load_settings
from stigmer_sandbox.errors import SandboxError, SandboxNotReady, UsageError
from stigmer_sandbox.runtime import host_helper, snapshots, workspaces
from stigmer_sandbox.runtime import pool as pool_module
from stigmer_sandbox.runtime.pool import SandboxPool

from ..conftest import ROOT

URL = "unix:///var/run/docker.sock"
NOBODY = 65534


def wait_for(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@contextmanager
def unprivileged():
    """Run the block as an ordinary user (`nobody` when the tests run as root), so file
    modes bind as they do for a user without root; yields a scratch folder they own."""
    scratch = Path(tempfile.mkdtemp(prefix="stigmer-pool-logic-"))
    root = os.geteuid() == 0
    try:
        if root:
            os.chown(scratch, NOBODY, NOBODY)
            os.setegid(NOBODY)
            os.seteuid(NOBODY)
        try:
            yield scratch
        finally:
            if root:
                os.seteuid(0)
                os.setegid(0)
    finally:
        subprocess.run(["chmod", "-R", "u+rwx", str(scratch)], check=False)
        subprocess.run(["rm", "-rf", str(scratch)], check=False)


# -- private workspace folders -------------------------------------------------------------


def test_create_makes_the_marker_and_the_mounted_folders(tmp_path):
    root = tmp_path / "state" / workspaces.SANDBOXES
    folder = workspaces.create(root, "box-1")
    assert folder == root / "box-1"
    assert sorted(p.name for p in folder.iterdir()) == ["logs", "owner.json", "workspace"]
    entry = workspaces.marker(folder)
    assert entry["name"] == "box-1" and entry["pid"] == os.getpid()
    assert entry["host"] == os.uname().nodename and entry["at"] <= time.time()
    assert workspaces.is_private(folder, root)
    with pytest.raises(SandboxError, match="already exists"):
        workspaces.create(root, "box-1")
    assert workspaces.marker(folder)["name"] == "box-1"  # the existing one is left alone


def test_create_copies_a_workspace_with_links_fifos_and_modes_as_they_are(tmp_path):
    source, outside = tmp_path / "source", tmp_path / "outside"
    (source / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("outside")
    (source / "sub" / "file").write_text("data")
    (source / "sub" / "file").chmod(0o640)
    (source / "out").symlink_to(outside)
    (source / "rel").symlink_to("sub/file")
    os.mkfifo(source / "fifo")
    folder = workspaces.create(tmp_path / "root", "copy", source)
    copied = folder / "workspace"
    assert (copied / "sub" / "file").read_text() == "data"
    assert stat.S_IMODE((copied / "sub" / "file").stat().st_mode) == 0o640
    assert (copied / "out").is_symlink() and os.readlink(copied / "out") == str(outside)
    assert os.readlink(copied / "rel") == "sub/file"
    assert stat.S_ISFIFO((copied / "fifo").lstat().st_mode)
    assert not (copied / "secret").exists()


def test_a_failed_copy_leaves_no_half_made_folder(tmp_path):
    root = tmp_path / "root"
    with pytest.raises(SandboxError, match="copying the workspace"):
        workspaces.create(root, "half", tmp_path / "missing")
    assert list(root.iterdir()) == []


@pytest.mark.parametrize(
    "content",
    [None, "not json", json.dumps(["a", "list"]), json.dumps({"name": "another", "pid": 1})],
)
def test_a_folder_without_a_matching_marker_is_not_ours(tmp_path, content):
    folder = tmp_path / "box"
    folder.mkdir()
    if content is not None:
        (folder / workspaces.MARKER).write_text(content)
    assert workspaces.marker(folder) is None
    assert not workspaces.is_private(folder, tmp_path)


def test_is_private_refuses_links_files_and_folders_elsewhere(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    real = workspaces.create(elsewhere, "box")
    root.mkdir()
    (root / "box").symlink_to(real)  # a link named like the folder it points at
    assert workspaces.marker(root / "box") is not None  # the marker reads through the link
    assert not workspaces.is_private(root / "box", root)
    assert not workspaces.is_private(real, root)  # not directly in root
    assert workspaces.is_private(real, elsewhere)
    (root / "file").write_text(json.dumps({"name": "file"}))
    assert not workspaces.is_private(root / "file", root)
    nested = workspaces.create(real / "workspace", "inner")
    assert not workspaces.is_private(nested, root)


def test_remove_opens_up_folders_a_command_made_unreadable():
    with unprivileged() as scratch:
        folder = workspaces.create(scratch / "root", "box")
        deep = folder / "workspace" / "d" / "e"
        deep.mkdir(parents=True)
        (deep / "f").write_text("x")
        (deep / "f").chmod(0o000)
        deep.chmod(0o000)
        (folder / "workspace" / "d").chmod(0o000)
        (folder / "workspace").chmod(0o500)
        with pytest.raises(PermissionError):  # a plain removal fails
            shutil.rmtree(folder / "workspace" / "d")
        workspaces.remove(folder)
        assert not folder.exists()
        assert (scratch / "root").is_dir()


def test_remove_handles_a_tree_deeper_than_path_max(tmp_path):
    folder = workspaces.create(tmp_path / "root", "box")
    deep = os.open(folder / "workspace", os.O_RDONLY)
    try:
        for _ in range(25):  # 25 * 201 characters: past PATH_MAX (4096)
            os.mkdir("d" * 200, dir_fd=deep)
            inner = os.open("d" * 200, os.O_RDONLY, dir_fd=deep)
            os.close(deep)
            deep = inner
    finally:
        os.close(deep)
    workspaces.remove(folder)
    assert not folder.exists()


def test_remove_never_follows_a_symlink_out(tmp_path):
    outside = tmp_path / "outside"
    (outside / "inner").mkdir(parents=True)
    (outside / "inner").chmod(0o500)
    (outside / "keep").write_text("keep")
    (outside / "keep").chmod(0o400)
    outside.chmod(0o750)
    folder = workspaces.create(tmp_path / "root", "box")
    (folder / "workspace" / "dir-link").symlink_to(outside)
    (folder / "workspace" / "file-link").symlink_to(outside / "keep")
    (folder / "workspace" / "inner-link").symlink_to(outside / "inner")
    (folder / "logs" / "root-link").symlink_to("/")
    workspaces.remove(folder)
    assert not folder.exists()
    assert (outside / "keep").read_text() == "keep"
    assert stat.S_IMODE(outside.stat().st_mode) == 0o750
    assert stat.S_IMODE((outside / "inner").stat().st_mode) == 0o500
    assert stat.S_IMODE((outside / "keep").stat().st_mode) == 0o400
    (outside / "inner").chmod(0o700)


def test_remove_of_a_link_leaves_its_target_and_of_nothing_is_no_error(tmp_path):
    target = workspaces.create(tmp_path / "elsewhere", "box")
    (target / "workspace" / "file").write_text("kept")
    link = tmp_path / "root" / "box"
    link.parent.mkdir()
    link.symlink_to(target)
    with suppress(SandboxError):
        workspaces.remove(link)
    assert (target / "workspace" / "file").read_text() == "kept"
    workspaces.remove(tmp_path / "root" / "never-made")


def test_size_is_disk_usage_and_never_follows_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "huge").write_bytes(b"x" * 1_000_000)
    folder = tmp_path / "workspace"
    (folder / "sub").mkdir(parents=True)
    (folder / "a").write_bytes(b"a" * 1000)
    (folder / "sub" / "b").write_bytes(b"b" * 234)
    (folder / "to-huge").symlink_to(outside / "huge")
    (folder / "to-outside").symlink_to(outside)
    with (folder / "sparse").open("wb") as sparse:
        sparse.truncate(10 * 2**30)  # 10 GiB apparent, no blocks: it costs no disk
    assert 1234 <= workspaces.size_bytes(folder) < 64 * 1024
    assert workspaces.size_bytes(tmp_path / "missing") == 0


def test_owner_gone_only_for_a_dead_pid_on_this_host():
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead = int(ended.stdout)
    here = os.uname().nodename
    assert workspaces.owner_gone({"pid": dead, "host": here}) is True
    assert workspaces.owner_gone({"pid": os.getpid(), "host": here}) is False
    assert workspaces.owner_gone({"pid": 1, "host": here}) is False
    assert workspaces.owner_gone({"pid": dead, "host": here + "-elsewhere"}) is False
    assert workspaces.owner_gone({"pid": str(dead), "host": here}) is False
    assert workspaces.owner_gone({}) is False


def test_roots_live_in_the_state_folder(tmp_path):
    settings = load_settings(ROOT, environ={}).replace(state_dir=str(tmp_path / "state"))
    assert workspaces.sandboxes_root(settings) == tmp_path / "state" / "sandboxes"
    assert workspaces.snapshots_root(settings) == tmp_path / "state" / "snapshots"


# -- snapshot names and labels -------------------------------------------------------------


@pytest.mark.parametrize("good", ["a", "0", "t-1234", "a.b_c-d", "x" * 63, "v1.2.3"])
def test_good_snapshot_names(good):
    assert snapshots.check_name(good) == good
    assert snapshots.snapshot_image(good) == f"stigmer-sandbox-snapshot:{good}"


@pytest.mark.parametrize(
    "bad",
    ["", "A", "../x", "..", ".x", "-x", "_x", "a/b", "a b", "a:b", "x" * 64, "é", "a\n", None, 5],
)
def test_bad_snapshot_names_are_usage_errors(bad):
    with pytest.raises(UsageError, match="invalid snapshot name") as caught:
        snapshots.check_name(bad)
    assert "\n" not in caught.value.message
    with pytest.raises(UsageError):
        snapshots.snapshot_image(bad)


def test_committed_images_clear_every_per_container_label(tmp_path):
    source = SimpleNamespace(name="stigmer-sandbox-abc")
    folder = tmp_path / workspaces.SNAPSHOTS / "snap"
    parent = SimpleNamespace(id="sha256:" + "d" * 64, labels={labels.KIND: "basic"})
    made = snapshots._image_labels("snapshot", source, folder, parent)
    for key in snapshots.PER_CONTAINER:
        assert made[f"{labels.PREFIX}.{key}"] == ""
    for key in ("owner-pid", "owner-host", "expires", "pool", "private"):
        assert key in snapshots.PER_CONTAINER
    assert made[labels.KIND] == "snapshot"
    assert made[f"{labels.PREFIX}.source"] == "stigmer-sandbox-abc"
    assert made[snapshots.WORKSPACE_LABEL] == str(folder)
    assert made[snapshots.CHECKED_LABEL] == parent.id
    assert made[host_helper.PROJECT_IMAGE_LABEL] == parent.id
    assert made[snapshots.FORKED_BY_PID] == ""  # a snapshot waits for no process
    forked = snapshots._image_labels("fork", source, folder, parent)
    assert forked[snapshots.WORKSPACE_LABEL] == ""
    assert forked[snapshots.FORKED_BY_PID] == str(os.getpid())
    assert snapshots.fork_image("stigmer-sandbox-abc") == "stigmer-sandbox-fork:stigmer-sandbox-abc"


def test_a_snapshot_workspace_label_is_trusted_only_when_it_checks_out(tmp_path):
    root = tmp_path / workspaces.SNAPSHOTS
    folder = workspaces.create(root, "snap")

    def image(named: str, tags=("stigmer-sandbox-snapshot:snap",)):
        return SimpleNamespace(labels={snapshots.WORKSPACE_LABEL: named}, tags=list(tags))

    assert snapshots.workspace_of(image(str(folder))) == folder
    assert snapshots.workspace_of(image(str(folder), ("stigmer-sandbox-snapshot:other",))) is None
    assert snapshots.workspace_of(image("relative/snapshots/snap")) is None
    assert snapshots.workspace_of(image("")) is None
    unmarked = tmp_path / "x" / workspaces.SNAPSHOTS / "snap"
    unmarked.mkdir(parents=True)
    assert snapshots.workspace_of(image(str(unmarked))) is None
    elsewhere = workspaces.create(tmp_path / "sandboxes", "snap")
    assert snapshots.workspace_of(image(str(elsewhere))) is None
    assert snapshots.workspace_of(SimpleNamespace(labels=None, tags=None)) is None


# -- engine errors that name what ran out --------------------------------------------------


@pytest.mark.parametrize(
    ("explanation", "message", "hint"),
    [
        ("write /var/lib/docker/x: no space left on device", "disk is full", "inv clean"),
        ("OCI runtime create failed: fork/exec: cannot allocate memory", "out of memory", "pool"),
        ("runc: out of memory", "out of memory", "lower `memory`"),
        ("fork/exec /usr/bin/runc: resource temporarily unavailable", "out of processes", "ulimit"),
        ("open /proc/self/fd: too many open files", "file handles", "pid_max"),
        ("cgroup: pids.max reached", "out of processes", "inv sandbox.ls"),
        (
            "could not find an available, non-overlapping IPv4 address pool among the defaults",
            "no network addresses left",
            "docker network prune",
        ),
        ("no available IPv4 addresses on this network's address pools", "network addresses", ""),
    ],
)
def test_exhaustion_errors_say_what_ran_out(explanation, message, hint):
    exc = docker.errors.APIError("500 Server Error", explanation=explanation + "\nmore detail")
    err = engine.classify(exc, URL)
    assert message in err.message
    assert explanation.splitlines()[0][:160] in err.message
    assert "\n" not in err.message and "more detail" not in err.message
    assert hint in (err.hint or "")
    assert not err.message.startswith("Docker Engine error")


def test_exhaustion_matching_ignores_case_and_keeps_lines_short():
    exc = docker.errors.APIError("500", explanation="No Space Left On Device " + "x" * 500)
    err = engine.classify(exc, URL)
    assert err.message.startswith("Docker's disk is full")
    assert len(err.message) < 250


def test_other_api_errors_keep_the_generic_message():
    exc = docker.errors.APIError("500", explanation="conflict: name already in use\nsecond")
    err = engine.classify(exc, URL)
    assert err.message == "Docker Engine error: conflict: name already in use"
    assert URL in err.hint


def test_engine_errors_raises_the_exhaustion_message():
    with pytest.raises(SandboxError, match="host is out of memory"), engine.engine_errors(URL):
        raise docker.errors.APIError("500", explanation="cannot allocate memory")


def test_an_exhaustion_the_engine_reports_as_not_found_is_still_named():
    # Measured on Engine 20.10: an exhausted address pool comes back as 404.
    pool_message = "could not find an available, non-overlapping IPv4 address pool"
    with pytest.raises(SandboxError, match="no network addresses left"), engine.engine_errors():
        raise docker.errors.NotFound("404", explanation=pool_message)
    with pytest.raises(SandboxError, match="not found: No such container"), engine.engine_errors():
        raise docker.errors.NotFound("404", explanation="No such container: x")


# -- the pool's bookkeeping, with fake sandboxes -------------------------------------------


class FakeSandbox:
    """What the pool uses of a sandbox: a name, a connection, retire and remove."""

    def __init__(self, name: str, fail_remove: bool = False) -> None:
        self.name = name
        self.connected = True
        self.retired = False
        self.removed = 0
        self.fail_remove = fail_remove

    def retire(self) -> None:
        self.retired = True
        self.connected = False

    def remove(self) -> bool:
        self.removed += 1
        if self.fail_remove:
            raise SandboxError("engine said no")
        return True


class FakeBackend:
    name = "fake"

    def __init__(self, memory: int = 64 * 2**30, pid_max: int = 4_194_304) -> None:
        self.memory = memory
        self.pid_max = pid_max

    def host_memory(self) -> int:
        return self.memory

    def host_pid_max(self) -> int:
        return self.pid_max


class Starter:
    """Stands in for `SandboxPool._start_sandbox`: counts, can fail or wait for a gate."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.made: list[FakeSandbox] = []
        self.failures: list[BaseException] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def __call__(self) -> FakeSandbox:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        with self.lock:
            if self.failures:
                raise self.failures.pop(0)
            sandbox = FakeSandbox(f"fake-{len(self.made)}")
            self.made.append(sandbox)
            return sandbox


@pytest.fixture
def starter(monkeypatch):
    made = Starter()
    monkeypatch.setattr(SandboxPool, "_check_source", lambda self: None)
    monkeypatch.setattr(SandboxPool, "_start_sandbox", made)  # not bound: no self
    return made


@pytest.fixture
def settings():
    return load_settings(ROOT, environ={})


def make_pool(settings, size: int, **changes) -> SandboxPool:
    host = FakeBackend(changes.pop("host_memory", 64 * 2**30), changes.pop("pid_max", 4_194_304))
    return SandboxPool(size=size, settings=settings.replace(**changes), backend=host)


@pytest.mark.parametrize("size", [-1, 33, 1.5, "2", None])
def test_a_bad_size_is_refused_before_anything_starts(settings, starter, size):
    with pytest.raises(UsageError, match="pool size") as caught:
        make_pool(settings, size, pool_max_size=32)
    assert "\n" not in str(caught.value) and "pool_max_size" in caught.value.hint
    assert starter.made == []


def test_the_memory_note_compares_the_pool_with_the_host(settings, starter):
    with make_pool(settings, 3, memory="2g", host_memory=4 * 2**30) as over:
        assert len(over.notes) == 1
        assert "3 sandboxes with memory 2g may use 6.0 GiB" in over.notes[0]
        assert "this host has 4.0 GiB" in over.notes[0]
    with make_pool(settings, 2, memory="2g", host_memory=4 * 2**30) as exact:
        assert exact.notes == []
    with make_pool(settings, 3, memory="2g", host_memory=0) as unknown:
        assert unknown.notes == []


def test_the_pids_note_compares_the_pool_with_the_kernel(settings, starter):
    with make_pool(settings, 4, pids_limit=512, pid_max=2048) as exact:
        assert exact.notes == []
    with make_pool(settings, 5, pids_limit=512, pid_max=2048) as over:
        assert over.notes == [
            "5 sandboxes with pids_limit 512 may hold 2560 host tasks; the host allows 2048 "
            "(kernel.pid_max): a fork bomb in many of them at once could exhaust the host "
            "(lower `pids_limit`)"
        ]
    with make_pool(settings, 5, pids_limit=512, pid_max=0) as unknown:
        assert unknown.notes == []
    # gVisor's own host tasks count: 2 such sandboxes of 512 reach this host's 32768.
    with make_pool(settings, 2, pids_limit=512, pid_max=32768, isolation="gvisor") as gvisor:
        assert gvisor.notes and "may hold 33792 host tasks" in gvisor.notes[0]


def test_a_pool_fills_and_acquire_takes_the_waiting_ones_first(settings, starter):
    with make_pool(settings, 3) as pool:
        pool.wait_ready(timeout=5)
        assert pool.ready == 3 and len(starter.made) == 3
        waiting = {s.name for s in starter.made}
        first = pool.acquire()
        assert first.name in waiting and pool.in_use == 1
        assert wait_for(lambda: pool.ready == 3)
        assert len(starter.made) == 4  # one replacement, no more


def test_acquire_with_none_ready_starts_one_in_the_caller(settings, starter):
    with make_pool(settings, 0) as pool:
        sandbox = pool.acquire(timeout=5)
        assert starter.made == [sandbox] and pool.in_use == 1 and pool.ready == 0


def test_a_sandbox_is_never_handed_out_twice(settings, starter):
    with make_pool(settings, 4, pool_max_size=64) as pool:
        pool.wait_ready(timeout=5)
        with ThreadPoolExecutor(max_workers=16) as threads:
            got = list(threads.map(lambda _i: pool.acquire(timeout=10), range(40)))
        assert len({id(s) for s in got}) == 40 and len({s.name for s in got}) == 40
        assert pool.in_use == 40
        with ThreadPoolExecutor(max_workers=16) as threads:
            list(threads.map(pool.release, got))
        assert pool.in_use == 0
        assert wait_for(lambda: all(s.removed == 1 for s in got))
        assert all(s.retired for s in got)


def test_release_twice_or_foreign_is_a_usage_error(settings, starter):
    with make_pool(settings, 1) as pool:
        sandbox = pool.acquire(timeout=5)
        pool.release(sandbox)
        with pytest.raises(UsageError, match="released twice"):
            pool.release(sandbox)
        with pytest.raises(UsageError):
            pool.release(FakeSandbox(sandbox.name))  # same name, another object
        with pytest.raises(UsageError):
            pool.release("not a sandbox")
        assert wait_for(lambda: sandbox.removed == 1)
        assert sandbox.retired


def test_the_cap_makes_acquire_wait_and_then_say_so(settings, starter):
    with make_pool(settings, 1, pool_max_size=2) as pool:
        first, second = pool.acquire(timeout=5), pool.acquire(timeout=5)
        assert pool.ready == 0
        with pytest.raises(SandboxNotReady, match="cap of 2"):
            pool.acquire(timeout=0.2)
        assert len(starter.made) == 2  # nothing started beyond the cap
        with ThreadPoolExecutor(max_workers=1) as thread:
            waiting = thread.submit(pool.acquire, 5)
            time.sleep(0.1)
            assert not waiting.done()
            pool.release(first)
            third = waiting.result(timeout=5)
        assert third not in (first, second) and pool.in_use == 2
        assert len(starter.made) == 3


def test_close_removes_waiting_and_acquired_sandboxes(settings, starter):
    pool = make_pool(settings, 2)
    pool.wait_ready(timeout=5)
    held = pool.acquire()
    assert wait_for(lambda: pool.ready == 2)
    pool.close()
    assert len(starter.made) == 3
    assert all(s.removed == 1 and s.retired for s in starter.made), starter.made
    assert pool.ready == 0 and pool.in_use == 0
    with pytest.raises(UsageError, match="closed"):
        pool.acquire()
    with pytest.raises(UsageError, match="closed"):
        pool.wait_ready()
    with pytest.raises(UsageError):
        pool.release(held)
    pool.close()
    assert all(s.removed == 1 for s in starter.made)


def test_a_start_in_flight_when_the_pool_closes_is_removed(settings, starter):
    starter.gate = threading.Event()
    pool = make_pool(settings, 1)
    assert starter.entered.wait(5)  # the start is under way
    closer = threading.Thread(target=pool.close)
    closer.start()
    time.sleep(0.1)
    assert closer.is_alive()  # close waits for the start in flight
    starter.gate.set()
    closer.join(timeout=10)
    assert not closer.is_alive()
    assert len(starter.made) == 1 and starter.made[0].removed == 1


def test_a_waiting_sandbox_that_died_is_replaced_not_handed_out(settings, starter):
    with make_pool(settings, 2) as pool:
        pool.wait_ready(timeout=5)
        dead = starter.made[0]
        dead.connected = False
        sandbox = pool.acquire()
        assert sandbox is not dead and sandbox.connected
        assert any(dead.name in note and "died" in note for note in pool.notes)
        assert wait_for(lambda: dead.removed == 1)
        assert wait_for(lambda: pool.ready == 2)


def test_a_failing_start_is_raised_by_wait_ready_then_retried(settings, starter, monkeypatch):
    monkeypatch.setattr(pool_module, "RETRY_MAX_S", 0.05)
    starter.failures = [SandboxError("no more room")]
    with make_pool(settings, 1) as pool:
        with pytest.raises(SandboxError, match="no more room"):
            pool.wait_ready(timeout=5)
        assert wait_for(lambda: pool.ready == 1)  # the retry after a back-off worked
        assert pool.wait_ready(timeout=5) is pool
        assert starter.failures == [] and len(starter.made) == 1


def test_an_unexpected_start_failure_becomes_one_clear_error(settings, starter):
    starter.failures = [RuntimeError("socket closed")]
    with make_pool(settings, 1) as pool:  # the 30 s back-off ends with close
        with pytest.raises(SandboxError) as caught:
            pool.wait_ready(timeout=5)
        assert caught.value.message == "starting a pooled sandbox failed: socket closed"


def test_a_failed_start_in_acquire_frees_its_slot(settings, starter):
    starter.failures = [SandboxError("image vanished")]
    with make_pool(settings, 0, pool_max_size=1) as pool:
        with pytest.raises(SandboxError, match="image vanished"):
            pool.acquire(timeout=1)
        assert pool.acquire(timeout=1).name == "fake-0"  # the cap of 1 was not used up


def test_a_sandbox_that_cannot_be_removed_leaves_a_note(settings, starter):
    with make_pool(settings, 0) as pool:
        sandbox = pool.acquire()
        sandbox.fail_remove = True
        pool.release(sandbox)
        assert wait_for(lambda: any("could not remove" in note for note in pool.notes))
        assert "inv clean" in next(n for n in pool.notes if "could not remove" in n)


def test_a_fork_of_a_fork_gets_one_suffix_not_one_per_generation():
    from stigmer_sandbox.config import Settings

    name = "stigmer-sandbox"
    for _ in range(20):
        name = snapshots.new_name(Settings(container_name=name))
    assert name.startswith("stigmer-sandbox-") and len(name) == len("stigmer-sandbox-") + 8


def test_a_sandbox_still_being_removed_counts_against_the_cap(settings, starter):
    gate = threading.Event()

    class SlowRemoval(FakeSandbox):
        def remove(self) -> bool:
            gate.wait(10)
            return super().remove()

    with make_pool(settings, 0, pool_max_size=2) as pool:
        first, _second = pool.acquire(timeout=5), pool.acquire(timeout=5)
        first.__class__ = SlowRemoval
        pool.release(first)
        with pytest.raises(SandboxNotReady, match="cap of 2"):
            pool.acquire(timeout=0.2)  # the released one still runs until it is removed
        gate.set()
        assert pool.acquire(timeout=5) is not None
        assert first.removed == 1


def test_remove_and_size_handle_a_tree_deeper_than_the_recursion_limit(tmp_path):
    folder = workspaces.create(tmp_path / "root", "box")
    deep = os.open(folder / "workspace", os.O_RDONLY)
    try:
        for _ in range(sys.getrecursionlimit() + 200):
            os.mkdir("a", dir_fd=deep)
            inner = os.open("a", os.O_RDONLY, dir_fd=deep)
            os.close(deep)
            deep = inner
    finally:
        os.close(deep)
    assert workspaces.size_bytes(folder) > 0
    workspaces.remove(folder)
    assert not folder.exists()


# -- cleanup's default tier: nothing a live process owns ---------------------------------


def fake_container(status: str, **marks: str) -> SimpleNamespace:
    found = labels.project_labels("sandbox", **marks)
    return SimpleNamespace(id=f"id-{status}", name=f"box-{status}", status=status, labels=found)


def test_default_clean_keeps_a_stopped_or_created_sandbox_whose_owner_lives():
    from stigmer_sandbox.host import cleanup

    here = os.uname().nodename
    alive = {"owner_pid": str(os.getpid()), "owner_host": here}
    gone_pid = {"owner_pid": "999999999", "owner_host": here}
    boxes = [
        fake_container("created", **alive),  # a pool's sandbox between create and start
        fake_container("exited", **alive),  # stopped by its owner, started again later
        fake_container("dead", **gone_pid),
        fake_container("exited"),  # nobody's: a stopped project container goes
    ]
    planned = {r.name: r.reason for r in cleanup._containers(boxes, everything=False)}
    assert planned == {"box-dead": "its owner (pid 999999999) is gone", "box-exited": "stopped"}
    everything = {r.name for r in cleanup._containers(boxes, everything=True)}
    assert everything == {"box-created", "box-exited", "box-dead"}


def test_a_fork_image_waits_for_its_forking_process():
    from stigmer_sandbox.host import cleanup

    def fork_image(pid: str) -> SimpleNamespace:
        return SimpleNamespace(
            labels={
                snapshots.FORKED_BY_PID: pid,
                snapshots.FORKED_BY_HOST: os.uname().nodename,
            }
        )

    assert cleanup._forker_lives(fork_image(str(os.getpid())))
    assert not cleanup._forker_lives(fork_image("999999999"))
    assert not cleanup._forker_lives(fork_image(""))  # made before the label: as before
    elsewhere = fork_image(str(os.getpid()))
    elsewhere.labels[snapshots.FORKED_BY_HOST] = "another-host"
    assert cleanup._forker_lives(elsewhere)  # cannot be checked there: it may live


def test_clean_all_removes_the_host_copies_of_the_helper(tmp_path):
    from stigmer_sandbox.host import cleanup

    settings = load_settings(ROOT).replace(state_dir=str(tmp_path / "state"))
    assert list(cleanup._helper_copies(settings)) == []
    copies = tmp_path / "state" / host_helper.HELPERS
    (copies / "0123456789ab").mkdir(parents=True)
    (copies / "0123456789ab" / host_helper.HELPER_NAME).write_bytes(b"\x7fELF")
    (planned,) = cleanup._helper_copies(settings)
    assert (planned.kind, planned.id) == ("folder", str(copies))
    assert cleanup.remove([planned]) == ([planned], [])
    assert not copies.exists()


class Freezer:
    """A container whose first `refusals` pauses fail as runc's cgroup v1 freezer does
    under load."""

    def __init__(self, refusals: int, why: str = "unable to freeze: unknown") -> None:
        self.refusals, self.why, self.pauses, self.unpauses = refusals, why, 0, 0

    def pause(self) -> None:
        self.pauses += 1
        if self.pauses <= self.refusals:
            raise docker.errors.APIError(
                "500 Server Error", explanation=f"Cannot pause container x: {self.why}"
            )

    def unpause(self) -> None:
        self.unpauses += 1


def test_a_freeze_refused_under_load_is_tried_again(monkeypatch):
    from stigmer_sandbox.runtime.backends import docker as backend

    monkeypatch.setattr(backend, "PAUSE_RETRY_S", 0.0)
    busy = Freezer(refusals=2)
    with backend.DOCKER.frozen(busy):
        assert (busy.pauses, busy.unpauses) == (3, 0)
    assert busy.unpauses == 1
    stuck = Freezer(refusals=backend.PAUSE_ATTEMPTS)
    with pytest.raises(SandboxError, match="unable to freeze"), backend.DOCKER.frozen(stuck):
        pass
    assert (stuck.pauses, stuck.unpauses) == (backend.PAUSE_ATTEMPTS, 0)
    other = Freezer(refusals=1, why="container is not running")
    with pytest.raises(SandboxError, match="not running"), backend.DOCKER.frozen(other):
        pass
    assert other.pauses == 1  # only a refused freeze is tried again


def test_clean_takes_an_orphaned_broker_and_the_values_it_held(tmp_path):
    from stigmer_sandbox.host import cleanup

    settings = load_settings(ROOT).replace(state_dir=str(tmp_path / "state"))
    values = tmp_path / "state" / "egress" / "box-gone" / "broker"
    values.mkdir(parents=True)
    (values / "secrets.json").write_text("{}")
    gone = {labels.OWNER: "box-gone"}
    made = [
        SimpleNamespace(
            id=f"id-{kind}",
            name=f"box-gone-{kind}",
            status="running",
            labels={**labels.project_labels(kind), **gone},
        )
        for kind in (labels.EGRESS_GATEWAY, labels.CREDENTIALS_BROKER)
    ]
    planned = list(cleanup._gateways(settings, made, staying=set(), everything=False))
    assert [(r.kind, r.name) for r in planned] == [
        ("container", "box-gone-egress-gateway"),
        ("container", "box-gone-credentials-broker"),
        ("folder", "box-gone-credentials-broker"),
    ]
    assert planned[-1].id == str(values)
    assert list(cleanup._gateways(settings, made, staying={"box-gone"}, everything=False)) == []
    # A label never names a folder: an owner with a path in it finds none.
    made[1].labels[labels.OWNER] = "../../elsewhere"
    assert [r.kind for r in cleanup._gateways(settings, made[1:], set(), False)] == ["container"]


MAKER = """
import sys
from pathlib import Path
from stigmer_sandbox.runtime import workspaces
workspaces.create(Path(sys.argv[1]), "stigmer-sandbox-killed", Path(sys.argv[2]))
"""


def test_a_folder_whose_maker_is_killed_midway_is_never_unmarked_and_clean_removes_it(tmp_path):
    """The attack: SIGKILL while a private folder is made (a pool's owner killed mid-fork
    once left a folder with an empty marker that `inv clean` could not call ours)."""
    from stigmer_sandbox.host import cleanup

    settings = load_settings(ROOT, environ={}).replace(state_dir=str(tmp_path / "state"))
    root = workspaces.sandboxes_root(settings)
    source = tmp_path / "big"
    for index in range(40):  # enough to copy that the kill can land midway
        (source / str(index)).mkdir(parents=True)
        for name in range(50):
            (source / str(index) / str(name)).write_bytes(b"x")
    maker = subprocess.Popen(
        [sys.executable, "-c", MAKER, str(root), str(source)], cwd=ROOT, start_new_session=True
    )
    assert wait_for(lambda: root.is_dir() and any(root.iterdir()), 20)
    os.killpg(maker.pid, signal.SIGKILL)  # the maker and its `cp`, as a killed job
    maker.wait()
    left = list(root.iterdir())
    assert [f.name for f in left if not f.name.startswith(workspaces.STAGING)] == []
    planned = list(cleanup._leftover_folders(settings, set(), everything=False))
    assert [Path(r.id) for r in planned] == left
    cleanup.remove(planned)
    assert list(root.iterdir()) == []


def test_a_folder_being_made_by_a_live_process_is_left_alone(tmp_path):
    from stigmer_sandbox.host import cleanup

    settings = load_settings(ROOT, environ={}).replace(state_dir=str(tmp_path / "state"))
    root = workspaces.sandboxes_root(settings)
    making = root / f"{workspaces.STAGING}stigmer-sandbox-live.{os.getpid()}"
    making.mkdir(parents=True)
    assert list(cleanup._leftover_folders(settings, set(), everything=False)) == []
    assert [r.id for r in cleanup._leftover_folders(settings, set(), everything=True)] == [
        str(making)
    ]
    made = workspaces.create(root, "stigmer-sandbox-made")
    assert workspaces.is_private(made, root)
    assert sorted(f.name for f in root.iterdir()) == [making.name, "stigmer-sandbox-made"]
    with pytest.raises(SandboxError, match="already exists"):
        workspaces.create(root, "stigmer-sandbox-made")
