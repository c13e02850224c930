"""Issue 24: the MCP server, driven by the official SDK's own client over stdio and HTTP.

One server per transport serves the module (started as `stigmer-sandbox mcp`, the console
script's code path, with its folders in a scratch directory and the test label on its
sandboxes): tools listed, `run` (exit, timeout, session), the file tools' round trip, a
background process, fork / snapshot / destroy, bad arguments answered as error results
with the server still serving. Then the ends: a stdio client killed mid-command makes the
server end the command, exit and remove its sandbox; an HTTP client that drops its
connection mid-command leaves no process behind while the server keeps serving; the HTTP
server refuses requests without the bearer token and removes its sandboxes on SIGTERM.
Skipped, with the reason, when the mcp package is not installed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "mcp", reason="the mcp package is not installed (pip install 'stigmer-sandbox[mcp]')"
)

import httpx
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from stigmer_sandbox import labels
from stigmer_sandbox.runtime import snapshots

from .conftest import SESSION_ID, TEST_LABEL, wait_for

CASE_LABEL = f"{labels.PREFIX}.test-case"
CLI = "import sys; from stigmer_sandbox.cli import main; sys.argv[0] = 'stigmer-sandbox'; main()"
TOKEN = "test-token-" + uuid.uuid4().hex
# How a test counts the processes running exactly `sleep 300` (not the keep-alive's
# `sleep infinity`, not the counting shell itself).
COUNT_SLEEPS = "ps -eo args | grep -cx 'sleep 300' || true"


def server_command(case: str, *flags: str) -> list[str]:
    """`stigmer-sandbox mcp` with the labels that find its sandboxes."""
    marks = ["--label", f"{TEST_LABEL}={SESSION_ID}", "--label", f"{CASE_LABEL}={case}"]
    return [sys.executable, "-c", CLI, "mcp", *marks, *flags]


def server_env(folder: Path) -> dict[str, str]:
    """The environment of a server whose folders live in `folder`."""
    return {
        **os.environ,
        "NO_COLOR": "1",
        "INVOKE_STIGMER_WORKSPACE": str(folder / "workspace"),
        "INVOKE_STIGMER_LOGS": str(folder / "logs"),
        "INVOKE_STIGMER_STATE_DIR": str(folder / "state"),
        "STIGMER_MCP_TOKEN": TOKEN,
    }


def containers_of(client, case: str, kind: str | None = None) -> list:
    """The containers (any state) a server of `case` started: of `kind` (sandbox,
    egress-gateway), or all."""
    wanted = [f"{CASE_LABEL}={case}", *([f"{labels.KIND}={kind}"] if kind else [])]
    return client.containers.list(all=True, filters={"label": wanted}, ignore_removed=True)


class Client:
    """An MCP client session held open in a thread of its own, for synchronous tests."""

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._ready: concurrent.futures.Future[ClientSession] = concurrent.futures.Future()
        self._stop: asyncio.Event | None = None
        self._held = asyncio.run_coroutine_threadsafe(self._hold(connect), self._loop)
        self.session = self._ready.result(timeout=120)

    async def _hold(self, connect: Callable[[], Any]) -> None:
        self._stop = asyncio.Event()
        try:
            async with connect() as streams, ClientSession(streams[0], streams[1]) as session:
                await session.initialize()
                self._ready.set_result(session)
                await self._stop.wait()
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
            raise

    def _wait(self, coroutine: Any, timeout: float = 180) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def call(self, tool: str, **arguments: Any) -> Any:
        return self._wait(self.session.call_tool(tool, arguments))

    def ok(self, tool: str, **arguments: Any) -> dict[str, Any]:
        """A call's structured content; the call must have succeeded."""
        result = self.call(tool, **arguments)
        assert not result.isError, result.content[0].text
        return result.structuredContent

    def tool_names(self) -> list[str]:
        return [tool.name for tool in self._wait(self.session.list_tools()).tools]

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        with contextlib.suppress(Exception):
            self._held.result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def stdio_params(folder: Path, case: str) -> StdioServerParameters:
    command = server_command(case)
    return StdioServerParameters(
        command=command[0], args=command[1:], env=server_env(folder), cwd=str(folder)
    )


