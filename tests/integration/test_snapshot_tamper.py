"""Issue 20 on a real engine: a fork or snapshot carries no privilege (SECURITY property 36).

Each attack changes a sandbox's root filesystem as root from outside (`docker exec -u 0`
through the SDK, or the archive endpoint `docker cp` uses), then forks and snapshots it:
a forged helper, a replaced python3 or stdlib module, /etc/ld.so.preload, a root-run
script, a trusted folder made writable, the user database. Each is refused in one line
naming the path, with nothing left behind. A setuid-root bash elsewhere passes, and
gives no root in the sandboxes born from it (no-new-privileges). A snapshot committed by
hand is refused. The helper every sandbox runs is the host's copy, mounted read-only:
root cannot replace it, and a forged helper in an image never runs. Normal work still
forks and snapshots.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from stigmer_sandbox import engine, labels, policy
from stigmer_sandbox.errors import SandboxError
from stigmer_sandbox.runtime import (
    Sandbox,
    SandboxPool,
    host_helper,
    root_guard,
    snapshots,
    workspaces,
)
from stigmer_sandbox.runtime.backends import docker as backend_module
from stigmer_sandbox.runtime.backends.base import ADDED
from stigmer_sandbox.runtime.backends.docker import DOCKER, DockerBackend

from .conftest import TEST_LABELS, run_in
from .test_pool import private_settings
from .test_snapshots import tiny_wheel

FORGED_HELPER = "#!/bin/sh\necho forged\nexit 0\n"
# (id, what root does, the path the refusal names)
TAMPERS = [
    (
        "helper",
        f"printf '{FORGED_HELPER}' > {policy.EXEC_HELPER} 2>/dev/null "
        f"|| printf '{FORGED_HELPER}' > {policy.EXEC_HELPER}.forged",
        f"{policy.EXEC_HELPER}(.forged)? (changed|added)",
    ),
    ("python3", "ln -sfn /usr/bin/true /usr/bin/python3", "/usr/bin/python3 changed"),
    (
        "stdlib",
        "echo 'raise SystemExit(0)' >> /usr/lib/python3.11/json/__init__.py",
        "/usr/lib/python3.11/json/__init__.py changed",
    ),
    ("preload", "echo /tmp/evil.so > /etc/ld.so.preload", "/etc/ld.so.preload added"),
    ("folder", "chmod 777 /usr/sbin", "/usr/sbin changed"),
    ("passwd", "echo 'evil:x:0:0::/:/bin/sh' >> /etc/passwd", "/etc/passwd changed"),
]


class HostHelperBackend(DockerBackend):
    """The Docker backend with the host's helper mounted, as `Sandbox.up` mounts it once
    wired (added only when the spec lacks it)."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    def create(self, spec: dict[str, Any]) -> Any:
        if spec["labels"].get(labels.KIND) != "sandbox":  # e.g. its egress gateway
            return super().create(spec)
        if not any(m.get("Target") == policy.EXEC_HELPER for m in spec["mounts"]):
            mount = host_helper.mount(self.settings, spec["image"])
            spec = {**spec, "mounts": [*spec["mounts"], mount]}
        return super().create(spec)


@pytest.fixture(scope="module")
def settings(tmp_path_factory, project_settings):
    return private_settings(project_settings, tmp_path_factory.mktemp("tamper"))


@pytest.fixture(params=["layers", "engine-diff"])
def changes_from(request, monkeypatch):
    """Both ways the backend lists changes: the overlay layers read on this machine (root,
    local engine, as here), and the engine's diff (any other user or engine)."""
    if request.param == "engine-diff":
        monkeypatch.setattr(backend_module, "_overlay_layers", lambda _handle: None)
    return request.param


@contextmanager
def sandbox(settings, **options: Any) -> Iterator[Sandbox]:
    """A new sandbox with its own workspace folder, removed at the end."""
    own = settings.replace(workspace=str(settings.path("state_dir").parent / uuid.uuid4().hex))
    box = Sandbox.create_ephemeral(own, extra_labels=TEST_LABELS, **options).up()
    try:
        yield box
    finally:
        box.remove()


def as_root(box: Sandbox, command: str) -> str:
    """Run `command` as root in the sandbox from outside, as `docker exec -u 0` does."""
    code, output = box._existing().exec_run(["/bin/sh", "-c", command], user="0:0")
    assert code == 0, output
    return output.decode(errors="replace")


def ok(box: Sandbox, command: str) -> str:
    result = box.exec(command, timeout=60)
    assert result.exit_code == 0, (command, result)
    return result.stdout


def made_from(client, box: Sandbox) -> list:
    return client.images.list(filters={"label": [f"{labels.PREFIX}.source={box.name}"]})


def private_folders(settings) -> set:
    root = workspaces.sandboxes_root(settings)
    return set(root.iterdir()) if root.is_dir() else set()


