"""Issue 12, end to end and offline: a real deepagents agent fixes a bug in a real sandbox.

`create_deep_agent` gets `StigmerSandbox` as its backend and a scripted chat model (no
network) that calls deepagents' own tools the way a model would: `write_file` a module
with a bug and its test, `execute` the failing test, `grep` for the bug, `edit_file` the
fix, `execute` the passing test. The proof is in the tool results the agent got back and
in the files inside the sandbox afterwards, once through `invoke` (the sync tools) and
once through `ainvoke` (the async twins: `aexecute`, `aupload_files`, ...).
"""

from __future__ import annotations

from typing import Any

import pytest
from deepagents import create_deep_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from stigmer_sandbox.integrations.deepagents import StigmerSandbox

from .conftest import TEST_LABELS
from .test_runtime import settings_in

BUGGY_MODULE = 'def add(a, b):\n    """The sum of a and b."""\n    return a - b\n'
TEST_MODULE = (
    "import unittest\n\n"
    "from calc import add\n\n\n"
    "class AddTest(unittest.TestCase):\n"
    "    def test_adds(self):\n"
    "        self.assertEqual(add(2, 3), 5)\n\n\n"
    'if __name__ == "__main__":\n'
    "    unittest.main()\n"
)
FINAL_ANSWER = "Fixed: add() subtracted instead of adding; the test passes now."


class ScriptedModel(GenericFakeChatModel):
    """A chat model that answers with the next scripted message, tool calls included."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedModel:
        return self


def call(name: str, call_id: str, **args: Any) -> AIMessage:
    return AIMessage(content="", tool_calls=[{"name": name, "args": args, "id": call_id}])


def bug_fix_script(project: str) -> list[AIMessage]:
    """What a model would do to find and fix the bug, one tool call per turn."""
    # -B: the fix keeps the file's size and lands within the second of the first run, so
    # Python would trust the first run's cached bytecode and rerun the buggy code.
    run_tests = f"cd {project} && python -B -m unittest -v test_calc"
    return [
        call("write_file", "write-module", file_path=f"{project}/calc.py", content=BUGGY_MODULE),
        call("write_file", "write-test", file_path=f"{project}/test_calc.py", content=TEST_MODULE),
        call("execute", "run-failing", command=run_tests),
        call("grep", "find-bug", pattern="a - b", path=project, output_mode="content"),
        call(
            "edit_file",
            "fix-bug",
            file_path=f"{project}/calc.py",
            old_string="return a - b",
            new_string="return a + b",
        ),
        call("execute", "run-passing", command=run_tests),
        AIMessage(content=FINAL_ANSWER),
    ]


def make_agent(backend: StigmerSandbox, project: str):
    model = ScriptedModel(messages=iter(bug_fix_script(project)))
    return create_deep_agent(model=model, backend=backend)


def tool_results(state: dict[str, Any]) -> dict[str, ToolMessage]:
    """The agent's tool results by tool call id."""
    return {m.tool_call_id: m for m in state["messages"] if isinstance(m, ToolMessage)}


def request(project: str) -> dict[str, Any]:
    return {"messages": [HumanMessage(f"Write calc.py and its test in {project}; fix the bug.")]}


@pytest.fixture(scope="module")
def backend(tmp_path_factory, docker_engine):
    settings = settings_in(tmp_path_factory.mktemp("deepagents-agent"))
    with StigmerSandbox(settings=settings, extra_labels=TEST_LABELS) as sandbox:
        yield sandbox


def check_bug_fix(backend: StigmerSandbox, project: str, state: dict[str, Any]) -> None:
    results = tool_results(state)
    assert set(results) == {
        "write-module",
        "write-test",
        "run-failing",
        "find-bug",
        "fix-bug",
        "run-passing",
    }
    assert all(m.status == "success" for m in results.values()), results
    assert results["write-module"].content == f"Updated file {project}/calc.py"
    assert results["write-test"].content == f"Updated file {project}/test_calc.py"

    failing = results["run-failing"]
    assert failing.artifact["exit_code"] == 1, failing.content
    assert "AssertionError: -1 != 5" in failing.content
    assert "FAILED (failures=1)" in failing.content
    assert "[Command failed with exit code 1]" in failing.content

    assert results["find-bug"].content == f"{project}/calc.py:\n  3:     return a - b"
    assert results["fix-bug"].content == (
        f"Successfully replaced 1 instance(s) of the string in '{project}/calc.py'"
    )

    passing = results["run-passing"]
    assert passing.artifact["exit_code"] == 0, passing.content
    assert "test_adds (test_calc.AddTest.test_adds) ... ok" in passing.content
    assert "\nOK" in passing.content
    assert "[Command succeeded with exit code 0]" in passing.content

    assert state["messages"][-1].content == FINAL_ANSWER

    # The files really are in the sandbox, fixed, and the test passes there too.
    module, test = backend.download_files([f"{project}/calc.py", f"{project}/test_calc.py"])
    assert module.content == BUGGY_MODULE.replace("a - b", "a + b").encode()
    assert test.content == TEST_MODULE.encode()
    rerun = backend.execute(f"cd {project} && python -B -m unittest test_calc")
    assert rerun.exit_code == 0, rerun.output


def test_agent_writes_runs_greps_fixes_and_reruns_in_the_sandbox(backend):
    project = "/workspace/sync-project"
    state = make_agent(backend, project).invoke(request(project))
    check_bug_fix(backend, project, state)


async def test_agent_fixes_the_bug_through_the_async_tools_too(backend):
    project = "/workspace/async-project"
    state = await make_agent(backend, project).ainvoke(request(project))
    check_bug_fix(backend, project, state)
