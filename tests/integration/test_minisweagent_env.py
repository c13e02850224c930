"""Issue 24, item 3, end to end and offline: mini-swe-agent's own agent loop fixes a bug in
a stigmer sandbox.

mini-swe-agent's `mini.yaml` (its default config) with the environment selected by class
path, `get_environment` / `get_agent` as its `mini` command calls them, and its own
`DeterministicToolcallModel`, whose scripted bash calls look around, run a failing pytest
test, fix the bug with `sed`, rerun the test and submit. The proof is in the trajectory
(each observation names the sandbox and a command id found in that sandbox's audit trail)
and in the sandbox afterwards. The sandbox image has no pytest: the host's is copied in as
a zip (pure Python), the way a benchmark's startup command prepares an instance.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")  # its banner, printed on import
os.environ.setdefault(  # not the user's own config folder (created on import)
    "MSWEA_GLOBAL_CONFIG_DIR", str(Path(tempfile.gettempdir()) / "stigmer-tests-mswea")
)
pytest.importorskip("minisweagent", reason="mini-swe-agent is not installed (extra `swe`)")

from minisweagent.agents import get_agent
from minisweagent.config import get_config_from_spec
from minisweagent.environments import get_environment
from minisweagent.models.test_models import DeterministicToolcallModel, make_toolcall_output
from minisweagent.utils.serialize import recursive_merge

from stigmer_sandbox import engine, labels
from stigmer_sandbox.integrations.minisweagent import (
    ENVIRONMENT_CLASS,
    SWE_LABEL,
    StigmerEnvironment,
)

from ..conftest import ROOT
from .conftest import TEST_LABEL, TEST_LABELS

PROJECT = "/workspace/project"
VENDOR = "/workspace/.vendor"
BUGGY = 'def add(a, b):\n    """The sum of a and b."""\n    return a - b\n'
TEST = "from calc import add\n\n\ndef test_adds():\n    assert add(2, 3) == 5\n"
# -B: the fix keeps the file's size and lands within the second of the first run, so
# Python would trust the first run's cached bytecode and rerun the buggy code.
PYTEST = "python -B -m pytest -q -p no:cacheprovider test_calc.py"
# pytest and what it imports (pure Python), from the host's own installation.
PYTEST_PACKAGES = ("pytest", "_pytest", "py", "pluggy", "iniconfig", "packaging", "pygments")


def pytest_zip() -> bytes:
    """The host's pytest and its dependencies' sources as one zip."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in PYTEST_PACKAGES:
            spec = importlib.util.find_spec(name)
            assert spec is not None and spec.origin, name
            origin = Path(spec.origin)
            if spec.submodule_search_locations is None:  # a module: py.py
                archive.write(origin, origin.name)
                continue
            for path in origin.parent.rglob("*"):
                if path.is_file() and "__pycache__" not in path.parts:
                    archive.write(path, str(path.relative_to(origin.parent.parent)))
    return buffer.getvalue()


def environment_config(tmp: Path, **changes: Any) -> dict[str, Any]:
    """mini.yaml's environment section, this environment's class and the test's folders."""
    folders = {key: str(tmp / key) for key in ("workspace", "logs", "state_dir")}
    ours = {
        "environment_class": ENVIRONMENT_CLASS,
        "cwd": PROJECT,
        "env": {"PYTHONPATH": VENDOR},
        "labels": TEST_LABELS,
        "project_dir": str(ROOT),
        "settings": folders,
        **changes,
    }
    return recursive_merge(get_config_from_spec("mini.yaml")["environment"], ours)


@pytest.fixture(scope="module")
def env(tmp_path_factory, docker_engine):
    """An environment made the way `mini` makes one, with the buggy project and pytest."""
    tmp = tmp_path_factory.mktemp("minisweagent")
    environment = get_environment(environment_config(tmp))
    assert isinstance(environment, StigmerEnvironment)
    try:
        done = environment.sandbox.upload_files(
            [
                (f"{PROJECT}/calc.py", BUGGY.encode()),
                (f"{PROJECT}/test_calc.py", TEST.encode()),
                ("/workspace/.vendor.zip", pytest_zip()),
            ]
        )
        assert not [item.error for item in done if item.error]
        startup = environment.execute(
            {"command": f"python -m zipfile -e {VENDOR}.zip {VENDOR} && rm {VENDOR}.zip"}
        )
        assert startup["returncode"] == 0, startup
        yield environment
    finally:
        environment.cleanup()


def bash(call_id: str, command: str, thought: str) -> dict[str, Any]:
    """One model turn: a thought and one `bash` tool call (mini's toolcall format)."""
    arguments = json.dumps({"command": command})
    tool_call = {
        "id": call_id,
        "type": "function",
        "function": {"name": "bash", "arguments": arguments},
    }
    return make_toolcall_output(
        thought, [tool_call], [{"command": command, "tool_call_id": call_id}]
    )


SCRIPT = [
    bash("look", "pwd && id -un && ls", "Where am I, and what is here?"),
    bash("run-failing", PYTEST, "Run the test to see it fail."),
    bash("fix", "sed -i 's/return a - b/return a + b/' calc.py", "add() subtracts: fix it."),
    bash("run-passing", PYTEST, "Run the test again."),
    bash("submit", "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT && cat calc.py", "Submit."),
]


