"""Command construction and results, cleanup and diagnostics logic, without an engine."""

import pytest

from stigmer_sandbox.errors import UsageError
from stigmer_sandbox.runtime.client import commands as runtime


def test_strings_run_through_bash_inside_lists_pass_as_is():
    assert runtime.command_argv("echo $(id); rm -rf /") == [
        "/bin/bash",
        "-c",
        "echo $(id); rm -rf /",
    ]
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


def test_result_cause_and_json():
    result = runtime.ExecResult(
        exit_code=137, stdout="", stderr="", duration_s=1.0, oom_killed=True, signal=9
    )
    assert result.cause == "oom" and not result.ok
    assert result.to_dict()["cause"] == "oom"


def test_orphans_are_found_by_owner_and_lifetime():
    import os

    from stigmer_sandbox import labels

    def reason(stopped: bool, **extra: str) -> str | None:
        found = {getattr(labels, key.upper()): value for key, value in extra.items()}
        return labels.orphan_reason(found, stopped, now=200, hostname="h")

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
    from stigmer_sandbox import policy
    from stigmer_sandbox.host import permissions

    assert permissions.target_owner(False, None, None) == (1000, 1000)
    assert permissions.target_owner(False, 1234, None) == (1234, 1234)
    assert permissions.target_owner(False, None, 55) == (1000, 55)
    for bad in ((-5, None), (None, -1), (2**32 - 1, None)):
        with pytest.raises(UsageError, match="between 0 and"):
            permissions.target_owner(False, *bad)
    monkeypatch.setattr(policy.os, "getuid", lambda: 0)
    monkeypatch.setenv("SUDO_UID", "1500")
    monkeypatch.setenv("SUDO_GID", "1600")
    assert permissions.target_owner(True, None, None) == (1500, 1600)
    # A non-root user's sandbox runs as that user: the default owner follows the policy.
    monkeypatch.delenv("SUDO_UID")
    monkeypatch.setattr(policy.os, "getuid", lambda: 4321)
    monkeypatch.setattr(policy.os, "getgid", lambda: 99)
    assert permissions.target_owner(False, None, None) == (4321, 99)


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


def test_doctor_reports_a_workspace_the_policy_refuses(tmp_path):
    from stigmer_sandbox import config
    from stigmer_sandbox.host import diagnostics

    current = config.Settings(project_dir=str(tmp_path), workspace=str(tmp_path))
    check = diagnostics._workspace_check(current)
    assert check.status == "fail" and "the project folder" in check.detail
    fine = diagnostics._workspace_check(current.replace(workspace="ws"))
    assert fine.status != "fail"


def test_a_container_from_a_snapshot_with_an_emptied_owner_is_ownerless():
    from stigmer_sandbox import labels
    from stigmer_sandbox.labels import orphan_reason

    inherited = {labels.OWNER_PID: "", labels.EXPIRES: "1"}
    assert orphan_reason(inherited, stopped=True) == "past its maximum lifetime"
    assert orphan_reason(inherited, stopped=False) is None


def test_the_audit_tail_refuses_a_negative_count_and_takes_any_large_one(tmp_path):
    from stigmer_sandbox.errors import UsageError
    from stigmer_sandbox.runtime.client.history import AuditLog

    log = tmp_path / "audit.jsonl"
    log.write_text('{"command": "a"}\n{"command": "b"}\n')
    with pytest.raises(UsageError, match="0 or more"):
        AuditLog(log).tail(-1)
    assert [e["command"] for e in AuditLog(log).tail(10**30)] == ["a", "b"]
    assert AuditLog(log).tail(0) == []
