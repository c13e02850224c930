"""Issue 4 on a real engine: each SECURITY.md property the runtime touches, proven."""

from __future__ import annotations

import json
import os
import re
import time
import tracemalloc
import uuid
from pathlib import Path

import pytest

from stigmer_sandbox import config, isolation, policy
from stigmer_sandbox.errors import ConfigError, UsageError
from stigmer_sandbox.runtime import Sandbox

from ..conftest import ROOT
from .conftest import SUITE_ISOLATION, TEST_LABELS, UNDER_GVISOR


def settings_in(tmp: Path, **changes) -> config.Settings:
    """Settings whose folders live in `tmp` (the user's workspace is never touched), under
    the run's isolation."""
    base = config.load_settings(ROOT, environ={})
    folders = {
        "workspace": str(tmp / "workspace"),
        "logs": str(tmp / "logs"),
        "state_dir": str(tmp / "state"),
    }
    return base.replace(**{**folders, **changes})


def make_sandbox(tmp: Path, **changes) -> Sandbox:
    host_user = changes.pop("host_user", None)
    return Sandbox.create_ephemeral(
        settings_in(tmp, **changes), extra_labels=TEST_LABELS, host_user=host_user
    )


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, docker_engine):
    """One hardened sandbox with small limits, shared by the tests of this module."""
    tmp = tmp_path_factory.mktemp("runtime")
    with make_sandbox(tmp, memory="256m", pids_limit=128, tmp_size="64m") as box:
        yield box


def attrs(box: Sandbox) -> dict:
    return box.inspect()


def test_runs_as_non_root_user(sandbox):
    result = sandbox.exec("id -u; id -un")
    assert result.stdout.split() == ["1000", "sandbox"]


def test_no_privileged_mode_host_namespaces_or_devices(sandbox):
    host = attrs(sandbox)["HostConfig"]
    assert host["Privileged"] is False
    assert host["NetworkMode"] != "host"
    for key in ("PidMode", "IpcMode", "UTSMode", "UsernsMode"):
        assert host.get(key) != "host", key
    assert not host.get("Devices")


def test_all_capabilities_dropped_and_no_new_privileges(sandbox):
    status = sandbox.exec("cat /proc/self/status").stdout
    assert re.search(r"^CapEff:\s+0+$", status, re.MULTILINE)
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.MULTILINE)
    assert attrs(sandbox)["HostConfig"]["CapDrop"] == ["ALL"]
    # Only the root agent keeps these (to switch to the sandbox user and end its processes).
    assert sorted(attrs(sandbox)["HostConfig"]["CapAdd"]) == ["KILL", "SETGID", "SETUID"]


def test_seccomp_and_apparmor_never_unconfined(sandbox):
    options = attrs(sandbox)["HostConfig"].get("SecurityOpt") or []
    assert not any("unconfined" in option for option in options)


def test_fork_bomb_is_contained_and_the_sandbox_survives(sandbox):
    bomb = sandbox.exec("bomb() { bomb | bomb & }; bomb; sleep 3", timeout=20)
    assert re.search(r"fork|Resource temporarily unavailable", bomb.stderr, re.IGNORECASE)
    host = attrs(sandbox)["HostConfig"]
    assert host["PidsLimit"] == isolation.host_pids_limit(SUITE_ISOLATION, 128)
    if UNDER_GVISOR:  # gVisor's kernel holds the commands to 128, the host limit its threads
        assert host["Ulimits"] == [{"Name": "nproc", "Soft": 128, "Hard": 128}]
    assert sandbox.exec("echo alive").stdout == "alive\n"


def test_allocating_twice_the_memory_limit_is_reported_as_oom(sandbox):
    host = attrs(sandbox)["HostConfig"]
    assert host["Memory"] == host["MemorySwap"] == 256 * 1024**2
    result = sandbox.exec(["python3", "-c", "b = b'x' * (512 * 1024 * 1024)"], timeout=60)
    assert result.oom_killed and result.cause == "oom"
    assert result.exit_code == 137
    assert sandbox.exec("echo alive").stdout == "alive\n"


def test_cpu_limit_is_set(sandbox):
    assert attrs(sandbox)["HostConfig"]["NanoCpus"] > 0


def test_tmp_is_a_sized_tmpfs(sandbox):
    result = sandbox.exec("head -c 100000000 /dev/zero > /tmp/fill; echo $?; rm -f /tmp/fill")
    assert "No space left on device" in result.stderr
    assert sandbox.exec("echo ok > /tmp/small && cat /tmp/small").stdout == "ok\n"


