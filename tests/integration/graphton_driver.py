"""Drives the Graphton backend against a real sandbox; run by test_graphton.py inside the
Graphton virtualenv (Graphton 1.0.4 pins deepagents 0.4, which the project venv cannot
hold). It records what it observes in a JSON report; the test asserts on it.

    python graphton_driver.py '{"project": ..., "tmp": ..., "labels": {...}}'

Every container it starts carries the given test labels and is removed before it exits.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import graphton
import graphton.core.config
import graphton.core.sandbox_factory
from deepagents.backends.protocol import SandboxBackendProtocol
from graphton.core.backends import DeepAgentsBackendAdapter
from graphton.core.tool_wrappers import create_platform_tool_wrappers
from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from pydantic import field_validator

from stigmer_sandbox import config, engine
from stigmer_sandbox.integrations.graphton import (
    SANDBOX_TYPE,
    StigmerGraphtonBackend,
    from_sandbox_config,
)
from stigmer_sandbox.runtime import LocalSandbox

SLOW = "echo first; sleep 2; echo second"


def result(done: Any) -> dict[str, Any]:
    return {"exit_code": done.exit_code, "stdout": done.stdout, "stderr": done.stderr}


def outcome(action: Any) -> str:
    """What a call returned, or the exception it raised, as text."""
    try:
        return f"ok: {action()}"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def commands(backend: StigmerGraphtonBackend) -> dict[str, Any]:
    started = time.monotonic()
    timed_out = backend.execute("echo started; sleep 30", timeout=2)
    timeout_s = time.monotonic() - started
    broken = StigmerGraphtonBackend(backend.sandbox, env_vars={"BAD=NAME": "x"})
    with_env = StigmerGraphtonBackend(backend.sandbox, env_vars={"A": "1"})
    return {
        "combined": result(backend.execute("echo out; echo err >&2; echo out2; exit 3")),
        "env": result(with_env.execute("echo $A")),
        "cwd_user": result(backend.execute("pwd; id -un")),
        "missing": result(backend.execute("no-such-command-xyz")),
        "unrunnable": result(broken.execute("echo never")),
        "timeout": {**result(timed_out), "seconds": timeout_s},
    }


async def streaming(backend: StigmerGraphtonBackend) -> dict[str, Any]:
    """Chunks with their arrival time, the end, and how often the loop ran meanwhile."""
    loop_thread = threading.get_ident()
    chunks: list[tuple[float, str, bool]] = []
    stop = asyncio.Event()

    async def ticker() -> int:
        ticks = 0
        while not stop.is_set():
            await asyncio.sleep(0.05)
            ticks += 1
        return ticks

    ticks = asyncio.create_task(ticker())
    started = time.monotonic()
    done = await backend.execute_streaming(
        SLOW,
        timeout=30,
        on_chunk=lambda c: chunks.append(
            (time.monotonic() - started, c, threading.get_ident() == loop_thread)
        ),
    )
    ended = time.monotonic() - started
    stop.set()
    long_line: list[str] = []  # 70,000 two-byte characters and no newline
    await backend.execute_streaming(
        'python3 -c "import sys; sys.stdout.write(chr(233) * 70000)"',
        on_chunk=long_line.append,
    )
    return {
        "chunks": chunks,
        "ended": ended,
        "ticks": await ticks,
        **result(done),
        "long_line": [len(chunk) for chunk in long_line],
        "long_line_intact": "".join(long_line) == "\u00e9" * 70000,
    }


class Events(AsyncCallbackHandler):
    """Graphton's execute tool reports each chunk as a `tool_progress` custom event."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.events: list[tuple[float, str]] = []

    async def on_custom_event(self, name: str, data: Any, **_kwargs: Any) -> None:
        if name == "tool_progress":
            self.events.append((time.monotonic() - self.started, data["chunk"]))


