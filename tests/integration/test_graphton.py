"""The Graphton backend against a real, labelled sandbox, in Graphton's own environment.

Graphton 1.0.4 pins deepagents 0.4 and the project venv holds 0.7, so the test builds a
virtualenv of its own with what `pip install 'stigmer-sandbox[graphton]'` would bring
(the `graphton` extra and the core dependencies, read from pyproject.toml) and runs
`graphton_driver.py` in it. The package itself comes from this checkout through
PYTHONPATH, so editing it never makes the venv stale; the venv is keyed by the
requirements and the interpreter and kept under the project's state folder
(`.state/test-venvs/`), reused while they are unchanged. uv (a dev dependency) makes it:
its first creation takes about ten seconds (pip took a minute); later runs reuse it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from stigmer_sandbox.config import load_settings

from ..conftest import ROOT
from .conftest import TEST_LABELS

DRIVER = Path(__file__).with_name("graphton_driver.py")
INSTALL_TIMEOUT_S = 900
DRIVER_TIMEOUT_S = 300
UV = Path(sys.executable).with_name("uv")
# uv's lines worth showing while the venv is made (the rest is kept for a failure).
PROGRESS = ("Resolved ", "Prepared ", "Installed ", "error")


def requirements() -> list[str]:
    """The core dependencies and the `graphton` extra, as pyproject.toml declares them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["graphton"]]


def venv_dir(wanted: list[str]) -> Path:
    key = json.dumps([sys.version_info[:2], sorted(wanted)]).encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    return load_settings(ROOT, environ={}).path("state_dir") / "test-venvs" / f"graphton-{digest}"


def announce(request: pytest.FixtureRequest, text: str) -> None:
    """A progress line the user sees even while pytest captures output."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        sys.stderr.write(f"\n[graphton venv] {text}")
        sys.stderr.flush()


def uv(request: pytest.FixtureRequest, *arguments: str) -> None:
    lines: list[str] = []
    with subprocess.Popen(
        [str(UV), *arguments], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as running:
        assert running.stdout is not None
        for line in running.stdout:
            lines.append(line.rstrip())
            if line.lstrip().startswith(PROGRESS):
                announce(request, line.strip()[:120])
        code = running.wait(timeout=INSTALL_TIMEOUT_S)
    assert code == 0, f"uv {arguments[0]} failed:\n" + "\n".join(lines[-40:])


def create_venv(request: pytest.FixtureRequest, target: Path, wanted: list[str]) -> None:
    """A fresh venv at `target`, marked complete only once everything is installed."""
    started = time.monotonic()
    announce(request, f"creating {target} (reused while unchanged)")
    shutil.rmtree(target, ignore_errors=True)
    uv(request, "venv", "--quiet", "--python", sys.executable, str(target))
    uv(request, "pip", "install", "--python", str(target / "bin" / "python"), *wanted)
    (target / "complete").write_text(json.dumps(wanted), encoding="utf-8")
    for stale in target.parent.glob("graphton-*"):  # venvs of older requirements
        if stale != target and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    announce(request, f"created in {time.monotonic() - started:.0f} s\n")


@pytest.fixture(scope="module")
def graphton_python(request: pytest.FixtureRequest) -> Path:
    """The cached venv's interpreter, made first if missing (one maker at a time)."""
    wanted = requirements()
    target = venv_dir(wanted)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "graphton.lock", "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "complete").is_file():
            create_venv(request, target, wanted)
    return target / "bin" / "python"


