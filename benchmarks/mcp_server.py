"""The MCP server's overhead (issue 24): one `echo` through its `run` tool beside `Sandbox.exec`.

The server runs as `stigmer-sandbox mcp` (stdio), started by the official SDK's client as
any MCP client starts it; after a first, untimed call has started its sandbox (warm), each
timed call is one `tools/call` of `run` with `echo hi`: JSON-RPC over the server's stdin
and stdout, the argument check, a worker thread, the command through the sandbox's agent
channel, the mapping to a `CallToolResult`. The baseline is `Sandbox.exec("echo hi")` from
this process on the very same sandbox (attached by name: never recreated or removed from
here), in blocks A B B A (see `abba_ms`'s reasoning), p50 and p95 of `--calls` each.

Everything runs under a scratch state folder and workspace, the server's sandbox carries
the label `stigmer-bench.run`, and the server removes it when the client closes.

    python benchmarks/mcp_server.py [--calls N]
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from _common import count_option, report_latency
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from stigmer_sandbox import config
from stigmer_sandbox.runtime import Sandbox

RUN = uuid.uuid4().hex[:8]
CLI = "import sys; from stigmer_sandbox.cli import main; sys.argv[0] = 'stigmer-sandbox'; main()"
ECHO = "echo hi"


def server_params(scratch: Path) -> tuple[StdioServerParameters, dict[str, str]]:
    """How the client starts the server, and the environment its settings come from."""
    env = {
        **os.environ,
        "NO_COLOR": "1",
        "INVOKE_STIGMER_WORKSPACE": str(scratch / "workspace"),
        "INVOKE_STIGMER_LOGS": str(scratch / "logs"),
        "INVOKE_STIGMER_STATE_DIR": str(scratch / "state"),
    }
    args = ["-c", CLI, "mcp", "--label", f"stigmer-bench.run={RUN}"]
    return StdioServerParameters(command=sys.executable, args=args, env=env, cwd=scratch), env


async def abba(actions: dict[str, Callable[[], Awaitable[None]]], calls: int) -> dict[str, list]:
    """Milliseconds per call of each action in blocks A B B A, each block after one
    untimed call (`abba_ms` for actions that are awaited)."""
    samples: dict[str, list[float]] = {name: [] for name in actions}
    order = [*actions, *reversed(actions)]
    for turn, name in enumerate(order):
        await actions[name]()
        count = calls // 2 if turn < len(actions) else calls - calls // 2
        for _ in range(count):
            started = time.perf_counter()
            await actions[name]()
            samples[name].append((time.perf_counter() - started) * 1000)
    return samples


async def measure(calls: int, scratch: Path) -> None:
    params, env = server_params(scratch)
    async with stdio_client(params) as streams, ClientSession(*streams[:2]) as session:
        await session.initialize()
        first = time.perf_counter()
        warm = await session.call_tool("run", {"command": ECHO})
        print(f"first call (starts the server's sandbox): {time.perf_counter() - first:.2f} s")
        assert not warm.isError and warm.structuredContent, warm.content
        name = warm.structuredContent["sandbox"]
        settings = config.load_settings(scratch, env)
        sandbox = Sandbox.attach(name, settings)  # the server's: never recreated from here
        sandbox.connect()

        async def through_mcp() -> None:
            done = await session.call_tool("run", {"command": ECHO})
            assert done.structuredContent["stdout"] == "hi\n", done.content

        async def direct() -> None:
            assert sandbox.exec(ECHO).stdout == "hi\n"

        figure = "MCP run tool over stdio ('echo hi')"
        samples = await abba({figure: through_mcp, "Sandbox.exec": direct}, calls)
        sandbox.close()
    report_latency(
        figure,
        samples[figure],
        "Sandbox.exec('echo hi') same sandbox",
        samples["Sandbox.exec"],
        goals=("ratio <= 2", ""),
    )


def main(calls: int) -> None:
    with tempfile.TemporaryDirectory(prefix="stigmer-bench-mcp-") as scratch:
        asyncio.run(measure(calls, Path(scratch)))


if __name__ == "__main__":
    main(count_option(__doc__, "calls", 200, "timed calls of each kind"))
