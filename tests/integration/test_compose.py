"""Issue 5 on a real engine (Compose v1 here): the tasks, the overrides, the guide's files."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from stigmer_sandbox import labels
from stigmer_sandbox.host import compose

from ..conftest import ROOT
from .compose_support import labels_file, sandbox_env, unique_name

# The guide's own files name their container this; nothing else here uses the name.
GUIDE_NAME = "stigmer-sandbox"


@pytest.fixture
def compose_env(tmp_path, inv, docker_engine):
    """Settings for a compose sandbox of this test (own name, folders in tmp, the test
    label); everything downed after."""
    env = sandbox_env(tmp_path, unique_name())
    yield env
    inv("compose.down", "--advanced", "--database", env=env)


def compose_up(inv, env, *flags):
    """`inv compose.up` with the test label on what it starts."""
    labels = labels_file(Path(env["HOME"]).parent)
    return inv("compose.up", *flags, "--file", str(labels), env=env)


def exec_in(inv, env, command, *flags):
    return inv("compose.exec", *flags, "--", command, env=env)


def test_up_exec_owner_limits_and_down_leaves_nothing(inv, compose_env, tmp_path, docker_engine):
    name = compose_env["INVOKE_STIGMER_CONTAINER_NAME"]
    up = compose_up(inv, compose_env)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "healthy" in up.stdout
    version = exec_in(inv, compose_env, "python --version")
    assert version.returncode == 0 and "Python 3.11." in version.stdout
    assert exec_in(inv, compose_env, "echo hi > /workspace/from-compose.txt").returncode == 0
    written = tmp_path / "workspace" / "from-compose.txt"
    assert written.stat().st_uid == 1000
    host = docker_engine.containers.get(name).attrs["HostConfig"]
    assert host["Memory"] == host["MemorySwap"] == 2 * 1024**3
    assert host["NanoCpus"] == 2_000_000_000 and host["PidsLimit"] == 512
    assert host["CapDrop"] == ["ALL"] and sorted(host["CapAdd"]) == ["KILL", "SETGID", "SETUID"]
    assert host["SecurityOpt"] == ["no-new-privileges:true"] and not host["Privileged"]
    assert "/run/stigmer" in host["Tmpfs"]
    down = inv("compose.down", env=compose_env)
    assert down.returncode == 0
    assert not docker_engine.containers.list(all=True, filters={"name": f"^{name}$"})
    assert not docker_engine.networks.list(names=[f"{name}_default"])
    assert written.exists()


def test_database_answers_by_service_name(inv, compose_env):
    up = compose_up(inv, compose_env, "--database")
    assert up.returncode == 0, up.stdout + up.stderr
    probe = (
        "for i in $(seq 50); do curl -fsS -o /dev/null http://database:5432/ && exit 0; "
        "sleep 0.2; done; exit 1"
    )
    assert exec_in(inv, compose_env, probe, "--database").returncode == 0


def test_advanced_maps_the_host_and_mounts_no_credentials(inv, compose_env):
    up = compose_up(inv, compose_env, "--advanced")
    assert up.returncode == 0, up.stdout + up.stderr
    hosts = exec_in(inv, compose_env, "getent hosts host.docker.internal", "--advanced")
    assert hosts.returncode == 0 and hosts.stdout.strip()
    env = exec_in(inv, compose_env, "echo $NODE_ENV", "--advanced")
    assert env.stdout.strip().endswith("development")
    # The guide's credential mounts became the broker (`--secret`): nothing of ~/.aws here.
    aws = exec_in(inv, compose_env, "ls -A /home/sandbox/.aws 2>&1; echo end", "--advanced")
    assert aws.stdout.strip().splitlines()[-1] == "end"
    assert "No such file" in aws.stdout


def test_opted_in_credentials_are_read_only_and_the_audit_flags_them(inv, compose_env):
    env = {**compose_env, "INVOKE_STIGMER_MOUNT_AWS": "true"}
    (Path(env["HOME"]) / ".aws" / "credentials").write_text("[default]\n")
    up = compose_up(inv, env)
    assert up.returncode == 0, up.stdout + up.stderr
    write = exec_in(inv, env, "touch /home/sandbox/.aws/stolen")
    assert write.returncode != 0 and "Read-only file system" in write.stderr + write.stdout
    assert exec_in(inv, env, "cat /home/sandbox/.aws/credentials").stdout == "[default]\n"
    audit = inv("sandbox.audit", "--compose", "--json", env=env)
    item = next(r for r in json.loads(audit.stdout)["checks"] if r["item"] == 14)
    assert item["status"] == "warn" and "use `secrets` instead" in item["detail"]


def test_a_missing_credentials_folder_opted_in_is_one_clear_line(inv, compose_env, tmp_path):
    shutil.rmtree(tmp_path / "home" / ".kube")
    done = inv("compose.up", env={**compose_env, "INVOKE_STIGMER_MOUNT_KUBE": "true"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert ".kube" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("      - /var/run/docker.sock:/var/run/docker.sock", "would expose the Docker socket"),
        ("    privileged: true", "privileged: true is not allowed"),
    ],
)
def test_validator_refuses_socket_and_privileged(inv, tmp_path, line, expected):
    project = tmp_path / "project"
    project.mkdir()
    text = (ROOT / compose.BASE_FILE).read_text()
    anchor = "      - ${STIGMER_LOGS:-./logs}:/logs\n" if "sock" in line else "    init: true\n"
    (project / compose.BASE_FILE).write_text(text.replace(anchor, anchor + line + "\n"))
    done = inv("compose.config", env={"INVOKE_STIGMER_PROJECT_DIR": str(project)})
    assert done.returncode == 2
    assert expected in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("name", ["docker-compose.sandbox.yml", "docker-compose.advanced.yml"])
def test_the_guides_compose_files_work_unchanged(tmp_path, name, compose_env, docker_engine):
    for holder in docker_engine.containers.list(all=True, filters={"name": f"^{GUIDE_NAME}$"}):
        if holder.labels.get(labels.MANAGED) != "true":
            pytest.fail(f"the guide's files need the container name {GUIDE_NAME}, which is in use")
        holder.remove(force=True)  # this project's own sandbox: `inv dev-full` starts it again
    source = ROOT / "tests/integration/guide" / name
    shutil.copy(source, tmp_path / name)
    command = ["docker-compose", "-f", name]
    env = {"HOME": compose_env["HOME"], "PATH": "/usr/local/bin:/usr/bin:/bin"}

    def compose_run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    try:
        assert compose_run("up", "-d").returncode == 0
        deadline = time.monotonic() + 30
        result = compose_run("exec", "-T", "sandbox", "python", "--version")
        while result.returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.5)
            result = compose_run("exec", "-T", "sandbox", "python", "--version")
        assert "Python 3.11." in result.stdout
    finally:
        compose_run("down")


@pytest.mark.parametrize("task", ["sandbox.up", "compose.up"])
@pytest.mark.parametrize(
    ("workspace", "reason"),
    [
        (str(ROOT), "the project folder"),
        (str(ROOT / ".state"), "the tool's state folder"),
        ("~", "your home folder"),
        ("/", "Docker socket"),
        ("/etc/cron.d", "system folder /etc"),
        ("/var/lib/docker/volumes", "system folder /var"),
        ("/usr/local/bin", "system folder /usr"),
        ("~/.ssh", "credentials folder"),
    ],
)
def test_a_dangerous_workspace_is_refused_before_anything_changes(
    inv, task, workspace, reason, docker_engine, tmp_path
):
    watched = [ROOT, ROOT / "tasks.py", ROOT / "workspace"]
    owners = {path: (path.stat().st_uid, path.stat().st_gid) for path in watched if path.exists()}
    name = f"stigmer-refused-{tmp_path.name[-8:]}".lower()
    env = {"INVOKE_STIGMER_WORKSPACE": workspace, "INVOKE_STIGMER_CONTAINER_NAME": name}
    done = inv(task, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    line = done.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith("error: workspace: ") or "workspace: " in line, line
    assert reason in line, line
    assert {p: (p.stat().st_uid, p.stat().st_gid) for p in owners} == owners
    assert not docker_engine.containers.list(all=True, filters={"name": name})