@pytest.fixture(scope="module")
def stdio(tmp_path_factory, docker_engine):
    """One server over stdio, its client session and its case label."""
    folder = tmp_path_factory.mktemp("mcp-stdio")
    case = f"mcp-stdio-{uuid.uuid4().hex[:8]}"
    client = Client(lambda: stdio_client(stdio_params(folder, case)))
    client.case = case  # type: ignore[attr-defined]
    client.folder = folder  # type: ignore[attr-defined]
    yield client
    client.close()
    # The server removes its sandboxes as it exits (the client gives it a few seconds).
    assert wait_for(lambda: not containers_of(docker_engine, case), 30)


# -- stdio -----------------------------------------------------------------------------------


def test_lists_every_tool(stdio):
    assert set(stdio.tool_names()) >= {
        "run",
        "read_file",
        "write_file",
        "list_files",
        "glob",
        "grep",
        "process_list",
        "process_output",
        "process_kill",
        "sandbox_create",
        "sandbox_list",
        "sandbox_fork",
        "sandbox_snapshot",
        "sandbox_destroy",
    }


def test_run_echo(stdio, docker_engine):
    done = stdio.ok("run", command="echo hi; echo there >&2")
    assert (done["exit_code"], done["cause"]) == (0, "exit")
    assert (done["stdout"], done["stderr"]) == ("hi\n", "there\n")
    assert done["truncated"] == {"stdout": False, "stderr": False}
    # The sandbox carries the labels that find it, and the owner label `inv clean` reads.
    (container,) = containers_of(docker_engine, stdio.case, "sandbox")
    assert container.labels[TEST_LABEL] == SESSION_ID
    assert container.labels[labels.OWNER_PID].isdigit()
    assert container.labels[f"{labels.PREFIX}.mcp"] == "true"


def test_exit_codes_and_timeout_causes(stdio):
    failed = stdio.ok("run", command="exit 3")
    assert (failed["exit_code"], failed["cause"]) == (3, "exit")
    slow = stdio.call("run", command="echo started; sleep 30", timeout=1)
    assert not slow.isError
    assert slow.structuredContent["cause"] == "timeout"
    assert slow.structuredContent["exit_code"] == 124
    assert slow.structuredContent["stdout"] == "started\n"
    assert "timed out after 1 s" in slow.content[0].text


def test_truncation_is_reported(stdio):
    big = stdio.ok("run", command="head -c 3000000 /dev/zero | tr '\\0' x")
    assert big["truncated"]["stdout"] is True
    assert big["output_bytes"]["stdout"] == 3_000_000


def test_session_keeps_the_folder_and_exports(stdio):
    stdio.ok("run", command="mkdir -p deep/er && cd deep/er && export MARK=kept", session="s1")
    done = stdio.ok("run", command="pwd; echo $MARK", session="s1")
    assert done["stdout"] == "/workspace/deep/er\nkept\n"
    assert stdio.ok("run", command="echo ${MARK:-unset}")["stdout"] == "unset\n"


def test_files_round_trip(stdio):
    wrote = stdio.ok("write_file", path="pkg/mod.py", content="def f():\n    return 42\n")
    assert (wrote["path"], wrote["bytes"]) == ("/workspace/pkg/mod.py", 23)
    assert stdio.ok("read_file", path="pkg/mod.py")["content"] == "def f():\n    return 42\n"
    assert stdio.ok("read_file", path="/workspace/pkg/mod.py", max_bytes=3)["truncated"]
    stdio.ok("write_file", path="pkg/sub/data.txt", content="Answer 42\n")
    listed = stdio.ok("list_files", path="pkg")["entries"]
    assert [(e["name"], e["type"]) for e in listed] == [("mod.py", "file"), ("sub", "dir")]
    found = stdio.ok("glob", pattern="**/*.txt", path="pkg")["matches"]
    assert found == ["/workspace/pkg/sub/data.txt"]
    matches = stdio.ok("grep", pattern="42", path="pkg")["matches"]
    assert {(m["path"], m["line"]) for m in matches} == {
        ("/workspace/pkg/mod.py", 2),
        ("/workspace/pkg/sub/data.txt", 1),
    }
    assert stdio.ok("grep", pattern="answer", ignore_case=True, glob="*.txt")["matches"]
    assert stdio.ok("grep", pattern="absent-text", path="pkg")["matches"] == []
    missing = stdio.call("read_file", path="pkg/none.py")
    assert missing.isError and "No such file" in missing.content[0].text


