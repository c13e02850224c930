"""Command construction and container configuration, without an engine."""

from pathlib import Path

import pytest

from stigmer_sandbox import config
from stigmer_sandbox.errors import ConfigError, UsageError
from stigmer_sandbox.runtime import sandbox as runtime


def test_strings_run_through_bash_inside_lists_pass_as_is():
    assert runtime.command_argv("echo $(id); rm -rf /") == ["bash", "-c", "echo $(id); rm -rf /"]
    assert runtime.command_argv(["ls", "-la"]) == ["ls", "-la"]


@pytest.mark.parametrize("bad", ["", "   ", [], [""], "a\0b"])
def test_bad_commands_are_refused(bad):
    with pytest.raises(UsageError):
        runtime.command_argv(bad)


def test_env_values_may_hold_newlines_and_equals_but_names_may_not():
    assert runtime.check_env({"A": "x=y\nz"}) == {"A": "x=y\nz"}
    for bad in ({"A=B": "1"}, {"": "1"}, {"A": "nul\0"}):
        with pytest.raises(UsageError):
            runtime.check_env(bad)


def settings(tmp_path: Path, **changes) -> config.Settings:
    return config.Settings(project_dir=str(tmp_path)).replace(**changes)


def test_container_spec_is_hardened_by_default(tmp_path):
    spec = runtime.container_spec(settings(tmp_path), "img:1", {})
    assert spec["cap_drop"] == ["ALL"]
    assert spec["security_opt"] == ["no-new-privileges:true"]
    assert spec["privileged"] is False
    assert spec["pids_limit"] == 512
    assert spec["mem_limit"] == spec["memswap_limit"] == 2 * 1024**3
    assert spec["nano_cpus"] == 2_000_000_000
    assert spec["tmpfs"] == {"/tmp": "rw,nosuid,nodev,size=512m"}
    assert spec["network_mode"] == "bridge"
    assert all(m["BindOptions"]["Propagation"] == "rprivate" for m in spec["mounts"])
    assert [m["Target"] for m in spec["mounts"]] == ["/workspace", "/logs"]


def test_lifetime_wraps_the_keepalive(tmp_path):
    spec = runtime.container_spec(settings(tmp_path, max_lifetime_hours=1.5), "img:1", {})
    assert spec["command"] == ["timeout", "-s", "TERM", "5400", "sandbox-keepalive"]
    spec = runtime.container_spec(settings(tmp_path, max_lifetime_hours=0.0), "img:1", {})
    assert spec["command"] == ["sandbox-keepalive"]


@pytest.mark.parametrize("folder", ["/", "/etc", "/var/run", "/run", "/var"])
def test_sensitive_mount_sources_are_refused(folder):
    with pytest.raises(ConfigError):
        runtime.check_mount_source(Path(folder), "workspace")


def test_docker_socket_itself_is_refused():
    with pytest.raises(ConfigError, match="Docker socket"):
        runtime.check_mount_source(Path("/var/run/docker.sock"), "workspace")


def test_spec_hash_changes_with_image_and_limits(tmp_path):
    spec = runtime.container_spec(settings(tmp_path), "img:1", {})
    other = runtime.container_spec(settings(tmp_path, memory="1g"), "img:1", {})
    assert runtime.spec_hash(spec, "sha256:a") == runtime.spec_hash(spec, "sha256:a")
    assert runtime.spec_hash(spec, "sha256:a") != runtime.spec_hash(spec, "sha256:b")
    assert runtime.spec_hash(spec, "sha256:a") != runtime.spec_hash(other, "sha256:a")


def test_missing_credentials_folder_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="mount_aws is on but"):
        runtime.credential_mounts(settings(tmp_path, mount_aws=True))
    (tmp_path / ".aws").mkdir()
    mounts = runtime.credential_mounts(settings(tmp_path, mount_aws=True))
    assert mounts[0]["ReadOnly"] is True and mounts[0]["Target"] == "/home/sandbox/.aws"


def test_result_cause_and_json():
    result = runtime.ExecResult(
        exit_code=137, stdout="", stderr="", duration_s=1.0, oom_killed=True, signal=9
    )
    assert result.cause == "oom" and not result.ok
    assert result.to_dict()["cause"] == "oom"


def test_orphans_are_found_by_owner_and_lifetime():
    import os

    from stigmer_sandbox import labels
    from stigmer_sandbox.host import cleanup

    def reason(stopped: bool, **extra: str) -> str | None:
        found = {getattr(labels, key.upper()): value for key, value in extra.items()}
        return cleanup.orphan_reason(found, stopped, now=200, hostname="h")

    expired, alive, dead = "100", str(os.getpid()), "999999999"
    # In use: running with its owner alive, whatever its age.
    assert reason(False, expires=expired, owner_pid=alive, owner_host="h") is None
    # Owner gone: an orphan, running or not, expired or not.
    assert "(pid 999999999) is gone" in reason(False, owner_pid=dead, owner_host="h")
    assert "is gone" in reason(True, expires=expired, owner_pid=dead, owner_host="h")
    # An owner on another host cannot be checked: never taken for gone.
    assert reason(False, expires=expired, owner_pid=dead, owner_host="elsewhere") is None
    # Past its lifetime with no owner: an orphan once it stopped, still in use while running.
    assert reason(True, expires=expired) == "past its maximum lifetime"
    assert reason(False, expires=expired) is None
    assert reason(True, expires="300") is None
    assert reason(True, expires=expired, owner_pid=alive, owner_host="h") is None