@pytest.mark.parametrize(
    ("tamper", "named"), [(t[1], t[2]) for t in TAMPERS], ids=[t[0] for t in TAMPERS]
)
def test_a_tampered_root_filesystem_is_neither_forked_nor_snapshotted(
    settings, docker_engine, tamper, named, changes_from
):
    with sandbox(settings) as box:
        as_root(box, tamper)
        before = private_folders(settings)
        with pytest.raises(SandboxError, match=named) as caught:
            box.fork()
        assert "\n" not in caught.value.message and box.name in caught.value.message
        name = f"t-tamper-{uuid.uuid4().hex[:8]}"
        with pytest.raises(SandboxError, match=named):
            box.snapshot(name)
        assert private_folders(settings) == before
        assert not (workspaces.snapshots_root(settings) / name).exists()
        assert not engine.image_id(snapshots.snapshot_image(name))
        assert made_from(docker_engine, box) == []
        assert box.inspect()["State"]["Paused"] is False


def test_a_change_copied_in_with_docker_cp_is_refused(settings, docker_engine, changes_from):
    with sandbox(settings) as box:
        script = b"#!/bin/bash\nexit 0\n"
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            entry = tarfile.TarInfo(policy.HEALTHCHECK_COMMAND.rpartition("/")[2])
            entry.size, entry.mode = len(script), 0o755
            tar.addfile(entry, io.BytesIO(script))
        assert box._existing().put_archive("/usr/local/bin", archive.getvalue())
        with pytest.raises(SandboxError, match=f"{policy.HEALTHCHECK_COMMAND} changed"):
            box.fork()
        assert made_from(docker_engine, box) == []


def test_the_layers_and_the_engines_diff_agree(settings, monkeypatch):
    """The fast way lists what the engine's diff lists, but for a folder replaced whole
    (opaque): the engine lists what it hid as deleted, the layers the folder as added."""
    with sandbox(settings) as box:
        for _name, tamper, _named in TAMPERS:
            as_root(box, tamper)
        as_root(
            box,
            "rm /usr/bin/xargs && mkdir /usr/lib/new && touch /usr/lib/new/f && "
            "rm -rf /usr/lib/python3.11/json && mkdir /usr/lib/python3.11/json && "
            "touch /usr/lib/python3.11/json/__init__.py && mkdir /opt/elsewhere",
        )
        container = box._existing()
        with box.paused():
            assert backend_module._overlay_layers(container) is not None, "not root here?"
            fast = set(DOCKER.changes(container, root_guard.is_relevant))
            monkeypatch.setattr(backend_module, "_overlay_layers", lambda _handle: None)
            slow = set(DOCKER.changes(container, root_guard.is_relevant))
    replaced = {path for path, kind in fast - slow if kind == ADDED}
    assert replaced == {"/usr/lib/python3.11/json"}
    assert {path for path, _ in fast} <= {path for path, _ in slow}
    for path, _kind in slow - fast:
        assert any(path == top or path.startswith(top + "/") for top in replaced), path
    assert ("/usr/bin/xargs", backend_module.DELETED) in fast
    assert ("/usr/lib/new", ADDED) in fast and ("/usr/lib/new/f", ADDED) in fast
    assert not [path for path, _ in fast if path.startswith(("/opt", "/run", "/home"))]


SETUID_PROOF = (
    "stat -c %a /opt/rootbash; /opt/rootbash -p -c 'id -u; id -g; "
    "grep NoNewPrivs /proc/self/status; cat /etc/shadow 2>/dev/null || echo denied'"
)
NO_ROOT = "4755\n1000\n1000\nNoNewPrivs:\t1\ndenied\n"


def test_a_setuid_root_bash_passes_and_gives_no_root_in_a_fork_or_snapshot(settings):
    with sandbox(settings) as box:
        as_root(box, "cp /bin/bash /opt/rootbash && chmod 4755 /opt/rootbash")
        assert ok(box, SETUID_PROOF) == NO_ROOT
        forked = box.fork()
        try:
            assert ok(forked, SETUID_PROOF) == NO_ROOT
            assert ok(forked, "id -u") == "1000\n"
        finally:
            forked.remove()
        name = f"t-setuid-{uuid.uuid4().hex[:8]}"
        box.snapshot(name)
        try:
            with Sandbox.from_snapshot(name, box.settings) as born:
                assert ok(born, SETUID_PROOF) == NO_ROOT
        finally:
            snapshots.delete(box.settings, name)


def test_normal_work_still_forks_and_snapshots_and_the_check_is_cheap(settings, docker_engine):
    with sandbox(settings) as box:
        wheel_name, wheel = tiny_wheel("stigmer_tamper_probe", "1.0", "VALUE = 'kept'\n")
        box.put_file(wheel_name, wheel)
        ok(box, f"pip install --no-index --no-deps /workspace/{wheel_name}")
        ok(box, "mkdir -p ~/.local/bin ~/.config && echo home > ~/.config/f && echo ws > w")
        ok(box, "npm config set fund false && mkdir -p /var/tmp/build && echo t > /var/tmp/build/t")
        started = time.monotonic()
        forked = box.fork()
        took = time.monotonic() - started
        try:
            probe = "python -I -c 'import stigmer_tamper_probe as p; print(p.VALUE)'"
            assert ok(forked, probe) == "kept\n"
            assert ok(forked, "cat ~/.config/f /workspace/w") == "home\nws\n"
            image = engine.image(forked.owned_image)
            assert snapshots.checked(image)
            assert image.labels[host_helper.PROJECT_IMAGE_LABEL] == box._existing().attrs["Image"]
        finally:
            forked.remove()
        print(f"fork with the root-side check: {took * 1000:.0f} ms")
        name = f"t-normal-{uuid.uuid4().hex[:8]}"
        box.snapshot(name)
        try:
            with Sandbox.from_snapshot(name, box.settings) as born:
                assert ok(born, "cat ~/.config/f /workspace/w") == "home\nws\n"
        finally:
            snapshots.delete(box.settings, name)


