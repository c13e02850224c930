"""Issue 20 without an engine: which root filesystem changes a fork or snapshot refuses
(`root_guard`), and the host copy of the helper (`host_helper`) kept by sha256."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest

from stigmer_sandbox import labels
from stigmer_sandbox.errors import SandboxError
from stigmer_sandbox.runtime import host_helper, root_guard
from stigmer_sandbox.runtime.backends.base import ADDED, DELETED, MODIFIED

FOLDER_755 = root_guard.GO_DIR | 0o755
FOLDER_777 = root_guard.GO_DIR | 0o777
# What every sandbox's diff holds before any command ran (measured on Engine 20.10).
ENGINE_BASELINE = [
    ("/run", MODIFIED),
    ("/run/stigmer", ADDED),
    ("/usr", MODIFIED),
    ("/usr/sbin", MODIFIED),
    ("/usr/sbin/docker-init", ADDED),
]
NORMAL_WORK = [
    ("/home", MODIFIED),
    ("/home/sandbox", MODIFIED),
    ("/home/sandbox/.local/lib/python3.11/site-packages/pkg/__init__.py", ADDED),
    ("/opt/venv/lib/python3.11/site-packages/rich", ADDED),
    ("/opt/node/lib/node_modules/cowsay", ADDED),
    ("/var/tmp/build", ADDED),
    ("/opt/rootbash", ADDED),  # a setuid copy of bash: useless under no-new-privileges
]


FOLDERS = {"/usr", "/usr/sbin", "/usr/bin", "/usr/lib", "/etc", "/run", "/home"}
LINK_777 = root_guard.GO_SYMLINK | 0o777  # /lib -> usr/lib, as the engine reports it


def folders_755(path: str) -> int:
    """Folders are 0755, /lib a link; anything else a regular file (the archive
    endpoint's modes)."""
    if path == "/lib":
        return LINK_777
    return FOLDER_755 if path in FOLDERS else 0o755


def test_the_engines_own_changes_and_normal_work_pass():
    assert root_guard.first_violation(ENGINE_BASELINE + NORMAL_WORK, folders_755) is None


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (("/usr/local/libexec/stigmer-sandbox/stigmer-exec", MODIFIED), "stigmer-exec changed"),
        (("/usr/local/libexec/stigmer-sandbox/forged", ADDED), "forged added"),
        (("/usr/bin/python3", MODIFIED), "/usr/bin/python3 changed"),
        (("/usr/bin/python3.11._pth", ADDED), "python3.11._pth added"),
        (("/usr/pyvenv.cfg", ADDED), "/usr/pyvenv.cfg added"),
        (("/usr/lib/python3.11/json/__init__.py", MODIFIED), "json/__init__.py changed"),
        (("/etc/ld.so.preload", ADDED), "/etc/ld.so.preload added"),
        (("/usr/lib/x86_64-linux-gnu/libc.so.6", MODIFIED), "libc.so.6 changed"),
        (("/etc/passwd", MODIFIED), "/etc/passwd changed"),
        (("/usr/local/bin/sandbox-healthcheck", DELETED), "sandbox-healthcheck deleted"),
        (("/lib", MODIFIED), "/lib changed"),  # the merged-/usr symlink, pointed elsewhere
        (("/usr/local/libexec", DELETED), "/usr/local/libexec deleted"),  # on the way
        (("/etc", ADDED), "/etc added"),
    ],
)
def test_a_change_to_what_runs_as_root_is_named(change, named):
    found = root_guard.first_violation([*ENGINE_BASELINE, change], folders_755)
    assert found is not None and found.endswith(named)


def test_a_folder_made_writable_or_swapped_for_a_link_is_refused():
    modes = {"/usr/sbin": FOLDER_777, "/usr": FOLDER_755}
    found = root_guard.first_violation(ENGINE_BASELINE, modes.get)
    assert found == "/usr/sbin changed"
    link = root_guard.GO_DIR | root_guard.GO_SYMLINK | 0o755
    assert root_guard.first_violation([("/usr/lib", MODIFIED)], lambda _p: link)
    assert root_guard.first_violation([("/etc", MODIFIED)], lambda _p: None)  # vanished
    asked: list[str] = []
    root_guard.first_violation(NORMAL_WORK, lambda path: asked.append(path) or FOLDER_777)
    assert asked == []  # folders outside the trusted set are never asked about


def test_names_that_only_look_alike_are_not_trusted():
    for path in ("/usr/binary", "/usr/lib-extra/x", "/etc/passwd-backup-dir/x", "/libexec"):
        assert not root_guard.is_trusted(path), path
    assert root_guard.leads_to_trusted("/usr/local") and root_guard.leads_to_trusted("/")
    assert not root_guard.leads_to_trusted("/usr/local/share")


def test_check_raises_one_line_naming_the_sandbox_and_path():
    with pytest.raises(SandboxError) as caught:
        root_guard.check("box-1", [("/etc/ld.so.preload", ADDED)], folders_755)
    assert "box-1" in caught.value.message and "/etc/ld.so.preload added" in caught.value.message
    assert "\n" not in caught.value.message
    root_guard.check("box-1", ENGINE_BASELINE, folders_755)


# -- the host copy of the helper -----------------------------------------------------------


class ReadCounter:
    """A backend whose image holds `data` at the helper's path; counts the reads."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads: list[str] = []

    def read_image_file(self, image: str, path: str, limit: int) -> bytes:
        self.reads.append(image)
        return self.data


def image(image_id: str, **marks: str) -> SimpleNamespace:
    return SimpleNamespace(id=image_id, labels=marks)


def test_a_fork_or_snapshot_image_takes_its_project_images_helper():
    project = "sha256:" + "a" * 64
    assert host_helper.project_image(image(project, **{labels.KIND: "basic"})) == project
    fork = image("sha256:" + "b" * 64, **{labels.KIND: "fork"})
    fork.labels[host_helper.PROJECT_IMAGE_LABEL] = project
    assert host_helper.project_image(fork) == project


def test_the_copy_is_read_once_and_again_when_its_bytes_change(tmp_path, monkeypatch):
    project = "sha256:" + "c" * 64
    found = {project: image(project, **{labels.KIND: "basic"})}
    monkeypatch.setattr(host_helper.engine, "image", lambda ref: found[ref])
    monkeypatch.setattr(host_helper.engine, "find_image", found.get)
    settings = SimpleNamespace(path=lambda key: tmp_path / key)
    backend = ReadCounter(b"\x7fELF the real helper")
    copy = host_helper.copy_for(settings, project, backend)
    assert copy.read_bytes() == backend.data and copy.stat().st_mode & 0o777 == 0o755
    assert copy.parent == tmp_path / "state_dir" / host_helper.HELPERS / ("c" * 12)
    digest = copy.with_name(copy.name + ".sha256").read_text()
    assert digest == hashlib.sha256(backend.data).hexdigest()
    assert host_helper.copy_for(settings, project, backend) == copy
    assert backend.reads == [project]  # intact: not read again
    copy.write_bytes(b"#!/bin/sh\necho forged\n")
    assert host_helper.copy_for(settings, project, backend).read_bytes() == backend.data
    assert backend.reads == [project, project]
    copy.unlink()
    copy.symlink_to("/bin/sh")
    assert host_helper.copy_for(settings, project, backend).read_bytes() == backend.data
    assert not copy.is_symlink()
    assert [p.name for p in copy.parent.iterdir() if p.name.startswith(".")] == []
