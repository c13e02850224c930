"""`isolation: container | gvisor` as configuration and as the engine sees it (no engine)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from stigmer_sandbox import config, isolation, policy
from stigmer_sandbox.errors import ConfigError, SandboxError
from stigmer_sandbox.runtime import Sandbox


def test_only_gvisor_adds_a_runtime_so_default_sandboxes_keep_their_configuration(tmp_path):
    base = config.Settings(project_dir=str(tmp_path))
    assert "runtime" not in policy.container_spec(base, "img", {})
    gvisor = base.replace("test", isolation="gvisor")
    assert policy.container_spec(gvisor, "img", {})["runtime"] == isolation.RUNTIME
    offline = gvisor.replace("test", egress="none")
    assert policy.container_spec(offline, "img", {})["runtime"] == isolation.OFFLINE_RUNTIME


def test_under_gvisor_the_commands_keep_their_process_limit_and_gvisor_gets_room(tmp_path):
    """runc: the engine's limit is the commands' (no ulimit: RLIMIT_NPROC would count the
    uid across the host). gVisor: its kernel holds the commands to the limit (nproc) and the
    engine's limit also leaves room for gVisor's own host tasks (SECURITY.md 43)."""
    base = config.Settings(project_dir=str(tmp_path), pids_limit=128)
    runc = policy.container_spec(base, "img", {})
    assert runc["pids_limit"] == 128 and "ulimits" not in runc
    gvisor = policy.container_spec(base.replace("test", isolation="gvisor"), "img", {})
    assert gvisor["pids_limit"] == 128 * isolation.HOST_TASKS_PER_PROCESS + isolation.HOST_TASKS_OWN
    assert [dict(limit) for limit in gvisor["ulimits"]] == [
        {"Name": "nproc", "Soft": 128, "Hard": 128}
    ]


def test_no_process_limit_stays_none_under_gvisor(tmp_path):
    unlimited = config.Settings(project_dir=str(tmp_path), pids_limit=0, isolation="gvisor")
    spec = policy.container_spec(unlimited, "img", {})
    assert spec["pids_limit"] == 0 and "ulimits" not in spec
    assert isolation.host_pids_limit("gvisor", 4_000_000) == isolation.MAX_HOST_TASKS


def test_the_sandbox_takes_it_and_refuses_an_unknown_one(tmp_path):
    base = config.Settings(project_dir=str(tmp_path))
    assert Sandbox(base, isolation="gvisor").settings.isolation == "gvisor"
    assert Sandbox(base).settings.isolation == "container"
    with pytest.raises(ConfigError, match=r"isolation.*container, gvisor"):
        Sandbox(base, isolation="vm")


def test_an_engine_without_the_runtime_is_refused_with_the_fix():
    assert isolation.unusable_reason({"Runtimes": {"runc": {}}}) is not None
    assert isolation.unusable_reason({"Runtimes": {isolation.RUNTIME: {}}}) is None
    with pytest.raises(SandboxError) as raised:
        isolation.require_usable({"Runtimes": {}})
    assert raised.value.hint == isolation.INSTALL_HINT


def test_a_containers_isolation_is_read_from_its_runtime():
    assert isolation.of_container(type("C", (), {"attrs": {"HostConfig": {}}})()) == "container"
    gv = {"HostConfig": {"Runtime": isolation.RUNTIME}}
    assert isolation.of_container(type("C", (), {"attrs": gv})()) == "gvisor"


def test_mount_identities_are_read_through_the_gofers_root(tmp_path, monkeypatch):
    """The gofer's /proc/PID/root is the container's root; this process stands in for it
    (its root is the host's), so each target's identity is the host path's."""
    cid = "abc123"
    (tmp_path / f"{cid}_sandbox:{cid}.state").write_text(json.dumps({"goferPid": os.getpid()}))
    monkeypatch.setattr(isolation, "STATE_FOLDERS", (str(tmp_path / "missing"), str(tmp_path)))
    status, output = isolation.host_identities(cid, [str(tmp_path)])
    found = os.lstat(tmp_path)
    assert (status, output) == (0, f"{found.st_dev}:{found.st_ino}\n".encode())
    assert isolation.host_identities(cid, ["/no/such/target"])[0] == 1
    assert isolation.host_identities("other", [str(tmp_path)]) == (
        1,
        b"the gVisor gofer of this sandbox was not found on this host",
    )


def test_a_gvisor_sandbox_without_network_gets_the_offline_runtime():
    assert isolation.runtime_for("gvisor", "none") == isolation.OFFLINE_RUNTIME
    assert isolation.runtime_for("gvisor", "public") == isolation.RUNTIME
    assert isolation.runtime_for("container", "none") is None
    offline = SimpleNamespace(attrs={"HostConfig": {"Runtime": isolation.OFFLINE_RUNTIME}})
    assert isolation.of_container(offline) == "gvisor"
