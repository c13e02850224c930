"""The MCP server's logic without Docker: argument checks, result mapping, grep parsing,
labels and token, the bearer check, a dropped HTTP connection, and the server itself
driven by the SDK's in-memory client over a stand-in sandbox (bad arguments are error
results and the next call still works). Skipped when the mcp package is not installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import pytest

pytest.importorskip(
    "mcp", reason="the mcp package is not installed (pip install 'stigmer-sandbox[mcp]')"
)

from mcp.shared.memory import create_connected_server_and_client_session

from stigmer_sandbox.config import load_settings
from stigmer_sandbox.errors import UsageError
from stigmer_sandbox.integrations.mcp import parse_labels
from stigmer_sandbox.integrations.mcp.results import Reply, command_reply, process_state
from stigmer_sandbox.integrations.mcp.schemas import TOOLS, ToolFailure, check_arguments
from stigmer_sandbox.integrations.mcp.server import (
    BearerAuth,
    build_server,
    token_from,
    unless_client_leaves,
)
from stigmer_sandbox.integrations.mcp.tools import Tools, grep_matches
from stigmer_sandbox.runtime import ExecResult

ROOT = Path(__file__).resolve().parents[2]


# -- arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TOOLS))
def test_every_schema_is_valid_and_closed(name):
    schema = TOOLS[name].schema
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    if name != "sandbox_list":  # lists them all
        assert "sandbox" in schema["properties"]


@pytest.mark.parametrize(
    ("tool", "arguments", "message"),
    [
        ("run", {}, "run: 'command' is a required property"),
        ("run", {"command": 1}, "run: argument 'command': 1 is not of type 'string'"),
        ("run", {"command": ""}, "run: argument 'command': '' should be non-empty"),
        ("run", {"command": "x", "timeout": 0}, "run: argument 'timeout': 0 is less than or"),
        ("run", {"command": "x", "env": {"A": 1}}, "run: argument 'env/A': 1 is not of type"),
        ("run", {"command": "x", "extra": 1}, "('extra' was unexpected)"),
        ("grep", {"pattern": "x", "max_matches": 0}, "grep: argument 'max_matches'"),
        ("sandbox_create", {"egress": "x"}, "sandbox_create: argument 'egress': 'x' is not one"),
        ("nope", {}, "unknown tool 'nope'"),
    ],
)
def test_bad_arguments_are_one_line(tool, arguments, message):
    with pytest.raises(ToolFailure) as raised:
        check_arguments(tool, arguments)
    text = str(raised.value)
    assert message in text and "\n" not in text


def test_good_arguments_pass_as_given():
    given = {"command": "ls", "timeout": 5, "env": {"A": "b"}, "sandbox": "s"}
    assert check_arguments("run", given) == given
    assert check_arguments("sandbox_list", None) == {}


# -- results ---------------------------------------------------------------------------------


def result(**fields: Any) -> ExecResult:
    values = {"exit_code": 0, "stdout": "", "stderr": "", "duration_s": 0.5, **fields}
    return ExecResult(**values)


def test_a_plain_exit():
    reply = command_reply("box", result(stdout="hi\n", output_bytes={"stdout": 3}))
    assert not reply.error
    assert reply.data["exit_code"] == 0 and reply.data["cause"] == "exit"
    assert reply.data["notice"] is None
    assert reply.text == "hi\n[exit code 0, cause exit]"


def test_a_timeout_says_so():
    reply = command_reply("box", result(exit_code=124, timed_out=True, signal=9), 5)
    assert (reply.data["exit_code"], reply.data["cause"]) == (124, "timeout")
    assert "timed out after 5 s" in reply.data["notice"]
    assert "cause timeout" in reply.text and not reply.error


def test_an_oom_kill_says_so():
    reply = command_reply("box", result(exit_code=137, oom_killed=True, signal=9))
    assert reply.data["cause"] == "oom"
    assert "out of memory" in reply.data["notice"]


def test_a_signal_says_so():
    reply = command_reply("box", result(exit_code=143, signal=15))
    assert reply.data["cause"] == "signal" and "signal 15" in reply.data["notice"]


def test_a_lost_result_is_an_error_result():
    reply = command_reply("box", result(exit_code=None, error="the agent died"))
    assert reply.error and reply.data["cause"] == "lost"
    assert "the agent died" in reply.text


def test_truncation_is_honest():
    cut = result(
        stdout="head...tail",
        truncated={"stdout": True, "stderr": False},
        output_bytes={"stdout": 5_000_000, "stderr": 0},
    )
    reply = command_reply("box", cut)
    assert reply.data["truncated"] == {"stdout": True, "stderr": False}
    assert "stdout: 5000000 bytes printed" in reply.text


def test_a_command_that_could_not_start_says_why():
    reply = command_reply("box", result(exit_code=127, error="nope: not found"))
    assert "could not start: nope: not found" in reply.data["stderr"]


@pytest.mark.parametrize(
    ("state", "shown"),
    [
        ({"running": True}, "running"),
        ({"running": False, "killed": True, "exit_code": -9}, "killed"),
        ({"running": False, "exit_code": 0}, "exit"),
        ({"running": False, "exit_code": 124, "timed_out": True}, "timeout"),
    ],
)
def test_process_state(state, shown):
    assert process_state(state) == shown


def test_grep_output_is_parsed_up_to_the_limit():
    out = "/w/a.py\x002:x = 1\n/w/b:c.py\x0010:y: 2\n[... 99 bytes dropped ...]\n/w/c\x001:z\n"
    matches, more = grep_matches(out, 2)
    assert matches == [
        {"path": "/w/a.py", "line": 2, "text": "x = 1"},
        {"path": "/w/b:c.py", "line": 10, "text": "y: 2"},
    ]
    assert more
    assert grep_matches(out, 10)[1] is False


# -- labels and token ------------------------------------------------------------------------


def test_labels():
    assert parse_labels(["a=b", "team=x=y"]) == {"a": "b", "team": "x=y"}
    for bad in ("novalue", "=x", "dev.stigmer.sandbox.owner-pid=1", "dev.stigmer.sandbox.mcp=0"):
        with pytest.raises(UsageError):
            parse_labels([bad])


def test_token():
    generated, fresh = token_from({})
    assert fresh and len(generated) >= 32
    assert token_from({"STIGMER_MCP_TOKEN": "x" * 16}) == ("x" * 16, False)
    for weak in ("short", " " + "x" * 20):
        with pytest.raises(UsageError, match="at least 16"):
            token_from({"STIGMER_MCP_TOKEN": weak})


# -- the bearer check ------------------------------------------------------------------------


async def asgi_status(token: str, header: bytes | None) -> tuple[int, bool]:
    """The status a request with `header` gets, and whether it reached the app."""
    reached: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(True)
        await send({"type": "http.response.start", "status": 200, "headers": []})

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"authorization", header)] if header is not None else []
    await BearerAuth(app, token)({"type": "http", "headers": headers}, None, send)
    return sent[0]["status"], bool(reached)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, (401, False)),
        (b"Bearer wrong", (401, False)),
        (b"bearer secret-token", (401, False)),
        (b"Bearer secret-token ", (401, False)),
        (b"Bearer secret-token", (200, True)),
    ],
)
async def test_bearer_check(header, expected):
    assert await asgi_status("secret-token", header) == expected


# -- a dropped HTTP connection ---------------------------------------------------------------


class DroppedRequest:
    """An HTTP request whose client is gone after `polls` checks."""

    def __init__(self, polls: int) -> None:
        self.polls = polls

    async def is_disconnected(self) -> bool:
        self.polls -= 1
        return self.polls < 0


async def test_a_dropped_connection_cancels_the_call():
    cancelled: list[bool] = []

    async def work() -> Reply:
        try:
            await anyio.sleep(60)
        except anyio.get_cancelled_exc_class():
            cancelled.append(True)
            raise
        return Reply("never")

    with anyio.fail_after(10):
        reply = await unless_client_leaves(work, DroppedRequest(1))
    assert reply.error and cancelled == [True]


async def test_a_call_that_ends_first_is_answered():
    async def work() -> Reply:
        return Reply("done")

    assert (await unless_client_leaves(work, DroppedRequest(100))).text == "done"
    assert (await unless_client_leaves(work, None)).text == "done"


# -- the server over a stand-in sandbox ------------------------------------------------------


class StandInConnection:
    """Answers every command with its argv, as a sandbox's connection would a result."""

    def execute(self, request: Any) -> ExecResult:
        return ExecResult(0, " ".join(request.argv[2:]) + "\n", "", 0.01, command_id=request.cid)

    def cancel(self, cid: str) -> None:
        pass


