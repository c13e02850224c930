"""`inv engine.install --gvisor` without Docker: the daemon.json merge (other keys and runtimes
kept, a conflicting entry refused, the file created, replaced atomically) and the verdicts of
`inv doctor`'s gvisor check from stand-in `docker info` answers."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from stigmer_sandbox import isolation
from stigmer_sandbox.errors import SandboxError
from stigmer_sandbox.host import daemon, gvisor

OURS = isolation.runtime_entries()
EARLIER = {
    "runsc": {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=host"]},
    "runsc-nonet": {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none"]},
}


def write(path: Path, config: object) -> None:
    path.write_text(json.dumps(config), encoding="utf-8")


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# --- the merge ---------------------------------------------------------------------------


def test_merge_keeps_every_other_key_and_runtime(tmp_path: Path):
    path = tmp_path / "daemon.json"
    before = {"experimental": True, "dns": ["10.0.0.2"], "runtimes": EARLIER}
    write(path, before)
    assert gvisor.register(path) is True
    after = read(path)
    assert after["runtimes"] == {**EARLIER, **OURS}
    assert {k: v for k, v in after.items() if k != "runtimes"} == {
        "experimental": True,
        "dns": ["10.0.0.2"],
    }


def test_a_second_register_changes_nothing(tmp_path: Path):
    path = tmp_path / "daemon.json"
    write(path, {"runtimes": EARLIER})
    assert gvisor.register(path) is True
    written = path.read_bytes()
    stamp = path.stat().st_mtime_ns
    assert gvisor.register(path) is False
    assert path.read_bytes() == written and path.stat().st_mtime_ns == stamp
    assert gvisor.registered_in(path)


def test_the_file_is_created_when_missing(tmp_path: Path):
    path = tmp_path / "etc" / "docker" / "daemon.json"
    assert not gvisor.registered_in(path)
    assert gvisor.register(path) is True
    assert read(path) == {"runtimes": OURS}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_an_empty_file_counts_as_no_settings(tmp_path: Path):
    path = tmp_path / "daemon.json"
    path.write_text("\n", encoding="utf-8")
    assert gvisor.register(path) is True
    assert read(path) == {"runtimes": OURS}


def test_a_conflicting_entry_is_refused_and_left_alone(tmp_path: Path):
    path = tmp_path / "daemon.json"
    theirs = {"path": "/usr/local/bin/runsc", "runtimeArgs": ["--platform=kvm"]}
    write(path, {"runtimes": {isolation.RUNTIME: theirs}})
    before = path.read_bytes()
    with pytest.raises(SandboxError) as caught:
        gvisor.register(path)
    message = caught.value.message
    assert str(path) in message and f"runtimes.{isolation.RUNTIME}" in message
    assert "\n" not in message
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("text", "wanted"),
    [("{not json", "not valid JSON"), ("[1, 2]", "not a JSON object")],
)
def test_an_unreadable_file_is_one_clear_error(tmp_path: Path, text: str, wanted: str):
    path = tmp_path / "daemon.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SandboxError, match=wanted):
        gvisor.register(path)
    assert path.read_text(encoding="utf-8") == text


def test_runtimes_that_is_not_an_object_is_refused(tmp_path: Path):
    path = tmp_path / "daemon.json"
    write(path, {"runtimes": ["runsc"]})
    with pytest.raises(SandboxError, match="runtimes is not a JSON object"):
        gvisor.register(path)


def test_a_runtime_argument_with_a_space_is_refused():
    # dockerd 20.10's runtime wrapper passes the arguments through an unquoted $@
    entry = {"path": isolation.RUNSC, "runtimeArgs": ["--debug-log=/tmp/a b"]}
    with pytest.raises(SandboxError, match="space"):
        gvisor.merged({}, isolation.RUNTIME, entry, Path("daemon.json"))


def test_the_write_is_atomic_and_keeps_the_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "daemon.json"
    write(path, {"runtimes": EARLIER})
    path.chmod(0o600)
    renames: list[tuple[str, str]] = []
    real_replace = Path.replace

    def spy(self: Path, target: Path) -> Path:
        renames.append((self.name, Path(target).name))
        assert read(self)["runtimes"][isolation.RUNTIME] == OURS[isolation.RUNTIME]  # whole first
        assert read(path) == {"runtimes": EARLIER}  # the old file untouched until then
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", spy)
    gvisor.register(path)
    assert len(renames) == 1 and renames[0][1] == "daemon.json"
    assert renames[0][0].startswith(".daemon.json.")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["daemon.json"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = tmp_path / "daemon.json"
    write(path, {"runtimes": EARLIER})
    before = path.read_bytes()

    def broken(self: Path, target: Path) -> Path:
        raise OSError("disk gone")

    monkeypatch.setattr(Path, "replace", broken)
    with pytest.raises(OSError):
        gvisor.register(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["daemon.json"]


def test_an_unwritable_folder_is_one_line_with_sudo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    def refused(**_options: object) -> tuple[int, str]:
        raise PermissionError(13, "Permission denied")  # what an ordinary user meets in /etc

    monkeypatch.setattr(gvisor.tempfile, "mkstemp", refused)
    with pytest.raises(SandboxError) as caught:
        gvisor.register(tmp_path / "daemon.json")
    assert "needs root" in caught.value.message and "sudo" in (caught.value.hint or "")


# --- reloading an engine --------------------------------------------------------------


def test_reload_finds_no_dockerd_in_a_stale_pid_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(daemon, "_service_manager_running", lambda: False)
    stale = tmp_path / "docker.pid"
    stale.write_text(str(os.getpid()), encoding="utf-8")  # alive, but not a dockerd
    state = daemon.EngineState(tmp_path / "state")
    with pytest.raises(SandboxError, match="cannot find the running dockerd"):
        daemon.reload(state, system_pid_file=stale)


# --- inv doctor's gvisor check ------------------------------------------------------------

LISTED = {"Runtimes": {"runc": {"path": "runc"}, **OURS}}
NOT_LISTED = {"Runtimes": {"runc": {"path": "runc"}, **EARLIER}}


def test_usable_when_the_engine_lists_the_runtime():
    result = gvisor.check_verdict(LISTED, runsc_present=True, in_config=True)
    assert result.status == "pass" and isolation.RUNSC in result.detail
    assert not result.required


@pytest.mark.parametrize(
    ("info", "present", "in_config", "wanted", "fix"),
    [
        (NOT_LISTED, False, False, "is not installed", isolation.INSTALL_HINT),
        ({}, False, False, "is not installed", isolation.INSTALL_HINT),
        (NOT_LISTED, True, False, "not registered", isolation.INSTALL_HINT),
        (NOT_LISTED, True, True, "has not reloaded it", "SIGHUP"),
    ],
)
def test_why_not_usable_is_a_warning_with_the_fix(
    info: dict, present: bool, in_config: bool, wanted: str, fix: str
):
    result = gvisor.check_verdict(info, runsc_present=present, in_config=in_config)
    assert result.status == "warn" and not result.failed
    assert wanted in result.detail and fix in (result.hint or "")


def test_the_doctor_check_reads_this_hosts_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(gvisor, "runsc_installed", lambda runsc=isolation.RUNSC: True)
    path = tmp_path / "daemon.json"
    assert "not registered" in gvisor.check(NOT_LISTED, path).detail
    gvisor.register(path)
    assert "has not reloaded it" in gvisor.check(NOT_LISTED, path).detail


def test_checkpoints_turn_on_experimental_mode_and_keep_the_rest(tmp_path: Path):
    path = tmp_path / "daemon.json"
    write(path, {"dns": ["10.0.0.2"], "runtimes": EARLIER})
    assert gvisor.register(path, checkpoints=True) is True
    after = read(path)
    assert after["experimental"] is True and after["dns"] == ["10.0.0.2"]
    assert after["runtimes"] == {**EARLIER, **OURS}
    assert gvisor.register(path, checkpoints=True) is False  # nothing left to change
    assert OURS[isolation.OFFLINE_RUNTIME]["runtimeArgs"] == ["--network=none"]
