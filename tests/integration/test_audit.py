"""`sandbox.audit` on a real engine: it reports what it observes inside the sandbox.

Each sandbox differs from the default in one setting, and the audit's evidence must
change with it: a property the sandbox really lacks fails, whatever was asked for.
"""

from __future__ import annotations

import subprocess

import pytest

from stigmer_sandbox.checks import CheckResult
from stigmer_sandbox.runtime import security_audit

from .test_runtime import make_sandbox

AGENT_ITEM = 25  # privilege separation: commands cannot signal, trace or read the agent


def audited(tmp_path, *docker_update: str, **changes) -> tuple[dict[int, list[CheckResult]], dict]:
    """The audit of a fresh sandbox with `changes` (then `docker update` with these
    flags, for what the settings refuse), by item, and its `docker inspect`."""
    with make_sandbox(tmp_path, **changes) as box:
        if docker_update:
            box.up()
            subprocess.run(["docker", "update", *docker_update, box.name], check=True)
        results = security_audit.audit(box)
        attrs = box.inspect()
    by_item: dict[int, list[CheckResult]] = {}
    for result in results:
        by_item.setdefault(result.item or 0, []).append(result)
    return by_item, attrs


def detail(by_item: dict[int, list[CheckResult]], item: int) -> str:
    return " | ".join(r.detail for r in by_item[item])


@pytest.fixture(scope="module")
def default_audit(tmp_path_factory, docker_engine):
    return audited(tmp_path_factory.mktemp("audit"))


def test_a_default_sandbox_passes_every_observed_property(default_audit, capsys):
    by_item, _attrs = default_audit
    with capsys.disabled():
        for results in by_item.values():
            for r in results:
                print(f"{r.status:4} {r.item:>2} {r.name}: {r.detail}")
    assert set(by_item) >= {1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 25}
    failed = [r for results in by_item.values() for r in results if r.failed]
    assert not failed, failed
    # Observed, not read back: the cgroup files, the kernel's seccomp mode, a real write.
    assert "pids.max=" in detail(by_item, 6) and "Seccomp=2" in detail(by_item, 5)
    assert "No space left on device" in detail(by_item, 9)
    assert "healthy after" in detail(by_item, 16)


def test_commands_cannot_touch_the_agent(default_audit):
    by_item, attrs = default_audit
    (result,) = by_item[AGENT_ITEM]
    assert attrs["Config"]["User"].split(":")[0] in ("0", "root"), "the agent runs as root"
    assert result.passed, result
    assert "PID 1 uid 0 with KILL, SETGID, SETUID" in result.detail
    assert "kill -0 $PPID: " in result.detail and "Operation not permitted" in result.detail
    assert "reading $PPID's environ: " in result.detail and "Permission denied" in result.detail


def test_a_sandbox_without_process_or_cpu_limit_fails_those_items(tmp_path, docker_engine):
    # The settings refuse an unlimited process count: the engine is told directly.
    by_item, attrs = audited(tmp_path, "--pids-limit=-1", cpus=0.0)
    assert not attrs["HostConfig"].get("NanoCpus")
    (pids,) = by_item[6]
    (cpu,) = by_item[8]
    assert pids.failed and pids.detail.endswith("pids.max=max"), pids
    assert cpu.failed and ("=-1" in cpu.detail or "=max " in cpu.detail), cpu
    assert all(r.passed for r in by_item[7]), "the memory limit still holds"


def test_network_none_and_read_only_root_change_the_evidence(
    tmp_path, default_audit, docker_engine
):
    by_item, _attrs = audited(tmp_path, network="none", read_only_root=True)
    default, _ = default_audit
    # The default egress policy (public) puts a sandbox on its own network, behind its gateway.
    assert "-egress): interfaces eth0, lo" in detail(default, 13)
    assert all(r.passed for r in default[33]), detail(default, 33)
    assert "raw socket refused" in detail(default, 33)
    assert detail(by_item, 13).startswith("network none: interfaces lo, default route none")
    assert "/ mounted rw" in detail(default, 9) and "not required" in detail(default, 9)
    assert "/ mounted ro" in detail(by_item, 9) and "Read-only file system" in detail(by_item, 9)
    assert all(r.passed for item in (9, 13) for r in by_item[item])