def test_read_only_root_option(tmp_path, docker_engine):
    with make_sandbox(tmp_path, read_only_root=True, tmp_size="16m") as box:
        denied = box.exec("touch /etc/stigmer-test")
        assert denied.exit_code != 0 and "Read-only file system" in denied.stderr
        full = box.exec("head -c 50000000 /dev/zero > /tmp/fill")
        assert "No space left on device" in full.stderr
        assert box.exec("echo ok > /workspace/ok && cat /workspace/ok").stdout == "ok\n"


def test_fifty_megabytes_of_output_are_capped_with_marker_and_exit_code(sandbox):
    tracemalloc.start()
    try:
        result = sandbox.exec("head -c 50000000 /dev/zero | tr '\\0' a; exit 7", timeout=120)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.exit_code == 7 and result.cause == "exit"
    assert result.truncated["stdout"] and result.output_bytes["stdout"] == 50_000_000
    assert "bytes truncated by stigmer-sandbox" in result.stdout
    assert len(result.stdout) < 1_100_000
    assert peak < 30 * 1024**2, f"host memory peaked at {peak} bytes"


def test_timeout_kills_the_whole_tree_including_setsid_children(sandbox):
    # Markers GNU sleep accepts, each seen running before the timeout strikes.
    marks = [f"{n}.{uuid.uuid4().int % 10**6:06d}" for n in (1001, 1002, 1003)]
    started = f"sleep {marks[0]} & setsid sleep {marks[1]} & "
    started += f"nohup sh -c 'sleep {marks[2]}' >/dev/null 2>&1 & "
    waits = "; ".join(
        f"until pgrep -f '^sleep {m}$' >/dev/null; do sleep 0.05; done; echo RUNNING" for m in marks
    )
    result = sandbox.exec(started + waits + "; sleep 1004", timeout=3)
    assert result.stdout.count("RUNNING") == 3, result
    assert result.timed_out and result.cause == "timeout" and result.exit_code == 124
    left = sandbox.exec("ps -eo args").stdout
    for m in [*marks, "1004"]:
        assert f"sleep {m}" not in left, left


def test_exit_causes_are_told_apart(sandbox):
    killed = sandbox.exec("kill -TERM $$")
    assert (killed.exit_code, killed.cause, killed.timed_out) == (143, "signal", False)
    normal = sandbox.exec("exit 3")
    assert (normal.exit_code, normal.cause) == (3, "exit")


def test_network_none_has_no_name_resolution(tmp_path, docker_engine):
    with make_sandbox(tmp_path, network="none") as box:
        interfaces = box.exec("tail -n +3 /proc/net/dev | cut -d: -f1").stdout.split()
        assert interfaces == ["lo"]
        lookup = box.exec("getent hosts example.com")
        assert lookup.exit_code != 0


def test_no_docker_socket_and_no_shared_propagation(sandbox):
    for mount in attrs(sandbox)["Mounts"]:
        assert "docker.sock" not in mount["Source"]
        assert mount.get("Propagation") in ("rprivate", "private", "")


@pytest.mark.parametrize("folder", ["/var/run", "/run", "/", "/etc"])
def test_sensitive_host_folders_are_refused(tmp_path, folder):
    box = Sandbox(settings_in(tmp_path, workspace=folder), name="stigmer-never-created")
    with pytest.raises(ConfigError, match=r"refusing|Docker socket"):
        box.up()


def test_credentials_are_opt_in_and_read_only(tmp_path, monkeypatch, docker_engine):
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "config").write_text("[default]\nregion = eu-west-1\n")
    monkeypatch.setenv("HOME", str(home))
    with make_sandbox(tmp_path, mount_aws=True) as box:
        assert "eu-west-1" in box.exec("cat ~/.aws/config").stdout
        write = box.exec("touch ~/.aws/stolen")
        assert write.exit_code != 0 and "Read-only file system" in write.stderr
        aws = [m for m in box.inspect()["Mounts"] if m["Destination"].endswith("/.aws")]
        assert aws and aws[0]["RW"] is False
        from stigmer_sandbox.runtime import security_audit

        flagged = [r for r in security_audit.audit(box) if r.item == 14]
        assert flagged[0].status == "warn" and "use `secrets` instead" in flagged[0].detail
    with pytest.raises(ConfigError, match=r"mount_kube is on but .*\.kube does not exist"):
        make_sandbox(tmp_path, mount_kube=True).up()


def test_health_check_turns_healthy(sandbox):
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sandbox.status()["health"] != "healthy":
        time.sleep(0.5)
    assert sandbox.status()["health"] == "healthy"


