"""Issue 24: the `stigmer` inspect_ai sandbox provider, judged by inspect's own self-check.

Every check of `inspect_ai.util._sandbox.self_check` runs against one pooled sandbox, as
inspect's own runner does; the checks that cannot pass are listed in `EXCLUDED` with the
reason (docs/agent-runner.md repeats them) and must fail (strict xfail), so the list stays
true. Then the lifecycle (pool labels, every sandbox gone after cleanup), `cli_cleanup` by
label, and `inspect_ai.eval` of a two-sample task whose scripted `mockllm` model runs the
`bash` tool in the sandbox. Skipped, with the reason, when inspect_ai is not installed.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

pytest.importorskip(
    "inspect_ai", reason="inspect_ai is not installed (pip install 'stigmer-sandbox[inspect]')"
)

from inspect_ai import Task, eval
from inspect_ai.dataset import Sample
from inspect_ai.model import ChatMessageTool, ModelOutput, ModelUsage, get_model
from inspect_ai.solver import generate, use_tools
from inspect_ai.tool import bash
from inspect_ai.util import (
    SandboxEnvironmentSpec,
    SandboxUserUnsupportedError,
)
from inspect_ai.util._sandbox import self_check

from stigmer_sandbox import labels
from stigmer_sandbox.integrations.inspect_ai import (
    INSPECT_LABEL,
    POOL_LABEL,
    StigmerSandboxConfig,
    StigmerSandboxEnvironment,
)

from ..conftest import ROOT
from .conftest import SESSION_ID, TEST_LABEL, TEST_LABELS

# inspect's checks, collected here as its docs say (`from self_check import *`).
globals().update({name: getattr(self_check, name) for name in self_check.__all__})

# The checks this provider cannot pass, and why.
EXCLUDED = {
    "test_exec_as_user": (
        "needs exec as root (to run adduser): every command runs as the sandbox user; root "
        "in the container holds only the agent's SETUID/SETGID/KILL, and user='root' raises "
        "SandboxUserUnsupportedError, as inspect's contract allows"
    ),
}


# Marks the containers of one test's config, to find exactly those.
CASE_LABEL = f"{labels.PREFIX}.test-case"


def provider_config(tmp: Path, **changes) -> StigmerSandboxConfig:
    """A config whose folders live in `tmp` and whose sandboxes (and their gateways) carry
    the test label and `CASE_LABEL` = the folder's name."""
    folders = {
        "workspace": str(tmp / "workspace"),
        "logs": str(tmp / "logs"),
        "state_dir": str(tmp / "state"),
    }
    marks = {**TEST_LABELS, CASE_LABEL: tmp.name}
    values = {"labels": marks, "project_dir": str(ROOT), "settings": folders, **changes}
    return StigmerSandboxConfig(**values)


def containers_of(client, config: StigmerSandboxConfig) -> list:
    """Every container (any state) started for `config`."""
    wanted = [f"{CASE_LABEL}={config.labels[CASE_LABEL]}"]
    return client.containers.list(all=True, filters={"label": wanted})


@pytest.fixture(scope="module")
def checked_config(tmp_path_factory, docker_engine) -> StigmerSandboxConfig:
    return provider_config(tmp_path_factory.mktemp("inspect-self-check"), pool_size=1)


@pytest.fixture(scope="module")
def sample_sandbox(checked_config):
    """One sample's sandbox through the provider's own lifecycle, shared by the checks."""
    env = StigmerSandboxEnvironment
    asyncio.run(env.task_init("startup", checked_config))
    environments = asyncio.run(env.sample_init("self-check", checked_config, {}))
    yield environments["default"]
    asyncio.run(env.sample_cleanup("self-check", checked_config, environments, False))
    asyncio.run(env.task_cleanup("shutdown", checked_config, True))


@pytest.fixture
def sandbox_env(sample_sandbox, request):
    """The fixture inspect's checks take; an excluded check must fail (strict xfail)."""
    reason = EXCLUDED.get(request.node.originalname)
    if reason:
        request.applymarker(
            pytest.mark.xfail(reason=reason, raises=SandboxUserUnsupportedError, strict=True)
        )
    return sample_sandbox


def test_every_excluded_check_exists():
    assert set(EXCLUDED) <= set(self_check.__all__)


def test_a_sample_sandbox_carries_the_pool_and_provider_labels(sample_sandbox, docker_engine):
    container = docker_engine.containers.get(sample_sandbox.sandbox.name)
    marks = container.labels
    assert marks[INSPECT_LABEL] == "true" and marks[POOL_LABEL]
    assert marks[labels.OWNER_PID] == str(os.getpid())
    assert marks[TEST_LABEL] == SESSION_ID


async def test_root_is_refused_the_way_inspect_expects_and_the_sandbox_user_is_accepted(
    sample_sandbox,
):
    with pytest.raises(SandboxUserUnsupportedError):
        await sample_sandbox.exec(["id", "-u"], user="root")
    by_name = await sample_sandbox.exec(["id", "-un"])
    uid = str(sample_sandbox.sandbox.sandbox_user[0])
    assert (await sample_sandbox.exec(["id", "-u"], user=uid)).stdout.strip() == uid
    named = await sample_sandbox.exec(["id", "-u"], user=by_name.stdout.strip())
    assert named.stdout.strip() == uid