class StandInSandbox:
    name = "stand-in"

    def __init__(self) -> None:
        self.settings = load_settings(ROOT, {})
        self.connection = StandInConnection()


class StandInSandboxes:
    def __init__(self) -> None:
        self.sandbox = StandInSandbox()

    def get(self, name: str | None) -> Any:
        if name not in (None, "stand-in"):
            raise UsageError(f"no sandbox {name!r} on this server (see sandbox_list)")
        return self.sandbox


async def test_the_server_answers_bad_calls_with_error_results_and_goes_on():
    tools = Tools(StandInSandboxes())  # type: ignore[arg-type]
    server = build_server(tools)
    async with create_connected_server_and_client_session(server) as client:
        listed = await client.list_tools()
        assert [tool.name for tool in listed.tools] == list(TOOLS)
        for name, arguments in [
            ("run", {"command": 5}),
            ("run", {"command": "x", "timeout": 10**9}),
            ("run", {"command": "x", "sandbox": "other"}),
            ("run", {"command": "x", "session": "s", "background": True}),
            ("teleport", {}),
        ]:
            failed = await client.call_tool(name, arguments)
            assert failed.isError, (name, arguments)
            assert len(failed.content) == 1 and "\n" not in failed.content[0].text
        done = await client.call_tool("run", {"command": "echo hi"})
        assert not done.isError
        assert done.structuredContent["stdout"] == "echo hi\n"
        assert done.structuredContent["sandbox"] == "stand-in"


# -- the entry point -------------------------------------------------------------------------


def test_port_without_http_is_one_line():
    code = "from stigmer_sandbox.cli import main; main()"
    done = subprocess.run(
        [sys.executable, "-c", code, "mcp", "--port", "9"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "--port is for --http" in done.stderr


def test_the_task_tree_does_not_load_the_sdk():
    code = (
        "import sys\n"
        "from stigmer_sandbox.tasks import build_namespace\n"
        "build_namespace()\n"
        "print([m for m in ('mcp', 'stigmer_sandbox.integrations.mcp') "
        "if m in sys.modules])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
