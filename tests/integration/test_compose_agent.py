"""Issue 20, defect 5 on a real engine (Compose v1 here): a compose sandbox is as strong
as an `inv sandbox.up` one. Its commands run through the agent and helper: no
capabilities, the agent out of reach, their whole tree ended, causes told, audited."""

from __future__ import annotations

import json
import time

import pytest

from stigmer_sandbox import config
from stigmer_sandbox.host import compose

from ..conftest import ROOT
from .compose_support import labels_file, sandbox_env, unique_name
from .conftest import wait_for


@pytest.fixture(scope="module")
def compose_box(tmp_path_factory, docker_engine):
    """A compose sandbox with a small memory limit, started by `inv compose.up`, and its
    environment; downed after the module."""
    from ..conftest import run_inv

    tmp = tmp_path_factory.mktemp("compose-agent")
    env = sandbox_env(tmp, unique_name(), memory="512m", tmp_size="64m")
    up = run_inv("compose.up", "--file", str(labels_file(tmp)), env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    yield env
    run_inv("compose.down", env=env)


def attached(env):
    """The library's view of the compose sandbox: `Sandbox.attach` with the same settings."""
    return compose.attach(config.load_settings(ROOT, environ=env))


def test_commands_have_no_capabilities_and_cannot_touch_the_agent(inv, compose_box):
    probe = (
        "grep -E '^(Uid|CapEff|CapPrm|NoNewPrivs)' /proc/self/status; "
        "kill -0 $PPID 2>&1; kill -0 1 2>&1; head -c1 /proc/$PPID/environ 2>&1; "
        "tr '\\0' ' ' < /proc/$PPID/cmdline; echo"
    )
    done = inv("compose.exec", "--", probe, env=compose_box)
    out = done.stdout + done.stderr
    assert "CapEff:\t0000000000000000" in out and "CapPrm:\t0000000000000000" in out
    assert "NoNewPrivs:\t1" in out and "Uid:\t1000" in out
    assert out.count("Operation not permitted") == 2 and "Permission denied" in out
    assert "stigmer-exec" in out, "the command's parent is the root-owned helper"


def test_a_setsid_double_forked_child_ends_with_its_command(compose_box, docker_engine):
    box = attached(compose_box)
    escape = "(setsid sh -c 'sleep 4711 & echo $! > /tmp/escaped' &); sleep 0.5; cat /tmp/escaped"
    result = box.exec(escape, timeout=30)
    assert result.exit_code == 0 and result.stdout.strip().isdigit(), result
    container = docker_engine.containers.get(box.name)

    def gone() -> bool:
        return "sleep 4711" not in container.exec_run(["ps", "-eo", "args"]).output.decode()

    assert wait_for(gone, 5), "the escaped child outlived its command"


def test_timeout_and_oom_are_reported_as_such(inv, compose_box):
    escape = "setsid sleep 4712 & sleep 60"
    timed = inv("compose.exec", "--timeout", "1", "--", escape, env=compose_box)
    assert timed.returncode == 124 and "ended by timeout" in timed.stderr, timed.stderr
    hog = "python3 -c \"b = b'x' * (1024 * 1024 * 1024)\""
    oom = inv("compose.exec", "--", hog, env=compose_box)
    assert oom.returncode == 137 and "ended by oom" in oom.stderr, oom.stderr
    assert inv("compose.exec", "--", "echo alive", env=compose_box).stdout == "alive\n"


def test_each_command_leaves_an_audit_entry(inv, compose_box, tmp_path):
    marker = f"echo audited-{time.monotonic_ns()}"
    assert inv("compose.exec", "--", marker, env=compose_box).returncode == 0
    trail = config.load_settings(ROOT, environ=compose_box).path("state_dir") / "audit.jsonl"
    entries = [json.loads(line) for line in trail.read_text().splitlines()]
    (entry,) = [e for e in entries if e.get("command") == marker]
    assert entry["sandbox"] == compose_box["INVOKE_STIGMER_CONTAINER_NAME"]
    assert entry["exit_code"] == 0 and entry["cause"] == "exit"


def test_the_audit_task_passes_on_the_compose_sandbox_and_says_what_differs(inv, compose_box):
    done = inv("sandbox.audit", "--compose", "--json", env=compose_box)
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["ok"], done.stdout + done.stderr
    by_name = {check["name"]: check for check in report["checks"]}
    separation = by_name["privilege separation: commands cannot touch the agent"]
    assert separation["status"] == "pass" and "stigmer-exec" in separation["detail"]
    warned = {name for name, check in by_name.items() if check["status"] == "warn"}
    assert {"compose: maximum lifetime", "compose: commands only through the agent"} <= warned
    assert "compose:" in by_name["network can be switched off"]["detail"]


def test_exec_and_audit_on_a_compose_sandbox_that_is_not_running(inv, tmp_path):
    env = sandbox_env(tmp_path, unique_name())
    for task in (["compose.exec", "--", "true"], ["sandbox.audit", "--compose"]):
        done = inv(*task, env=env)
        line = done.stderr.strip()
        assert done.returncode == 5 and "\n" not in line and "Traceback" not in line, line
        assert "is not running" in line and "inv compose.up" in line


def test_network_none_cuts_a_compose_sandbox_off(inv, tmp_path, docker_engine):
    env = sandbox_env(tmp_path, unique_name(), network="none")
    try:
        up = inv("compose.up", "--file", str(labels_file(tmp_path)), env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        done = inv("compose.exec", "--", "ls /sys/class/net", env=env)
        assert done.stdout.split() == ["lo"]
        refused = inv("compose.up", "--database", env=env)
        assert refused.returncode == 2 and "--database needs a network" in refused.stderr
    finally:
        inv("compose.down", env=env)


def test_a_shell_without_a_command_is_the_sandbox_user(inv, compose_box):
    shell = inv("compose.exec", env=compose_box, input_text="id -u\nexit 3\n")
    assert shell.stdout.split() == ["1000"] and shell.returncode == 3, shell.stderr