def test_background_process_listed_read_and_killed(stdio):
    started = stdio.ok("run", command="echo up; sleep 300", background=True)
    process_id = started["process_id"]
    listed = stdio.ok("process_list")["processes"]
    assert any(p["id"] == process_id and p["state"] == "running" for p in listed)
    assert wait_for(lambda: stdio.ok("process_output", process_id=process_id)["stdout"] == "up\n")
    killed = stdio.ok("process_kill", process_id=process_id)
    assert killed["exit_code"] != 0
    after = stdio.ok("process_output", process_id=process_id)
    assert (after["running"], after["state"]) == (False, "killed")
    assert stdio.ok("run", command=COUNT_SLEEPS)["stdout"].strip() == "0"


def test_fork_snapshot_and_destroy(stdio, docker_engine):
    stdio.ok("write_file", path="forked.txt", content="from the parent\n")
    fork = stdio.ok("sandbox_fork")["sandbox"]
    assert stdio.ok("read_file", path="forked.txt", sandbox=fork)["content"] == "from the parent\n"
    stdio.ok("write_file", path="forked.txt", content="changed in the fork\n", sandbox=fork)
    assert stdio.ok("read_file", path="forked.txt")["content"] == "from the parent\n"
    listed = {s["name"]: s for s in stdio.ok("sandbox_list")["sandboxes"]}
    assert listed[fork]["origin"].startswith("fork of") and not listed[fork]["default"]
    # The server's labels (the session's test label among them) are on the fork too.
    held = docker_engine.containers.get(fork).labels
    assert held.get(f"{labels.PREFIX}.mcp") == "true" and held.get(TEST_LABEL) == SESSION_ID
    name = f"mcp-test-{uuid.uuid4().hex[:8]}"
    try:
        stdio.ok("sandbox_snapshot", name=name, sandbox=fork)
        born = stdio.ok("sandbox_create", snapshot=name, egress="none")["sandbox"]
        content = stdio.ok("read_file", path="forked.txt", sandbox=born)["content"]
        assert content == "changed in the fork\n"
        assert stdio.ok("sandbox_destroy", sandbox=born)["removed"]
    finally:
        snapshots.delete(stdio_settings(stdio.folder), name)
    assert stdio.ok("sandbox_destroy", sandbox=fork)["removed"]
    assert fork not in {s["name"] for s in stdio.ok("sandbox_list")["sandboxes"]}
    assert docker_engine.containers.list(all=True, filters={"name": f"^{fork}$"}) == []
    gone = stdio.call("run", command="true", sandbox=fork)
    assert gone.isError and "no sandbox" in gone.content[0].text


def stdio_settings(folder: Path):
    from stigmer_sandbox.config import load_settings

    return load_settings(folder, server_env(folder))


@pytest.mark.parametrize(
    ("tool", "arguments", "fragment"),
    [
        ("run", {}, "'command' is a required property"),
        ("run", {"command": 7}, "argument 'command'"),
        ("run", {"command": "true", "timeout": "soon"}, "argument 'timeout'"),
        ("run", {"command": "true", "colour": "red"}, "'colour' was unexpected"),
        ("run", {"command": "true", "timeout": 10**9}, "timeout must be between"),
        ("run", {"command": "true", "session": "a b"}, "invalid session name"),
        ("run", {"command": "true", "session": "s", "background": True}, "drop one"),
        ("run", {"command": "true", "sandbox": "nope"}, "no sandbox 'nope'"),
        ("process_output", {"process_id": "nope"}, "no background process"),
        ("sandbox_create", {"egress": "sideways"}, "argument 'egress'"),
        ("sandbox_snapshot", {"name": "bad name!"}, "sandbox_snapshot:"),
        ("no_such_tool", {}, "unknown tool"),
    ],
)
def test_bad_argument_is_an_error_result_and_the_server_goes_on(stdio, tool, arguments, fragment):
    result = stdio.call(tool, **arguments)
    assert result.isError
    text = result.content[0].text
    assert fragment in text and "\n" not in text and "Traceback" not in text
    assert stdio.ok("run", command="echo still here")["stdout"] == "still here\n"


CLIENT_SCRIPT = """
import asyncio, contextlib, json, sys
import httpx
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

async def main(spec):
    async with contextlib.AsyncExitStack() as stack:
        if spec["transport"] == "stdio":
            connect = stdio_client(StdioServerParameters(**spec["params"]))
        else:
            timeout = httpx.Timeout(30, read=300)
            http = httpx.AsyncClient(headers=spec["headers"], timeout=timeout)
            await stack.enter_async_context(http)
            connect = streamable_http_client(spec["url"], http_client=http)
        streams = await stack.enter_async_context(connect)
        session = await stack.enter_async_context(ClientSession(streams[0], streams[1]))
        await session.initialize()
        await session.call_tool("run", {"command": "true"})  # the sandbox is up
        print("calling", flush=True)
        await session.call_tool("run", {"command": "sleep 300"})

asyncio.run(main(json.loads(sys.argv[1])))
"""


