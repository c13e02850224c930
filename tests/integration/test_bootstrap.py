"""Issue 12 on a real engine: MCP servers the way Stigmer starts them.

A sandbox started with npm and PyPI packages listed (Stigmer's
STIGMER_BOOTSTRAP_NPM_PACKAGES / STIGMER_BOOTSTRAP_PIP_PACKAGES) installs them as the
sandbox user, skips and reports one that does not exist, and each installed MCP server
answers an `initialize` request over stdio.
"""

from __future__ import annotations

import json
import time

import pytest

from stigmer_sandbox.runtime import Sandbox

from .conftest import TEST_LABELS
from .test_runtime import make_sandbox

# Pinned, so the test sees the same servers every run.
NPM_SERVER = "@modelcontextprotocol/server-filesystem@2026.8.31"
PIP_SERVER = "mcp-server-time==2026.10.19"
# Versions that do not exist, of packages only their owners can publish to.
NPM_MISSING = "@modelcontextprotocol/sdk@0.0.0-missing"
PIP_MISSING = "mcp-server-time==1999.1.1"

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "stigmer-sandbox-test", "version": "0"},
    },
}


@pytest.fixture(scope="module")
def box(tmp_path_factory, docker_engine):
    """One sandbox whose start installs a working and a missing package from each registry
    (the missing ones first: the rest must still install)."""
    tmp = tmp_path_factory.mktemp("bootstrap")
    packages = {
        "bootstrap_npm_packages": f"{NPM_MISSING}, {NPM_SERVER}",
        "bootstrap_pip_packages": f"{PIP_MISSING}, {PIP_SERVER}",
    }
    with make_sandbox(tmp, **packages) as sandbox:
        yield sandbox


def initialize(box: Sandbox, argv: list[str]) -> dict:
    """The server's answer to `initialize`, sent on its stdin (it exits at end of input)."""
    result = box.exec(argv, stdin=json.dumps(INITIALIZE) + "\n", timeout=60)
    assert result.exit_code == 0, (result.cause, result.stdout, result.stderr)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, (result.stdout, result.stderr)
    return json.loads(lines[0])


def test_start_reports_each_registry_with_its_time_and_the_failed_packages(box):
    notes = [note for note in box.notes if note.startswith("bootstrap ")]
    assert notes[0].startswith("bootstrap npm: 1 of 2 packages installed in "), notes
    assert notes[0].endswith(f" s ({NPM_SERVER})"), notes
    assert notes[1].startswith(f"bootstrap npm: {NPM_MISSING} failed, skipped: "), notes
    assert "No matching version" in notes[1], notes
    assert notes[2].startswith("bootstrap pip: 1 of 2 packages installed in "), notes
    assert notes[3].startswith(f"bootstrap pip: {PIP_MISSING} failed, skipped: "), notes
    assert "1999.1.1" in notes[3], notes
    assert len(notes) == 4, notes


def test_npm_mcp_server_answers_initialize_over_stdio(box):
    response = initialize(box, ["mcp-server-filesystem", "/workspace"])
    assert response["id"] == 1
    assert response["result"]["serverInfo"]["name"] == "secure-filesystem-server"
    assert response["result"]["protocolVersion"] == "2025-06-18"


def test_pypi_mcp_server_answers_initialize_over_stdio(box):
    response = initialize(box, ["mcp-server-time"])
    assert response["id"] == 1
    assert response["result"]["serverInfo"] == {"name": "mcp-time", "version": "2026.10.19"}


def test_servers_belong_to_the_sandbox_user_and_are_on_its_paths(box):
    script = (
        "stat -c %U /opt/node/lib/node_modules/@modelcontextprotocol/server-filesystem "
        '"$HOME/.local/share/uv/tools/mcp-server-time"; '
        "command -v mcp-server-filesystem mcp-server-time; "
        "bash -lc 'command -v mcp-server-time'"
    )
    result = box.exec(script, timeout=30)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split() == [
        "sandbox",
        "sandbox",
        "/opt/node/bin/mcp-server-filesystem",
        "/home/sandbox/.local/bin/mcp-server-time",
        "/home/sandbox/.local/bin/mcp-server-time",
    ]


def test_a_running_bootstrapped_sandbox_is_not_bootstrapped_again(box):
    before = list(box.notes)
    started = time.monotonic()
    box.up()
    assert box.notes == before
    # A second process (another `inv run`) finds the same running container.
    again = Sandbox(box.settings, extra_labels=TEST_LABELS, host_user=box.host_user)
    try:
        again.up()
        assert [note for note in again.notes if note.startswith("bootstrap")] == []
    finally:
        again.close()
    assert time.monotonic() - started < 10