async def graphton_tools(backend: StigmerGraphtonBackend) -> dict[str, Any]:
    """Graphton's own tool wrappers and deepagents adapter over this backend."""
    tools = {tool.name: tool for tool in create_platform_tool_wrappers(backend)}

    async def call(name: str, config_: Any = None, **args: Any) -> str:
        message = await tools[name].ainvoke(
            {"type": "tool_call", "name": name, "args": args, "id": "call-1"}, config=config_
        )
        return str(message.content)

    events = Events()
    execute = await call("execute", {"callbacks": [events]}, command=SLOW + "; exit 4", timeout=30)
    ended = time.monotonic() - events.started
    adapter = DeepAgentsBackendAdapter(backend)
    return {
        "execute": execute,
        "events": events.events,
        "ended": ended,
        "write": await call("write", path="src/app.py", content="def f():\n    return 1\n"),
        "edit": await call("edit", path="src/app.py", old_text="return 1", new_text="return 2"),
        "read": await call("read", path="src/app.py"),
        "ls": await call("ls", path="src"),
        "glob": await call("glob", pattern="*.py"),
        "grep": await call("grep", pattern="return 2"),
        "delete": await call("delete", path="src/app.py"),
        "read_deleted": await call("read", path="src/app.py"),
        "adapter_protocol": isinstance(adapter, SandboxBackendProtocol),
        "adapter_execute": adapter.execute("echo via-adapter").output,
        "adapter_aexecute": (await adapter.aexecute("echo async", timeout=10)).output,
        "adapter_ls": sorted(str(info["path"]) for info in adapter.ls_info("src")),
    }


def files(backend: StigmerGraphtonBackend, host_workspace: Path) -> dict[str, Any]:
    backend.write("notes/a.txt", "héllo\n")
    backend.write("/notes/abs.txt", "absolute means in the workspace\n")
    backend.write("/workspace/notes/prefixed.txt", "workspace prefix\n")
    backend.write("node_modules/skip.js", "")
    backend.write(".hidden", "")
    backend.write(".gitignore", "ignored.log\n")
    backend.write("ignored.log", "")
    backend.write("shared.txt", "")
    backend.execute("printf '\\377\\376' > bin.dat")
    host = host_workspace / "notes"
    return {
        "read": backend.read("notes/a.txt"),
        "read_dir": backend.read("notes"),
        "host_files": sorted(p.name for p in host.iterdir()) if host.is_dir() else [],
        "owner": backend.execute("stat -c %U notes/a.txt").stdout.strip(),
        "list_root": sorted(backend.list_files(".")),
        "list_notes": sorted(backend.list_files("/workspace/notes")),
        "list_missing": backend.list_files("no-such-dir"),
        "list_file": outcome(lambda: backend.list_files("notes/a.txt")),
        "is_dir": [backend.is_directory(p) for p in ("notes", "notes/a.txt", "nowhere", "../..")],
        "overwrite": outcome(lambda: backend.write("notes/a.txt", "second\n")),
        "reread": backend.read("notes/a.txt"),
        "delete": outcome(lambda: backend.delete("notes/a.txt")),
        "delete_again": outcome(lambda: backend.delete("notes/a.txt")),
        "delete_dir": outcome(lambda: backend.delete("notes")),
        "read_missing": outcome(lambda: backend.read("notes/a.txt")),
        "read_outside": outcome(lambda: backend.read("../../etc/passwd")),
        "write_under_file": outcome(lambda: backend.write("shared.txt/child", "y")),
        "read_binary": outcome(lambda: backend.read("bin.dat")),
    }


class ToolCallingModel(GenericFakeChatModel):
    """Answers with the scripted messages whatever tools it is given."""

    def bind_tools(self, *_args: Any, **_kwargs: Any) -> ToolCallingModel:
        return self


class StigmerAgentConfig(graphton.core.config.AgentConfig):
    """Graphton 1.0.4's config with `stigmer-sandbox` among the sandbox types."""

    @field_validator("sandbox_config")
    @classmethod
    def validate_sandbox_config(cls, value: Any) -> Any:
        if value and value.get("type") == SANDBOX_TYPE:
            return value
        return graphton.core.config.AgentConfig.validate_sandbox_config(value)