@pytest.fixture(scope="module")
def report(graphton_python: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run of the driver in the Graphton venv: everything it observed."""
    tmp = tmp_path_factory.mktemp("graphton")
    out = tmp / "report.json"
    args = {"project": str(ROOT), "tmp": str(tmp), "labels": TEST_LABELS, "report": str(out)}
    done = subprocess.run(
        [str(graphton_python), str(DRIVER), json.dumps(args)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=DRIVER_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, f"driver failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return dict(json.loads(out.read_text(encoding="utf-8")))


@pytest.fixture
def commands(report: dict[str, Any]) -> dict[str, Any]:
    return dict(report["commands"])


def test_execute_returns_the_exit_code_and_output_in_the_order_written(commands):
    assert commands["combined"] == {"exit_code": 3, "stdout": "out\nerr\nout2\n", "stderr": ""}
    assert commands["env"]["stdout"] == "1\n"
    assert commands["cwd_user"]["stdout"].split() == ["/workspace", "sandbox"]


def test_a_failing_command_is_a_result_never_an_exception(commands):
    missing = commands["missing"]
    assert missing["exit_code"] == 127 and "not found" in missing["stdout"]
    unrunnable = commands["unrunnable"]
    assert unrunnable["exit_code"] == 1 and unrunnable["stderr"].startswith("Error: ")


def test_a_timeout_is_124_with_the_partial_output_and_the_reason(commands):
    timed_out = commands["timeout"]
    assert timed_out["exit_code"] == 124
    assert timed_out["stdout"].startswith("started\n")
    assert "timed out after 2 seconds" in timed_out["stdout"]
    assert timed_out["seconds"] < 10


def test_streaming_delivers_lines_on_the_loop_before_the_command_ends(report):
    streamed = report["streaming"]
    (first_at, first, on_loop), (second_at, second, _) = streamed["chunks"]
    assert (first, second) == ("first\n", "second\n") and on_loop
    # `sleep 2` separates the lines: the first must arrive while the command still runs.
    assert streamed["ended"] - first_at > 1.5 and second_at - first_at > 1.5
    assert streamed["ticks"] >= 15, "the event loop was blocked while the command ran"
    assert (streamed["exit_code"], streamed["stdout"]) == (0, "first\nsecond\n")
    # A line without an end is passed on in 64 Ki-character pieces, characters intact.
    assert streamed["long_line"] == [65536, 70000 - 65536] and streamed["long_line_intact"]


def test_graphtons_execute_tool_streams_progress_events_live(report):
    tools = report["tools"]
    assert tools["execute"] == "Command failed (exit code 4)\nfirst\nsecond\n"
    chunks = [chunk for _at, chunk in tools["events"]]
    assert chunks[1:] == ["first\n", "second\n"]
    first_at = tools["events"][1][0]
    assert tools["ended"] - first_at > 1.5


def test_graphtons_file_tools_and_deepagents_adapter_work_over_the_backend(report):
    tools = report["tools"]
    assert tools["write"].startswith("Successfully wrote")
    assert tools["edit"].startswith("Successfully edited")
    assert tools["read"].endswith("return 2\n")
    assert (tools["ls"], tools["glob"]) == ("app.py", "src/app.py")
    assert "src/app.py:2:    return 2" in tools["grep"]
    assert tools["delete"] == "Deleted 'src/app.py'"
    assert tools["read_deleted"].startswith("Error: File not found")
    assert tools["adapter_protocol"]
    assert (tools["adapter_execute"], tools["adapter_aexecute"]) == ("via-adapter\n", "async\n")
    assert tools["adapter_ls"] == []  # the file was deleted; src/ is empty


def test_files_by_workspace_path_as_the_sandbox_user(report):
    files = report["files"]
    assert files["read"] == "héllo\n"
    assert files["host_files"] == ["a.txt", "abs.txt", "prefixed.txt"]
    assert files["owner"] == "sandbox"
    assert files["read_dir"] == "[Directory: notes]\n\n  a.txt\n  abs.txt\n  prefixed.txt"
    # Hidden entries, FilesystemBackend's skipped folders and .gitignore'd files are left out.
    assert files["list_root"] == ["bin.dat", "notes", "shared.txt", "src"]
    assert files["list_notes"] == ["a.txt", "abs.txt", "prefixed.txt"]
    assert files["list_missing"] == []
    assert files["list_file"].startswith("NotADirectoryError")
    assert files["is_dir"] == [True, False, False, False]
    assert (files["overwrite"], files["reread"]) == ("ok: None", "second\n")


def test_file_errors_are_the_exceptions_graphton_expects(report):
    files = report["files"]
    assert files["delete"] == "ok: Deleted 'notes/a.txt'"
    assert files["delete_again"].startswith("FileNotFoundError")
    assert files["delete_dir"].startswith("IsADirectoryError")
    assert files["read_missing"].startswith("FileNotFoundError")
    assert files["read_outside"].startswith("ValueError") and "outside" in files["read_outside"]
    assert files["write_under_file"].startswith(("ValueError", "NotADirectoryError", "OSError"))
    assert files["read_binary"].startswith("ValueError") and "UTF-8" in files["read_binary"]


def test_a_graphton_agent_runs_its_tools_in_the_sandbox(report):
    # Graphton's create_deep_agent with sandbox_config type stigmer-sandbox (the two
    # changes docs/agent-runner.md asks of Graphton, patched in by the driver).
    assert report["agent"][2] == "from-agent\n/workspace\nsandbox\n"
    assert report["agent"][3] == "done"


def test_a_named_sandbox_is_shared_and_only_its_owner_removes_it(report):
    lifecycle = report["lifecycle"]
    assert lifecycle["same"] and lifecycle["seen"] == "from the first backend\n"
    assert lifecycle["alive_after_wrapper"] == "alive\n"
    assert not lifecycle["exists_after_owner_closed"]


def test_auto_mode_without_the_image_runs_locally_and_says_why(report):
    auto = report["auto"]
    assert auto["local"] and auto["host_file"] == "on the host\n"
    assert auto["pwd"] == auto["root_dir"]
    assert any("auto: local" in note and "does not exist" in note for note in auto["notes"])