def test_workspace_files_are_owned_by_the_sandbox_user_for_a_root_host(sandbox):
    sandbox.exec("echo data > /workspace/owned.txt")
    written = sandbox.settings.path("workspace") / "owned.txt"
    assert written.stat().st_uid == (1000 if os.getuid() == 0 else os.getuid())


# A package with a command, packed and installed globally without the network.
NPM_INSTALL_GLOBAL_OFFLINE = """
set -e
cd "$(mktemp -d)"
echo '{"name": "hello-stigmer", "version": "1.0.0", "bin": {"hello-stigmer": "cli.js"}}' \
    > package.json
printf '#!/usr/bin/env node\\nconsole.log("hello from a global package")\\n' > cli.js
npm pack --silent >/dev/null
npm install -g --offline --no-audit --no-fund ./hello-stigmer-1.0.0.tgz >/dev/null
hello-stigmer
"""


def test_workspace_files_are_owned_by_a_non_root_host_user(tmp_path, docker_engine):
    uid = gid = 4321
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (tmp_path / "logs").mkdir()
    for folder in (workspace, tmp_path / "logs"):
        os.chown(folder, uid, gid)
    with make_sandbox(tmp_path, host_user=(uid, gid)) as box:
        assert box.exec("id -u").stdout.strip() == str(uid)
        box.exec("mkdir -p sub && echo hi > sub/file.txt")
        installed = box.exec(NPM_INSTALL_GLOBAL_OFFLINE, timeout=120)
        assert installed.exit_code == 0, installed.stdout + installed.stderr
        assert installed.stdout.strip().endswith("hello from a global package")
        derived = docker_engine.containers.get(box.name).image
    made = workspace / "sub" / "file.txt"
    assert (made.stat().st_uid, made.stat().st_gid) == (uid, gid)
    # Re-owning copies files up a layer: only the venv should be copied, not Node.
    added = derived.attrs["Size"] - docker_engine.images.get(box.settings.image).attrs["Size"]
    assert added < 40 * 1000**2, added


def test_shell_metacharacters_never_reach_a_host_shell(sandbox, inv):
    marker = f"/tmp/stigmer-pwned-{uuid.uuid4().hex}"
    nasty = f"echo a; touch {marker}; echo $(touch {marker}-2) `touch {marker}-3`"
    result = sandbox.exec(nasty)
    assert result.exit_code == 0
    assert not any(Path(p).exists() for p in (marker, f"{marker}-2", f"{marker}-3"))
    assert sandbox.exec(f"ls {marker} {marker}-2 {marker}-3").exit_code == 0
    done = inv("run", f"touch {marker}-4; echo `touch {marker}-5`")
    assert done.returncode == 0, done.stderr
    assert not Path(f"{marker}-4").exists() and not Path(f"{marker}-5").exists()


def test_workspace_survives_down_and_up(tmp_path, docker_engine):
    settings = settings_in(tmp_path)
    name = f"stigmer-sandbox-{uuid.uuid4().hex[:8]}"
    box = Sandbox(settings, name=name, extra_labels=TEST_LABELS)
    box.up().exec("echo kept > /workspace/kept.txt")
    assert box.remove()
    assert (tmp_path / "workspace" / "kept.txt").read_text() == "kept\n"
    again = Sandbox(settings, name=name, extra_labels=TEST_LABELS)
    assert again.up().exec("cat /workspace/kept.txt").stdout == "kept\n"
    again.remove()


def test_files_round_trip_and_escapes_are_refused(sandbox):
    sandbox.put_file("docs/note.txt", "hello\n")
    assert sandbox.get_file("docs/note.txt") == b"hello\n"
    for bad in ("../etc/passwd", "/etc/passwd", ""):
        with pytest.raises(UsageError):
            sandbox.put_file(bad, "x")
    sandbox.exec("ln -sfn /etc /workspace/escape")
    with pytest.raises(UsageError, match="symlink"):
        sandbox.get_file("escape/passwd")
    with pytest.raises(UsageError, match="symlink"):
        sandbox.put_file("escape/evil", "x")


def test_background_processes_end_with_the_command_unless_kept(sandbox):
    ended = sandbox.exec(
        "sleep 3001 & setsid sleep 3002 & "
        "until pgrep -f '^sleep 3002$' >/dev/null; do sleep 0.05; done; echo RUNNING"
    )
    assert ended.stdout == "RUNNING\n"
    assert "sleep 300" not in sandbox.exec("ps -eo args").stdout
    kept = sandbox.exec("nohup sleep 3003 >/dev/null 2>&1 &", keep_background=True)
    assert kept.exit_code == 0
    assert "sleep 3003" in sandbox.exec("ps -eo args").stdout
    sandbox.exec("pkill -f 'sleep 3003'")


