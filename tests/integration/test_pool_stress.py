"""Issue 20 on a real engine: the pool under stress, and its owner killed mid-way.

A child Python process runs a pool (size 4, cap 32) and 32 threads that each acquire a
sandbox, run a command in it, fork some, and release it, twice. Every hand-over is
printed with the container's id: none is ever handed out twice. Run to the end, closing
the pool leaves nothing. Killed with SIGKILL while acquires, starts, forks and releases
are in flight, everything it left (containers, private folders, fork images) is in
`inv clean --dry-run`'s plan, the plan holds nothing a live process owns, and `inv
clean` removes all of it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stigmer_sandbox import labels
from stigmer_sandbox.runtime import snapshots, workspaces

from ..conftest import ROOT, run_inv
from .conftest import TEST_LABELS
from .test_pool import read_line

THREADS = 32
ROUNDS = 2
# Hand-overs seen before the SIGKILL, of THREADS * ROUNDS: while the first starts in the
# callers' threads are in flight, and in the second round amid releases and forks.
# The default run (CI) kills in the second round, amid releases and forks; `inv test --all`
# also kills in the first and runs the whole workload to its end.
KILL_AFTER = (pytest.param(6, marks=pytest.mark.stress), 40)
STARTED_S = 180.0

CHILD = """
import json, sys, threading
from pathlib import Path
from stigmer_sandbox.runtime import SandboxPool
from tests.integration.test_runtime import settings_in

tmp, extra = Path(sys.argv[1]), json.loads(sys.argv[2])
threads, rounds = int(sys.argv[3]), int(sys.argv[4])
pool = SandboxPool(size=4, settings=settings_in(tmp, pool_max_size=32), extra_labels=extra)
lock = threading.Lock()

def say(**fields):
    with lock:
        print(json.dumps(fields), flush=True)

def work(index):
    for turn in range(rounds):
        box = pool.acquire(timeout=300)
        say(event="acquired", id=box._container.id, name=box.name)
        result = box.exec("echo $HOSTNAME", timeout=120)
        say(event="ran", name=box.name, ok=result.exit_code == 0, out=result.stdout)
        if index % 8 == 0 and turn == 0:
            fork = box.fork()
            say(event="forked", name=fork.name)
            fork.remove()
        pool.release(box)

workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
say(event="pool", id=pool.id)
for worker in workers:
    worker.start()
for worker in workers:
    worker.join()
pool.close()
say(event="closed", notes=pool.notes)
"""


def start_child(tmp: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp), json.dumps(TEST_LABELS), str(THREADS), str(ROUNDS)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_events(child: subprocess.Popen[str], stop_after: int | None) -> list[dict]:
    """The child's events until it closed its pool, or until `stop_after` hand-overs."""
    events: list[dict] = []
    deadline = time.monotonic() + STARTED_S
    while time.monotonic() < deadline:
        line = read_line(child.stdout, deadline - time.monotonic())
        if not line:
            break
        events.append(json.loads(line))
        handed = sum(1 for e in events if e["event"] == "acquired")
        if events[-1]["event"] == "closed" or (stop_after and handed >= stop_after):
            return events
    child.kill()
    pytest.fail(f"the pool's process stalled after {len(events)} events: {child.stderr.read()}")


def assert_never_handed_twice(events: list[dict]) -> None:
    handed = [e for e in events if e["event"] == "acquired"]
    assert len({e["id"] for e in handed}) == len(handed), "a container was handed out twice"
    assert len({e["name"] for e in handed}) == len(handed)
    ran = [e for e in events if e["event"] == "ran"]
    assert all(e["ok"] and e["out"].strip() for e in ran), [e for e in ran if not e["ok"]]


def owned_by(client, pid: int) -> tuple[list, list]:
    """Containers whose owner is `pid`, and fork images it made."""
    containers = client.containers.list(
        all=True, filters={"label": [f"{labels.OWNER_PID}={pid}"]}, ignore_removed=True
    )
    images = client.images.list(filters={"label": [f"{snapshots.FORKED_BY_PID}={pid}"]})
    return containers, images


def folders(state: Path) -> list[Path]:
    root = state / workspaces.SANDBOXES
    return sorted(root.iterdir()) if root.is_dir() else []


def stop(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    child.stdout.close()
    child.stderr.close()


@pytest.mark.stress
def test_thirty_two_threads_never_share_a_sandbox_and_close_leaves_nothing(tmp_path, docker_engine):
    child = start_child(tmp_path)
    try:
        events = read_events(child, stop_after=None)
        code, errors = child.wait(timeout=120), child.stderr.read()
        assert code == 0 and "Traceback" not in errors, errors[-3000:]
    finally:
        stop(child)
    assert_never_handed_twice(events)
    assert sum(1 for e in events if e["event"] == "acquired") == THREADS * ROUNDS
    assert not [n for n in events[-1]["notes"] if "could not remove" in n], events[-1]
    containers, images = owned_by(docker_engine, child.pid)
    assert containers == [] and images == []
    assert folders(tmp_path / "state") == []


@pytest.mark.parametrize("kill_after", KILL_AFTER)
def test_a_pool_killed_mid_stress_leaves_only_what_inv_clean_removes(
    tmp_path, docker_engine, kill_after
):
    child = start_child(tmp_path)
    try:
        events = read_events(child, stop_after=kill_after)
    finally:
        stop(child)  # SIGKILL: acquires, starts, forks and releases are in flight
    assert_never_handed_twice(events)
    time.sleep(3)  # requests the dead process sent may still be finishing in the engine
    state = tmp_path / "state"
    env = {"INVOKE_STIGMER_STATE_DIR": str(state)}
    done = run_inv("clean", "--dry-run", "--json", env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    planned = {r["id"]: r for r in json.loads(done.stdout)["would_remove"]}
    containers, images = owned_by(docker_engine, child.pid)
    left = [c.id for c in containers] + [i.id for i in images] + [str(f) for f in folders(state)]
    assert containers or folders(state), "the kill came too late: nothing was in flight"
    assert [item for item in left if item not in planned] == []
    assert_only_orphans_and_ownerless(docker_engine, planned.values(), state)
    removed = run_inv("clean", env=env, timeout=300)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    containers, images = owned_by(docker_engine, child.pid)
    assert containers == [] and images == [] and folders(state) == []


def assert_only_orphans_and_ownerless(client, planned, state: Path) -> None:
    """The default tier touches nothing a live process owns: containers and fork images of
    a live owner, or folders outside this test's state folder."""
    for resource in planned:
        if resource["kind"] == "folder":
            assert Path(resource["id"]).is_relative_to(state), resource
            continue
        if resource["kind"] == "container":
            found = client.containers.list(all=True, filters={"id": resource["id"]})
        elif resource["kind"] == "network":  # a sandbox's egress network
            found = client.networks.list(filters={"id": resource["id"]})
        else:
            found = [client.images.get(resource["id"])]
        for item in found:
            marks = (
                item.attrs.get("Labels") if resource["kind"] == "network" else item.labels
            ) or {}
            pid = marks.get(labels.OWNER_PID) or marks.get(snapshots.FORKED_BY_PID) or ""
            if resource["kind"] in ("container", "network") or marks.get(labels.KIND) == "fork":
                host = marks.get(labels.OWNER_HOST) or marks.get(snapshots.FORKED_BY_HOST)
                alive = pid.isdigit() and not labels.owner_gone(int(pid), host)
                assert not alive, (resource, "owned by a live process")
