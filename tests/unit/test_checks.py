"""One check-result type and one report shape for doctor, smoke tests and the audit."""

from __future__ import annotations

import json

import pytest

from stigmer_sandbox import console
from stigmer_sandbox.checks import CheckResult, report, summary
from stigmer_sandbox.host.workflow import StepResult
from stigmer_sandbox.runtime import security_audit
from stigmer_sandbox.tasks import root

FIELDS = {"name", "status", "detail", "hint", "seconds", "item", "required"}


def test_only_a_required_failure_fails_the_report():
    optional = CheckResult("disk", "fail", "0.5 GB free", "inv clean", required=False)
    warned = CheckResult("registry", "warn", "offline")
    assert report([optional, warned])["ok"] is True
    assert report([optional, CheckResult("engine", "fail", "down")])["ok"] is False
    assert not warned.passed and not warned.failed


def test_one_json_shape_with_its_context():
    results = [CheckResult("python", "pass", "3.11.2", seconds=0.25), CheckResult("x", "fail", "")]
    shaped = report(results, image="stigmer-sandbox-basic:local")
    assert set(shaped) == {"ok", "checks", "image"}
    assert all(set(check) == FIELDS for check in shaped["checks"])
    assert shaped["checks"][0]["seconds"] == 0.25 and shaped["checks"][1]["hint"] is None


def test_summary_counts_each_status():
    results = [
        CheckResult("a", "pass", ""),
        CheckResult("b", "warn", ""),
        CheckResult("c", "fail", ""),
    ]
    assert summary(results) == "1 passed, 1 warning, 1 failed"
    assert summary(results[:1]) == "1 passed, 0 failed"


def test_check_line_shows_item_time_and_a_hint_only_when_not_passed(capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    console.check_line(CheckResult("process limit", "pass", "pids.max=512", "unused", item=6))
    console.check_line(CheckResult("node", "fail", "exit 127", "rebuild", seconds=0.5))
    assert capsys.readouterr().out.splitlines() == [
        "✓  6 process limit: pids.max=512",
        "✗ node: exit 127  (0.50s)  → rebuild",
    ]


def test_show_checks_prints_the_report_and_says_whether_it_is_ok(capsys):
    ok = console.show_checks([CheckResult("health", "pass", "healthy")], True, sandbox="s")
    printed = json.loads(capsys.readouterr().out)
    assert ok and printed["sandbox"] == "s" and printed["checks"][0]["name"] == "health"
    assert not console.show_checks([CheckResult("health", "fail", "starting")], False)
    assert capsys.readouterr().out.splitlines()[-1] == "0 passed, 1 failed"


def test_dev_full_summary_keeps_whole_cells_in_a_log(capsys):
    log = "/var/lib/stigmer-sandbox/state/dockerd.log " * 4
    root._steps_table([StepResult("engine", f"started; log {log.strip()}", 1.0)])
    assert log.strip() in capsys.readouterr().out


def test_capability_masks_decode_to_names():
    assert security_audit.capability_names("00000000000000e0") == ["KILL", "SETGID", "SETUID"]
    assert security_audit.capability_names("0000000000000000") == []
    assert security_audit.capability_names("?") == []


MOUNTINFO = """\
139 113 0:51 / / ro,relatime master:3 - overlay overlay rw,lowerdir=/a
158 139 254:0 /srv/my\\040work /workspace rw,relatime shared:7 - ext4 /dev/vda rw
159 139 0:60 / /tmp rw,nosuid,nodev - tmpfs tmpfs rw,size=524288k
"""


def test_mountinfo_gives_options_propagation_and_unescaped_paths():
    root_mount, workspace, tmp = security_audit.parse_mountinfo(MOUNTINFO)
    assert root_mount.point == "/" and "ro" in root_mount.options
    assert root_mount.propagation == ("master:3",)
    assert workspace.root == "/srv/my work" and workspace.propagation == ("shared:7",)
    assert tmp.fstype == "tmpfs" and "size=524288k" in tmp.super_options


def test_process_view_reads_the_parent_chain_and_every_refusal():
    view = security_audit.parse_process_view(
        "self 1000\nancestor 20 0 stigmer-exec\nancestor 15 0 python3\n"
        "try kill -0 $PPID: bash: line 7: kill: (20) - Operation not permitted\n"
        "try kill -0 1: \n"
    )
    assert view.uid == "1000"
    assert view.ancestors == [("20", "0", "stigmer-exec"), ("15", "0", "python3")]
    assert view.attempts["kill -0 $PPID"].endswith("Operation not permitted")
    assert not view.all_refused  # kill -0 1 was allowed


def test_find_errors_name_the_places_not_scanned():
    stderr = (
        "find: \u2018/root\u2019: Permission denied\nfind: '/etc/ssl/private': Permission denied\n"
    )
    assert security_audit.FIND_ERROR.findall(stderr) == ["/root", "/etc/ssl/private"]


def test_a_property_whose_observation_fails_fails_and_says_why():
    def broken(_box, _attrs):
        raise security_audit.Unobserved("`id -u` exited 126: permission denied")

    prop = security_audit.Property(1, "non-root user", broken)
    result = prop.check(None, {})  # type: ignore[arg-type]
    assert (result.item, result.status) == (1, "fail")
    assert result.detail == "not observed: `id -u` exited 126: permission denied"


@pytest.mark.parametrize("number", [1, 3, 4, 5, 6, 7, 8, 9, 13, 14, 15, 16, 17, 25, 43])
def test_the_audit_covers_the_property(number):
    assert number in {prop.item for prop in security_audit.PROPERTIES}
