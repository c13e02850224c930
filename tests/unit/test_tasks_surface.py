"""The task tree as users see it: docstrings, help on every flag with its default."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stigmer_sandbox.tasks import build_namespace

ROOT = Path(__file__).resolve().parents[2]


def all_tasks():
    namespace = build_namespace()
    for name in namespace.task_names:
        yield name, namespace[name]


@pytest.mark.parametrize(("name", "task"), list(all_tasks()))
def test_every_task_has_a_one_line_docstring(name, task):
    doc = (task.__doc__ or "").strip()
    assert doc, name
    assert doc.splitlines()[0].endswith("."), name


@pytest.mark.parametrize(("name", "task"), list(all_tasks()))
def test_every_flag_has_help_with_its_default(name, task):
    for argument in task.get_arguments():
        help_text = argument.help or ""
        assert help_text, f"{name} --{argument.name} has no help"
        assert "default" in help_text, f"{name} --{argument.name}: help does not give the default"


@pytest.mark.parametrize(("name", "task"), list(all_tasks()))
def test_no_flag_is_typed_by_a_numeric_default(name, task):
    """Invoke casts a flag with its default's type, outside any task: `-n abc` for a default
    of 20 is a traceback. Numeric flags default to None and the task layer parses them."""
    for argument in task.get_arguments():
        assert argument.kind not in (int, float), f"{name} --{argument.name} is cast by Invoke"


def test_expected_namespaces_exist():
    names = set(build_namespace().task_names)
    assert {
        "doctor",
        "engine.install",
        "engine.start",
        "engine.stop",
        "sandbox.bootstrap-base",
    } <= names


def run_cli(args, cwd, extra_env=None):
    env = {**os.environ, "NO_COLOR": "1", **(extra_env or {})}
    return subprocess.run(
        [sys.executable, "-m", "invoke", "--search-root", str(cwd), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("text", ["stigmer: [unclosed\n", "stigmer:\n  colour: red\n"])
def test_broken_project_file_gives_one_line_no_traceback(tmp_path, text):
    (tmp_path / "tasks.py").write_text((ROOT / "tasks.py").read_text(), encoding="utf-8")
    (tmp_path / "invoke.yaml").write_text(text, encoding="utf-8")
    done = run_cli(["--list"], tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "invoke.yaml" in done.stderr


def test_bad_flag_value_gives_one_line(tmp_path):
    done = run_cli(
        ["sandbox.bootstrap-base", "--mirror", "x"], ROOT, {"INVOKE_STIGMER_BASE_IMAGE": "Bad Name"}
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "base_image" in done.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["run", "--timeout", "abc", "true"], "--timeout must be a number"),
        (["fix-permissions", "--uid", "x"], "--uid must be a whole number"),
        (["fix-permissions", "--uid", "-5"], "between 0 and"),
        (["sandbox.history", "-n", "abc"], "error: -n must be a whole number"),
        (["sandbox.up", "--timeout", "1.5e400"], "--timeout must be more than 0"),
        (["sandbox.up", "--timeout", "nan"], "--timeout must be more than 0"),
        (["compose.up", "--timeout", "-1"], "--timeout must be more than 0"),
        (["engine.start", "--timeout", "soon"], "--timeout must be a number"),
    ],
)
def test_bad_numeric_flag_gives_one_line(args, fragment):
    """Invoke types a None-defaulted flag as text; the task layer parses it, before any
    engine call."""
    done = run_cli(args, ROOT, {"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert fragment in done.stderr


def test_console_script_lists_the_same_tasks(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", "from stigmer_sandbox.cli import main; main()", "--list"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "sandbox.bootstrap-base" in done.stdout and "doctor" in done.stdout


def test_start_up_leaves_the_heavy_modules_for_the_tasks_that_use_them():
    """Every `inv` builds the task tree; the runtime, compose, the engine helpers and the
    docker SDK are imported by the tasks that need them, not at start-up."""
    heavy = (
        "docker",
        "stigmer_sandbox.runtime",
        "stigmer_sandbox.host.compose",
        "stigmer_sandbox.host.daemon",
        "stigmer_sandbox.host.cleanup",
        "stigmer_sandbox.images",
        "stigmer_sandbox.engine",
    )
    code = (
        "import sys\n"
        "from stigmer_sandbox.tasks import build_namespace\n"
        "build_namespace()\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