def start_client(spec: dict[str, Any]) -> subprocess.Popen[str]:
    """A client process that calls `run sleep 300` once its server's sandbox is up."""
    import json

    child = subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, json.dumps(spec)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "calling"
    return child


def sleeps_in(container) -> int:
    output = container.exec_run(["sh", "-c", COUNT_SLEEPS]).output.decode()
    return int(output.strip() or 0)


def test_stdio_client_killed_mid_command_leaves_nothing(tmp_path, docker_engine):
    """The client dies: the server sees its stdin close, ends the command, exits and
    removes its sandbox (owner pid gone, container gone)."""
    case = f"mcp-killed-{uuid.uuid4().hex[:8]}"
    params = stdio_params(tmp_path, case)
    child = start_client({"transport": "stdio", "params": params.model_dump()})
    try:
        (container,) = containers_of(docker_engine, case, "sandbox")
        assert wait_for(lambda: sleeps_in(container) == 1)
        owner = int(container.labels[labels.OWNER_PID])
    finally:
        child.kill()
        child.wait()
    assert wait_for(lambda: not containers_of(docker_engine, case), 30)
    assert wait_for(lambda: _pid_gone(owner), 30)


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# -- streamable HTTP -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http_server(tmp_path_factory, docker_engine):
    """A server on a free loopback port with the bearer token; its URL and case label.
    Stopped with SIGTERM at the end: it must exit cleanly and remove its sandboxes."""
    folder = tmp_path_factory.mktemp("mcp-http")
    case = f"mcp-http-{uuid.uuid4().hex[:8]}"
    server = subprocess.Popen(
        server_command(case, "--http", "--port", "0"),
        env=server_env(folder),
        cwd=folder,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert server.stderr is not None
    first = server.stderr.readline()
    found = re.search(r"http://127\.0\.0\.1:\d+/mcp", first)
    assert found, first
    assert "from STIGMER_MCP_TOKEN" in server.stderr.readline()
    yield {"url": found.group(0), "case": case}
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0
    assert not containers_of(docker_engine, case)


@contextlib.asynccontextmanager
async def http_streams(url: str):
    """The SDK's streamable HTTP transport, with the bearer token on every request."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    timeout = httpx.Timeout(30, read=300)
    async with (
        httpx.AsyncClient(headers=headers, timeout=timeout) as http_client,
        streamable_http_client(url, http_client=http_client) as streams,
    ):
        yield streams


@pytest.fixture(scope="module")
def http(http_server):
    client = Client(lambda: http_streams(http_server["url"]))
    yield client
    client.close()


@pytest.mark.parametrize("header", [None, "Bearer wrong-token-of-some-length", f"Basic {TOKEN}"])
def test_http_refuses_a_request_without_the_token(http_server, header):
    headers = {"Accept": "application/json, text/event-stream"}
    if header:
        headers["Authorization"] = header
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    answer = httpx.post(http_server["url"], json=initialize, headers=headers, timeout=30)
    assert answer.status_code == 401


def test_http_client_with_the_token_runs_commands(http):
    assert "run" in http.tool_names()
    done = http.ok("run", command="echo over http")
    assert (done["stdout"], done["exit_code"], done["cause"]) == ("over http\n", 0, "exit")
    bad = http.call("run", command="true", timeout=-1)
    assert bad.isError and "argument 'timeout'" in bad.content[0].text
    assert http.ok("run", command="echo again")["stdout"] == "again\n"


def test_http_client_gone_mid_command_leaves_no_process(http, http_server):
    """A client whose connection drops while its command runs: the command is ended in
    the sandbox; the server (and its sandbox) go on serving."""
    http.ok("run", command="true")  # the default sandbox is up
    headers = {"Authorization": f"Bearer {TOKEN}"}
    child = start_client({"transport": "http", "url": http_server["url"], "headers": headers})
    try:
        assert wait_for(lambda: http.ok("run", command=COUNT_SLEEPS)["stdout"].strip() == "1")
    finally:
        child.kill()
        child.wait()
    assert wait_for(lambda: http.ok("run", command=COUNT_SLEEPS)["stdout"].strip() == "0")
    assert http.ok("run", command="echo served")["stdout"] == "served\n"