def observations(messages: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The tool results by tool call id."""
    return {m["tool_call_id"]: m for m in messages if m.get("role") == "tool"}


def test_the_agent_loop_fixes_a_failing_test_in_the_sandbox(env, tmp_path):
    config = get_config_from_spec("mini.yaml")
    model = DeterministicToolcallModel(
        outputs=SCRIPT, observation_template=config["model"]["observation_template"]
    )
    trajectory = tmp_path / "run.traj.json"
    agent_config = {**config["agent"], "output_path": trajectory, "cost_limit": 0}
    agent = get_agent(model, env, agent_config, default_type="default")

    info = agent.run("calc.add is wrong: make test_calc.py pass")

    assert info["exit_status"] == "Submitted"
    assert info["submission"] == BUGGY.replace("a - b", "a + b")
    seen = observations(agent.messages)
    assert list(seen) == ["look", "run-failing", "fix", "run-passing"]
    look = json.loads(seen["look"]["content"])  # mini.yaml's template renders JSON
    assert look == {"returncode": 0, "output": f"{PROJECT}\nsandbox\ncalc.py\ntest_calc.py\n"}
    failing = seen["run-failing"]["extra"]
    assert failing["returncode"] == 1, failing["raw_output"]
    assert "assert -1 == 5" in failing["raw_output"]
    assert "1 failed" in failing["raw_output"]
    assert seen["fix"]["extra"]["returncode"] == 0
    passing = seen["run-passing"]["extra"]
    assert passing["returncode"] == 0, passing["raw_output"]
    assert "1 passed" in passing["raw_output"]

    # Every output came from this sandbox: its name, and command ids its audit trail holds.
    audited = {e["id"] for e in env.sandbox.audit.tail(50) if e["sandbox"] == env.sandbox.name}
    for message in seen.values():
        assert message["extra"]["sandbox"] == env.sandbox.name
        assert message["extra"]["command_id"] in audited
    saved = json.loads(trajectory.read_text())
    assert saved["info"]["exit_status"] == "Submitted"
    assert saved["info"]["config"]["environment_type"] == ENVIRONMENT_CLASS
    assert saved["info"]["config"]["environment_sandbox"] == env.sandbox.name

    # The fix is in the sandbox, and the test passes there.
    rerun = env.execute({"command": PYTEST})
    assert rerun["returncode"] == 0, rerun["output"]
    assert "1 passed" in rerun["output"]


def test_template_vars_describe_the_sandbox_not_the_host(env):
    found = env.get_template_vars(task="t")
    assert (found["system"], found["node"]) == ("Linux", "sandbox")
    assert found["cwd"] == PROJECT and found["task"] == "t" and found["timeout"] == 30


def test_a_timeout_reports_as_docker_does_with_the_partial_output_and_ends_the_command(env):
    command = "echo started; sleep 300"
    output = env.execute({"command": command}, timeout=1)
    assert output["returncode"] == -1
    assert output["output"] == "started\n"
    expected = f"Command '['bash', '-lc', '{command}']' timed out after 1 seconds"
    assert output["exception_info"] == f"An error occurred while executing the command: {expected}"
    assert output["extra"]["exception_type"] == "TimeoutExpired"
    assert output["extra"]["exception"] == expected
    # The command's whole tree ended (docker's environment leaves it running).
    assert env.execute({"command": "pgrep -x -f 'sleep 300'"})["returncode"] == 1


def test_the_configs_timeout_applies_and_a_given_sandbox_outlives_cleanup(env):
    second = StigmerEnvironment(sandbox=env.sandbox, timeout=1, cwd=PROJECT)
    output = second.execute({"command": "sleep 300"})
    assert output["extra"]["exception_type"] == "TimeoutExpired"
    assert output["exception_info"].endswith("timed out after 1 seconds")
    second.cleanup()
    assert env.execute({"command": "true"})["returncode"] == 0


def test_cleanup_removes_the_sandbox_and_everything_it_made(tmp_path, docker_engine):
    config = environment_config(tmp_path, cwd="/workspace")
    environment = StigmerEnvironment(
        **{k: v for k, v in config.items() if k != "environment_class"}
    )
    name = environment.sandbox.name
    container = engine.client().containers.get(name)
    assert container.labels[SWE_LABEL] == "true"
    assert container.labels[TEST_LABEL] == TEST_LABELS[TEST_LABEL]
    assert container.labels[labels.OWNER_PID] == str(os.getpid())  # `inv clean` takes orphans
    assert environment.execute({"command": "echo hi"})["output"] == "hi\n"

    environment.cleanup()
    environment.cleanup()  # idempotent
    client = engine.client()
    assert not client.containers.list(all=True, filters={"name": f"^/{name}$"})
    owned = {"label": [f"{labels.OWNER}={name}"]}
    assert not client.containers.list(all=True, filters=owned)
    assert not client.networks.list(filters=owned)
    after = environment.execute({"command": "echo hi"})
    assert after["returncode"] == -1
    assert "cleaned up" in after["exception_info"]