def test_expired_reads_the_lifetime_label():
    from stigmer_sandbox import labels

    assert labels.expired({labels.EXPIRES: "100"}, now=200)
    assert not labels.expired({labels.EXPIRES: "300"}, now=200)
    assert not labels.expired({}, now=200)
    assert not labels.expired({labels.EXPIRES: "soon"}, now=200)
    assert not labels.expired({labels.EXPIRES: "4102444800"})  # 2100: checked against now


def test_cleanup_tells_build_cache_from_superseded_images():
    from types import SimpleNamespace

    from stigmer_sandbox import labels
    from stigmer_sandbox.host import cleanup

    recorded = {"0123456789ab"}

    def image(kind: str | None, tags: tuple[str, ...] = (), built: bool = True):
        found = {labels.MANAGED: "true", **({labels.KIND: kind} if kind else {})}
        image_id = "sha256:" + ("0123456789ab" if built else "ba9876543210") + "cd" * 26
        return SimpleNamespace(id=image_id, labels=found, tags=list(tags))

    def ours(found) -> bool:
        return cleanup.is_our_image(found, recorded)

    stage = cleanup.is_our_build_stage
    assert stage(image(cleanup.BUILD_STAGE_KIND)) and not ours(image(cleanup.BUILD_STAGE_KIND))
    assert stage(image(None))  # left by an older Dockerfile
    assert stage(image(cleanup.BUILD_STAGE_KIND, built=False))  # its kind is never inherited
    superseded = image("basic")
    assert ours(superseded) and not stage(superseded)
    assert not stage(image(cleanup.BUILD_STAGE_KIND, ("app:1",)))
    assert not ours(image("basic", ("their-app:1",)))
    assert ours(image("basic", ("stigmer-sandbox-basic:local",), built=False))


def test_untagged_images_count_as_ours_only_when_recorded():
    """A user's untagged image built FROM ours inherits our labels, never our record."""
    from types import SimpleNamespace

    from stigmer_sandbox import labels
    from stigmer_sandbox.host import cleanup

    def untagged(kind: str, image_id: str):
        found = {labels.MANAGED: "true", labels.KIND: kind}
        return SimpleNamespace(id=image_id, labels=found, tags=[])

    recorded = {"0123456789ab"}
    users = untagged("basic", "sha256:ba9876543210" + "0" * 52)
    assert not cleanup.is_our_image(users, recorded)
    assert cleanup.is_our_image(untagged("basic", "sha256:0123456789ab" + "0" * 52), recorded)
    assert not cleanup.is_our_build_stage(users)


def test_fix_permissions_owner_choice(monkeypatch):
    from stigmer_sandbox.host import permissions

    assert permissions.target_owner(False, None, None) == (1000, 1000)
    assert permissions.target_owner(False, 1234, None) == (1234, 1234)
    assert permissions.target_owner(False, None, 55) == (1000, 55)
    for bad in ((-5, None), (None, -1), (2**32 - 1, None)):
        with pytest.raises(UsageError, match="between 0 and"):
            permissions.target_owner(False, *bad)
    monkeypatch.setattr(permissions.os, "getuid", lambda: 0)
    monkeypatch.setenv("SUDO_UID", "1500")
    monkeypatch.setenv("SUDO_GID", "1600")
    assert permissions.target_owner(True, None, None) == (1500, 1600)


def test_fix_permissions_never_follows_symlinks():
    from stigmer_sandbox.host import permissions

    script = permissions._script(1000, 1000, dry_run=False)
    assert script.startswith("find -P /target") and "chown -h 1000:1000" in script
    assert "chown" not in permissions._script(1000, 1000, dry_run=True)


@pytest.mark.parametrize(
    ("found", "have_ca", "status", "fragment"),
    [
        ({"dns": "fail"}, False, "warn", "daemon.json"),
        ({"dns": "ok", "archive": "fail"}, False, "warn", "--network host"),
        ({"dns": "ok", "archive": "ok", "pypi": "fail"}, False, "warn", "--ca-cert"),
        ({"dns": "ok", "archive": "ok", "pypi": "ok", "pypi_plain": "fail"}, True, "pass", ""),
        ({"dns": "ok", "archive": "ok", "pypi": "ok", "pypi_plain": "ok"}, False, "pass", ""),
    ],
)
def test_build_network_verdicts(found, have_ca, status, fragment):
    from stigmer_sandbox.host import diagnostics

    check = diagnostics._network_verdict(found, have_ca)
    assert check.status == status
    assert fragment in (check.hint or "")