def test_a_snapshot_committed_by_hand_is_refused(settings, docker_engine):
    """A sandbox born of a snapshot inherits its labels; committed by hand over the
    snapshot's tag, the image still looks like a snapshot, but was never checked."""
    name = f"t-hand-{uuid.uuid4().hex[:8]}"
    with sandbox(settings) as box:
        box.snapshot(name)
    try:
        born = Sandbox.from_snapshot(name, settings)
        try:
            as_root(born, "ln -sfn /usr/bin/true /usr/bin/python3")
            hand = born._existing().commit(snapshots.SNAPSHOT_REPOSITORY, name)
        finally:
            born.remove()
        with pytest.raises(SandboxError, match=f"snapshot {name} was not made by") as caught:
            Sandbox.from_snapshot(name, settings)
        assert "\n" not in caught.value.message
        with pytest.raises(SandboxError, match="was not made by"):
            SandboxPool(size=1, settings=settings, snapshot=name, extra_labels=TEST_LABELS)
        assert not snapshots.checked(hand)
    finally:
        snapshots.delete(settings, name)


# -- the helper comes from the host ----------------------------------------------------------


def test_the_host_copy_is_the_project_images_helper(settings, basic_image):
    copy = host_helper.copy_for(settings, basic_image.id)
    with sandbox(settings) as box:
        inside = as_root(box, f"sha256sum {policy.EXEC_HELPER}").split()[0]
    digest = copy.with_name(copy.name + ".sha256").read_text()
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == digest == inside


def test_root_cannot_replace_the_mounted_helper_and_forks_keep_it(settings):
    with sandbox(settings, backend=HostHelperBackend(settings)) as box:
        mounts = {m["target"]: m for m in box.status()["mounts"]}
        assert mounts[policy.EXEC_HELPER]["rw"] is False
        code, output = box._existing().exec_run(
            ["/bin/sh", "-c", f"printf forged > {policy.EXEC_HELPER}"], user="0:0"
        )
        assert code != 0 and b"Read-only file system" in output
        assert ok(box, "id -u") == "1000\n"
        forked = box.fork()
        try:
            assert policy.EXEC_HELPER in {m["target"] for m in forked.status()["mounts"]}
            assert ok(forked, "echo from-the-fork") == "from-the-fork\n"
        finally:
            forked.remove()


def test_a_forged_helper_in_an_image_never_runs(settings, docker_engine, basic_image):
    """An image whose helper forges results, labelled as a checked fork of the project
    image (only a Docker user could make it): its helper forges when run, but a sandbox
    started from it with the host's helper reports the truth."""
    # Forged outside any sandbox: in a sandbox the host's helper is mounted read-only.
    forger = docker_engine.containers.run(
        basic_image.id,
        ["/bin/sh", "-c", f"printf '{FORGED_HELPER}' > {policy.EXEC_HELPER}"],
        user="0:0",
        labels=TEST_LABELS,
        detach=True,
    )
    try:
        assert forger.wait(timeout=60)["StatusCode"] == 0
        marks = {
            labels.KIND: "fork",
            snapshots.CHECKED_LABEL: basic_image.id,
            host_helper.PROJECT_IMAGE_LABEL: basic_image.id,
        }
        tag = f"forged-{uuid.uuid4().hex[:8]}"
        changes = [f'LABEL {key}="{value}"' for key, value in marks.items()]
        forged = forger.commit(snapshots.FORK_REPOSITORY, tag, changes=changes)
    finally:
        forger.remove(force=True)
    try:
        attack = run_in(docker_engine, forged.id, [policy.EXEC_HELPER, "--", "false"])
        assert attack == "forged\n"  # the image's own helper would lie
        name = snapshots.new_name(settings)
        folder = workspaces.create(workspaces.sandboxes_root(settings), name)
        born = Sandbox.private(
            settings, name, forged.id, folder, prepared_image=True,
            extra_labels=TEST_LABELS, backend=HostHelperBackend(settings),
        )  # fmt: skip
        try:
            result = born.up().exec("echo real; exit 3", timeout=30)
            assert (result.exit_code, result.stdout) == (3, "real\n")
        finally:
            born.remove()
    finally:
        docker_engine.images.remove(forged.id, force=True)


def test_every_sandbox_runs_the_host_helper(settings):
    with sandbox(settings) as box:
        mounts = {m["target"]: m for m in box.status()["mounts"]}
        assert mounts[policy.EXEC_HELPER]["rw"] is False