async def test_a_cancelled_exec_ends_its_command_in_the_sandbox(sample_sandbox):
    """A sample cancelled mid-command (a time limit) leaves nothing running behind it."""
    marker = f"cancelled_{SESSION_ID}"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(sample_sandbox.exec(["sh", "-c", f"sleep 60 # {marker}\n:"]), 1)

    async def running() -> str:
        found = await sample_sandbox.exec(["sh", "-c", f"ps ax | grep {marker} | grep -v grep"])
        return found.stdout.strip()

    for _ in range(50):  # the cancel is sent as the await ends; allow it to land
        if not await running():
            break
        await asyncio.sleep(0.1)
    assert await running() == ""


def test_samples_get_their_own_sandboxes_and_cleanup_removes_every_one(tmp_path, docker_engine):
    config = provider_config(tmp_path, pool_size=1)
    env = StigmerSandboxEnvironment

    async def two_samples() -> list[str]:
        await env.task_init("startup", config)
        first, second = await asyncio.gather(
            env.sample_init("lifecycle", config, {}), env.sample_init("lifecycle", config, {})
        )
        names = [e["default"].sandbox.name for e in (first, second)]
        await first["default"].write_file("mine.txt", "first")
        assert (await second["default"].exec(["ls"])).stdout == ""  # a private workspace
        await env.sample_cleanup("lifecycle", config, first, False)
        await env.sample_cleanup("lifecycle", config, second, False)
        await env.task_cleanup("shutdown", config, True)
        return names

    names = asyncio.run(two_samples())
    assert len(set(names)) == 2
    # Released sandboxes, the pool's spare and their gateways: nothing of the pool stays.
    assert containers_of(docker_engine, config) == []


def test_no_sandbox_cleanup_keeps_the_samples_sandboxes_for_a_look(tmp_path, docker_engine):
    config = provider_config(tmp_path, pool_size=1)
    env = StigmerSandboxEnvironment

    async def kept() -> str:
        await env.task_init("startup", config)
        environments = await env.sample_init("kept", config, {})
        await environments["default"].write_file("notes.txt", "look at me")
        # `--no-sandbox-cleanup`: inspect skips sample_cleanup, and says so to task_cleanup.
        await env.task_cleanup("shutdown", config, False)
        return environments["default"].sandbox.name

    name = asyncio.run(kept())
    left = [c.name for c in containers_of(docker_engine, config)]
    # The sample's, running (with its egress gateway); the pool's waiting one went.
    assert name in left and all(other.startswith(f"{name}-") for other in set(left) - {name})
    found = docker_engine.containers.get(name).exec_run(["cat", "/workspace/notes.txt"])
    assert found.output == b"look at me"
    asyncio.run(env.cli_cleanup(name))
    assert containers_of(docker_engine, config) == []


def test_cli_cleanup_removes_the_named_sandbox_and_leaves_live_owners_alone(
    tmp_path, docker_engine
):
    config = provider_config(tmp_path, pool_size=0)
    env = StigmerSandboxEnvironment

    async def scenario() -> None:
        await env.task_init("startup", config)
        environments = await env.sample_init("cleanup", config, {})
        name = environments["default"].sandbox.name
        await env.cli_cleanup(None)  # its owner (this process) lives: a sandbox in use
        assert docker_engine.containers.get(name).status == "running"
        await env.cli_cleanup(name)
        assert [c.name for c in containers_of(docker_engine, config)] == []
        await env.sample_cleanup("cleanup", config, environments, False)
        await env.task_cleanup("shutdown", config, True)

    asyncio.run(scenario())
    assert containers_of(docker_engine, config) == []


def scripted_model(messages, tools, tool_choice, config) -> ModelOutput:
    """Run `bash` once in the sample's sandbox, then answer with what it printed. Usage is
    given, so mockllm counts no tokens (its tokenizer would download its encoding)."""
    last = messages[-1]
    if isinstance(last, ChatMessageTool):
        output = ModelOutput.from_content("mockllm/model", f"ANSWER {last.text}")
    else:
        marker = messages[0].text.strip()
        command = f"touch {marker}.txt && ls && id -un && pwd && echo in=$STIGMER_SANDBOX"
        output = ModelOutput.for_tool_call("mockllm/model", "bash", {"command": command})
    output.usage = ModelUsage(input_tokens=1, output_tokens=1, total_tokens=2)
    return output


def test_inspect_eval_runs_a_two_sample_task_in_stigmer_sandboxes(tmp_path, docker_engine):
    config = provider_config(tmp_path / "folders", pool_size=1)
    task = Task(
        dataset=[Sample(input="marker-one"), Sample(input="marker-two")],
        solver=[use_tools(bash(timeout=60)), generate()],
        sandbox=SandboxEnvironmentSpec("stigmer", config),
    )
    model = get_model("mockllm/model", custom_outputs=scripted_model)
    [log] = eval(task, model=model, log_dir=str(tmp_path / "logs"), display="none")
    assert log.status == "success", log.error
    assert log.samples is not None and len(log.samples) == 2
    for sample in log.samples:
        marker = str(sample.input)
        [tool] = [m for m in sample.messages if isinstance(m, ChatMessageTool)]
        # Its own workspace (only its file), the sandbox user, /workspace, inside a sandbox.
        assert tool.text.split() == [f"{marker}.txt", "sandbox", "/workspace", "in=1"]
        assert sample.output.completion == f"ANSWER {tool.text}"
        execs = [e for e in sample.events if e.event == "sandbox" and e.action == "exec"]
        assert any("bash" in (e.cmd or "") and marker in (e.cmd or "") for e in execs)
    assert containers_of(docker_engine, config) == []
