"""Issue 7 on a real engine: faults injected from outside, hostile and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from stigmer_sandbox import config
from stigmer_sandbox.host import daemon
from stigmer_sandbox.runtime import Sandbox

from ..conftest import ROOT
from .conftest import TEST_LABELS, wait_for
from .test_runtime import make_sandbox, settings_in


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed task; fails the test if there is more."""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


def test_container_removed_from_outside_is_recreated(tmp_path, docker_engine):
    with make_sandbox(tmp_path) as box:
        box.exec("echo kept > /workspace/kept.txt")
        docker_engine.containers.get(box.name).remove(force=True)
        result = box.exec("cat /workspace/kept.txt")
        assert result.stdout == "kept\n"
        assert box.notes, "the recovery was not reported"


def test_container_killed_from_outside_is_restarted(tmp_path, docker_engine):
    with make_sandbox(tmp_path) as box:
        box.exec("true")
        docker_engine.containers.get(box.name).kill()
        assert box.exec("echo back").stdout == "back\n"
        assert any("starting it again" in note for note in box.notes)


def test_engine_restart_is_recovered(tmp_path, docker_engine):
    settings = config.load_settings(ROOT)
    state = daemon.EngineState(settings.path("state_dir"))
    if not daemon._started_pid(state):  # a user's own engine is never restarted by a test
        pytest.skip("the engine was not started by `inv engine.start` (CI starts it so)")
    with make_sandbox(tmp_path) as box:
        box.exec("echo before > /workspace/f.txt")
        daemon.stop(state)
        daemon.start(state, data_root=settings.engine_data_root or None)
        result = box.exec("cat /workspace/f.txt")
        assert result.stdout == "before\n"
        assert any("starting it again" in note for note in box.notes)


def test_killed_tool_leaves_no_process_behind(tmp_path, inv, docker_engine):
    name = f"stigmer-sandbox-kill-{uuid.uuid4().hex[:6]}"
    env = {
        "INVOKE_STIGMER_CONTAINER_NAME": name,
        "INVOKE_STIGMER_WORKSPACE": str(tmp_path / "workspace"),
        "INVOKE_STIGMER_LOGS": str(tmp_path / "logs"),
    }
    box = Sandbox(settings_in(tmp_path, container_name=name), extra_labels=TEST_LABELS).up()
    try:
        tool = subprocess.Popen(
            [sys.executable, "-m", "invoke", "run", "sleep 4242"],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        container = docker_engine.containers.get(name)

        def sleeping() -> bool:
            return "sleep 4242" in container.exec_run(["ps", "-eo", "args"]).output.decode()

        assert wait_for(sleeping), "the command never started"
        tool.kill()
        tool.wait()
        assert wait_for(lambda: not sleeping()), "the killed tool's command kept running"
    finally:
        box.remove()


def test_killed_owner_leaves_an_orphan_that_clean_removes(tmp_path, inv, docker_engine):
    script = textwrap.dedent(f"""
        from stigmer_sandbox import config
        from stigmer_sandbox.runtime import Sandbox
        settings = config.load_settings({str(ROOT)!r}).replace(
            workspace={str(tmp_path / "ws")!r}, logs={str(tmp_path / "logs")!r})
        box = Sandbox.create_ephemeral(settings, extra_labels={TEST_LABELS!r}).up()
        print(box.name, flush=True)
        box.exec("sleep 600")
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    name = owner.stdout.readline().strip()
    owner.kill()
    owner.wait()
    assert docker_engine.containers.get(name)
    done = inv("clean", "--dry-run", "--json")
    leftovers = {r["name"]: r["reason"] for r in json.loads(done.stdout)["would_remove"]}
    assert "is gone" in leftovers.get(name, "")
    assert inv("clean").returncode == 0
    assert not docker_engine.containers.list(all=True, filters={"name": name})


def test_full_workspace_disk_reports_enospc_and_the_sandbox_survives(tmp_path, docker_engine):
    workspace = tmp_path / "small"
    workspace.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(workspace)], check=True)
    try:
        with make_sandbox(tmp_path, workspace=str(workspace)) as box:
            full = box.exec("head -c 20000000 /dev/zero > /workspace/big")
            assert full.exit_code != 0 and "No space left on device" in full.stderr
            assert box.exec("echo alive").stdout == "alive\n"
    finally:
        subprocess.run(["umount", str(workspace)], check=False)


def test_sixteen_parallel_commands_and_three_sandboxes(tmp_path, docker_engine):
    def check(box: Sandbox, tag: str) -> bool:
        result = box.exec(f"echo {tag}; sleep 0.3; echo {tag}-err >&2; exit 3")
        return (result.stdout, result.stderr, result.exit_code) == (f"{tag}\n", f"{tag}-err\n", 3)

    boxes = [make_sandbox(tmp_path / str(i)) for i in range(3)]
    try:
        for box in boxes:
            box.up()
        with ThreadPoolExecutor(max_workers=16) as pool:
            one = list(pool.map(lambda i: check(boxes[0], f"cmd{i}"), range(16)))
            many = list(pool.map(lambda i: check(boxes[i % 3], f"box{i % 3}-{i}"), range(24)))
        assert all(one) and all(many)
    finally:
        for box in boxes:
            box.remove()


@pytest.mark.parametrize(
    ("args", "env", "code", "fragment"),
    [
        (
            ["run", "true"],
            {
                "STIGMER_SANDBOX_IMAGE": "stigmer-nope:1",
                "INVOKE_STIGMER_CONTAINER_NAME": "stigmer-sandbox-nope",
            },
            5,
            "image not found: stigmer-nope:1",
        ),
        (["sandbox.build-basic", "--tag", "Bad Tag"], {}, 2, "invalid tag 'Bad Tag'"),
        (
            ["sandbox.status"],
            {"INVOKE_STIGMER_CONTAINER_NAME": "bad name!"},
            2,
            "key 'container_name'",
        ),
        (["run", ""], {}, 2, "empty command"),
        (["run", "true", "--env", "NOEQUALS"], {}, 2, "--env must be KEY=VALUE"),
        (["run", "true", "--timeout", "-1"], {}, 2, "timeout must be between"),
        (["clean", "--all"], {}, 2, "pass --yes"),
        (["sandbox.history", "-n", "-5"], {}, 2, "must be 0 or more, got -5"),
        (["compose.logs", "--tail", "xyz"], {}, 2, "--tail must be a number of lines or all"),
    ],
)
def test_bad_input_gets_one_clear_line(inv, args, env, code, fragment, docker_engine):
    done = inv(*args, env=env)
    assert done.returncode == code, done.stderr
    assert fragment in one_line(done)


def test_malformed_compose_file_is_one_line(inv, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "docker-compose.sandbox.yml").write_text("services: [\n")
    done = inv("compose.config", env={"INVOKE_STIGMER_PROJECT_DIR": str(project)})
    assert done.returncode == 2 and "invalid YAML at line" in one_line(done)


def test_hostile_commands(tmp_path, docker_engine):
    with make_sandbox(tmp_path) as box:
        big = box.exec("x=" + "a" * 1_000_000 + "; echo ${#x}")
        assert big.stdout == "1000000\n"
        closed = box.exec("exec >&-; sleep 0.2; echo still-here >&2")
        assert closed.exit_code == 0 and closed.stderr == "still-here\n"
        raw = box.exec("head -c 3000 /dev/urandom")
        assert raw.exit_code == 0 and raw.output_bytes["stdout"] == 3000
        assert box.exec("cat").stdout == ""
        assert box.exec(["cat"], stdin=b"x" * 100_000).output_bytes["stdout"] == 100_000