def agent(
    backend: StigmerGraphtonBackend, settings: config.Settings, labels: dict[str, str]
) -> Any:
    """A whole Graphton agent on the sandbox, with the two changes docs/agent-runner.md asks
    of Graphton made here by patching: the config accepts the type, the factory builds it."""
    original = graphton.core.sandbox_factory.create_sandbox_backend

    def create_sandbox_backend(sandbox_config: dict[str, Any]) -> Any:
        if sandbox_config.get("type") == SANDBOX_TYPE:
            return from_sandbox_config(sandbox_config, settings=settings, extra_labels=labels)
        return original(sandbox_config)

    graphton.core.sandbox_factory.create_sandbox_backend = create_sandbox_backend
    graphton.core.config.AgentConfig = StigmerAgentConfig
    call = {"name": "execute", "args": {"command": "echo from-agent; pwd; id -un"}, "id": "t1"}
    model = ToolCallingModel(
        messages=iter([AIMessage(content="", tool_calls=[call]), AIMessage(content="done")])
    )
    graph = graphton.create_deep_agent(
        model=model,
        system_prompt="You run shell commands for an integration test.",
        sandbox_config={
            "type": SANDBOX_TYPE,
            "sandbox_name": backend.id,
            "root_dir": str(settings.path("workspace")),
        },
    )
    state = asyncio.run(graph.ainvoke({"messages": [{"role": "user", "content": "run it"}]}))
    return [str(message.content) for message in state["messages"]]


def lifecycle(
    first: StigmerGraphtonBackend, settings: config.Settings, labels: dict[str, str]
) -> dict[str, Any]:
    """A backend built from Graphton's sandbox_config with a name wraps that sandbox and
    leaves it running; the owner's close() removes it."""
    first.write("shared.txt", "from the first backend\n")
    workspace = str(settings.path("workspace"))
    config_ = {"type": SANDBOX_TYPE, "sandbox_name": first.id, "root_dir": workspace}
    second = from_sandbox_config(config_, settings=settings, extra_labels=labels)
    seen = second.read("shared.txt")
    same = second.id == first.id
    second.close()
    alive_after_wrapper = first.execute("echo alive").stdout
    name = first.id
    first.close()
    return {
        "seen": seen,
        "same": same,
        "alive_after_wrapper": alive_after_wrapper,
        "exists_after_owner_closed": engine.find_container(name) is not None,
    }


def auto_fallback(settings: config.Settings, tmp: Path) -> dict[str, Any]:
    """Auto mode without the image: local, with a note saying why."""
    config_ = {
        "type": SANDBOX_TYPE,
        "execution_mode": "auto",
        "image": "stigmer-sandbox-missing:none",
        "root_dir": str(tmp / "local-workspace"),
    }
    with from_sandbox_config(config_, settings=settings) as backend:
        backend.write("local.txt", "on the host\n")
        return {
            "local": isinstance(backend.sandbox, LocalSandbox),
            "notes": backend.sandbox.notes,
            "pwd": backend.execute("pwd").stdout.strip(),
            "root_dir": backend.root_dir,
            "host_file": (tmp / "local-workspace" / "local.txt").read_text(),
        }


def main(args: dict[str, Any]) -> dict[str, Any]:
    tmp, labels = Path(args["tmp"]), dict(args["labels"])
    # None of the caller's settings but the test run's isolation (a gVisor run's).
    isolation = {k: v for k, v in os.environ.items() if k == f"{config.ENV_PREFIX}ISOLATION"}
    settings = config.load_settings(args["project"], environ=isolation).replace(
        workspace=str(tmp / "workspace"),
        logs=str(tmp / "logs"),
        state_dir=str(tmp / "state"),
        execution_mode="sandbox",
    )
    report: dict[str, Any] = {}
    started = time.monotonic()
    backend = StigmerGraphtonBackend(settings=settings, extra_labels=labels)
    try:
        report["startup_s"] = time.monotonic() - started
        report["id"] = backend.id
        report["commands"] = commands(backend)
        report["streaming"] = asyncio.run(streaming(backend))
        report["tools"] = asyncio.run(graphton_tools(backend))
        report["files"] = files(backend, settings.path("workspace"))
        report["agent"] = agent(backend, settings, labels)
        report["lifecycle"] = lifecycle(backend, settings, labels)
    finally:
        backend.close()
    report["auto"] = auto_fallback(settings, tmp)
    return report


if __name__ == "__main__":
    arguments = json.loads(sys.argv[1])
    Path(arguments["report"]).write_text(json.dumps(main(arguments)), encoding="utf-8")
