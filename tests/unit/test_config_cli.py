"""Bad configuration through the command line, as a user meets it: `inv` and the
`stigmer-sandbox` console script. One line naming the file (or variable) and the key,
or with --json one JSON object on stdout; a non-zero exit; never a traceback.
No engine is needed: every case fails before a task touches one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import ROOT, run_inv

CONSOLE_SCRIPT = Path(sys.executable).with_name("stigmer-sandbox")
BAD_FILES = [
    ("memory: lots", "key 'memory' must be a size like 512m or 2g"),
    ("timeout: -1", "key 'timeout' must be more than 0"),
    ("timeout: 0", "key 'timeout' must be more than 0"),
    ("output_limit: -1", "key 'output_limit' must be more than 1"),
    ("cpus: lots", "key 'cpus' must be a number"),
    ("memroy: 2g", "unknown key 'memroy'"),
    ("bootstrap_pip_packages: [a, b]", "key 'bootstrap_pip_packages' must be text"),
    ("sandbox: {memory: lots}", "unknown key 'sandbox'"),
    ('workspace: "a\\0b"', "key 'workspace' must be text without NUL"),
]
# Invoke casts these itself, with a traceback, before any task runs.
INVOKE_TRIPS_OVER = [
    ("INVOKE_STIGMER_TIMEOUT", "abc", "INVOKE_STIGMER_TIMEOUT: must be a number"),
    ("INVOKE_STIGMER_PIDS_LIMIT", "1.5", "INVOKE_STIGMER_PIDS_LIMIT: must be a whole number"),
]
# Invoke reads any word as true; the tasks refuse it.
INVOKE_ACCEPTS = [("INVOKE_STIGMER_MOUNT_AWS", "maybe", "must be true or false")]
BAD_VARIABLES = INVOKE_TRIPS_OVER + INVOKE_ACCEPTS
# sandbox.ls lists the engine's sandboxes without reading settings: only a startup check
# (the project file, the variables) stops it.
JSON_TASKS = [["doctor", "--json"], ["run", "--json", "true"], ["sandbox.ls", "--json"]]
SETTINGS_JSON_TASKS = JSON_TASKS[:2]


@pytest.fixture
def project(tmp_path) -> Path:
    """A project folder with this checkout's tasks.py and no configuration yet."""
    (tmp_path / "tasks.py").write_text((ROOT / "tasks.py").read_text())
    return tmp_path


def configure(project: Path, line: str) -> Path:
    path = project / "invoke.yaml"
    path.write_text(f"stigmer:\n  {line}\n", encoding="utf-8")
    return path


def console_script(*args: str, cwd: Path, env: dict[str, str] | None = None):
    merged = {**os.environ, "NO_COLOR": "1", **(env or {})}
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *args],
        cwd=cwd,
        env=merged,
        capture_output=True,
        text=True,
        check=False,
    )


def assert_one_line(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]


def assert_json_error(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    report = json.loads(done.stdout)
    assert set(report) <= {"error", "hint", "details"}, report
    assert all(fragment in report["error"] for fragment in fragments), report


@pytest.mark.parametrize(("line", "expected"), BAD_FILES)
def test_inv_names_the_file_and_the_key(project, line, expected):
    path = configure(project, line)
    assert_one_line(run_inv("doctor", cwd=project), str(path), expected)


@pytest.mark.parametrize(("line", "expected"), BAD_FILES)
def test_the_console_script_names_the_file_and_the_key(project, line, expected):
    path = configure(project, line)
    assert_one_line(console_script("doctor", cwd=project), str(path), expected)


@pytest.mark.parametrize("task", JSON_TASKS)
@pytest.mark.parametrize(("line", "expected"), BAD_FILES[:3])
def test_the_console_script_answers_json_with_a_json_error(project, line, expected, task):
    path = configure(project, line)
    assert_json_error(console_script(*task, cwd=project), str(path), expected)


@pytest.mark.parametrize("task", JSON_TASKS)
def test_inv_answers_json_with_a_json_error_for_a_bad_project_file(project, task):
    path = configure(project, "memory: lots")
    assert_json_error(run_inv(*task, cwd=project), str(path), "key 'memory'")


@pytest.mark.parametrize("task", SETTINGS_JSON_TASKS)
def test_inv_answers_json_with_a_json_error_for_another_file(project, task):
    other = project / "other.yaml"
    other.write_text("stigmer:\n  timeout: -5\n")
    done = run_inv("-f", str(other), *task, cwd=project)
    assert_json_error(done, str(other), "key 'timeout' must be more than 0")


@pytest.mark.parametrize("task", SETTINGS_JSON_TASKS)
def test_inv_answers_json_for_a_variable_invoke_can_read(project, task):
    done = run_inv(*task, cwd=project, env={"INVOKE_STIGMER_OUTPUT_LIMIT": "-1"})
    assert_json_error(done, "INVOKE_STIGMER_OUTPUT_LIMIT: key 'output_limit'")


@pytest.mark.parametrize(("variable", "value", "expected"), BAD_VARIABLES)
def test_the_console_script_names_a_bad_variable(project, variable, value, expected):
    done = console_script("doctor", cwd=project, env={variable: value})
    assert_one_line(done, expected)
    done = console_script("doctor", "--json", cwd=project, env={variable: value})
    assert_json_error(done, expected)


@pytest.mark.parametrize(("variable", "value", "expected"), INVOKE_TRIPS_OVER)
def test_inv_names_a_bad_variable_invoke_would_trip_over(project, variable, value, expected):
    assert_one_line(run_inv("doctor", cwd=project, env={variable: value}), expected)


@pytest.mark.parametrize(("variable", "value", "expected"), INVOKE_ACCEPTS)
def test_inv_refuses_a_variable_invoke_reads_loosely(project, variable, value, expected):
    assert_one_line(run_inv("doctor", cwd=project, env={variable: value}), expected)
    done = run_inv("doctor", "--json", cwd=project, env={variable: value})
    assert_json_error(done, expected)