def test_binary_output_stdin_and_env(sandbox):
    binary = sandbox.exec("printf '\\xff\\xfe\\x00ok'")
    assert binary.exit_code == 0 and binary.stdout.endswith("ok")
    echoed = sandbox.exec("cat", stdin=b"from stdin")
    assert echoed.stdout == "from stdin"
    env = sandbox.exec('printf %s "$GREETING"', env={"GREETING": "a=b\nc"})
    assert env.stdout == "a=b\nc"
    assert sandbox.exec("cat").stdout == ""  # no stdin: EOF at once, never hangs


def test_commands_are_audited_on_the_host(sandbox):
    sandbox.exec("echo audited-command")
    entries = sandbox.audit.tail(5)
    assert any(e["command"] == "echo audited-command" and e["exit_code"] == 0 for e in entries)
    assert str(sandbox.audit.path).startswith(str(sandbox.settings.path("state_dir")))
    state = str(sandbox.settings.path("state_dir"))
    exposed = [
        mount
        for mount in sandbox.inspect()["Mounts"]
        if state in mount["Source"]  # only the host's helper, one read-only file, may be
        and (mount["Destination"], mount["RW"]) != (policy.EXEC_HELPER, False)
    ]
    assert not exposed


def test_debug_tasks_and_a_shell_without_a_terminal(inv, tmp_path):
    env = {
        "INVOKE_STIGMER_CONTAINER_NAME": f"stigmer-sandbox-debug-{uuid.uuid4().hex[:6]}",
        "INVOKE_STIGMER_WORKSPACE": str(tmp_path / "workspace"),
        "INVOKE_STIGMER_LOGS": str(tmp_path / "logs"),
    }
    try:
        assert inv("sandbox.up", env=env).returncode == 0
        shell = inv("sandbox.shell", env=env, input_text="id -un; pwd\n")
        assert shell.returncode == 0 and shell.stdout.split()[-2:] == ["sandbox", "/workspace"]
        root = inv("sandbox.shell", "--root", env=env)
        assert root.returncode == 2 and "allow_root_shell" in root.stderr
        assert "STIGMER_SANDBOX=1" in inv("sandbox.env", env=env).stdout
        packages = inv("sandbox.packages", env=env).stdout
        assert "PyYAML" in packages and "npm@10" in packages
        status = json.loads(inv("sandbox.status", "--json", env=env).stdout)
        assert status["state"] == "running" and status["pids_limit"] == 512
        assert json.loads(inv("sandbox.inspect", env=env).stdout)["HostConfig"]["CapDrop"]
        assert inv("sandbox.logs", "--tail", "5", env=env).returncode == 0
        history = json.loads(inv("sandbox.history", "--json", env=env).stdout)
        assert isinstance(history, list)
    finally:
        assert inv("sandbox.down", env=env).returncode == 0


def test_a_command_cannot_hide_itself_in_the_history_or_the_process_list(inv, tmp_path):
    # Raw, this would set the terminal's title, erase the line and show `ls -la` instead.
    disguise = "\x1b]0;owned\x07\x1b[2K\rls -la"
    seen = "\\x1b]0;owned\\x07\\x1b[2K\\rls -la"
    env = {
        "INVOKE_STIGMER_CONTAINER_NAME": f"stigmer-sandbox-disguise-{uuid.uuid4().hex[:6]}",
        "INVOKE_STIGMER_WORKSPACE": str(tmp_path / "workspace"),
        "INVOKE_STIGMER_LOGS": str(tmp_path / "logs"),
    }
    try:
        assert inv("run", f"true '{disguise}'", env=env).returncode == 0
        assert inv("run", "--background", f"sleep 60 '{disguise}'", env=env).returncode == 0
        for task in ("sandbox.history", "sandbox.ps"):
            shown = inv(task, env=env).stdout
            assert seen in shown, (task, shown)
            assert "\x1b" not in shown and "\r" not in shown and "\x07" not in shown, task
    finally:
        assert inv("sandbox.down", env=env).returncode == 0


def test_an_expired_sandbox_is_recreated_not_restarted(tmp_path, docker_engine):
    # About 7 s: the recreated sandbox gets the same lifetime, and its first command must
    # come before that ends even on a loaded machine (2 s did not, once).
    with make_sandbox(tmp_path, max_lifetime_hours=0.002) as box:
        first = box.inspect()["Id"]
        time.sleep(7.5)
        box.up()
        assert box.inspect()["Id"] != first
        assert any("outlived its maximum lifetime" in note for note in box.notes), box.notes
        assert box.exec("echo fresh").stdout == "fresh\n"
