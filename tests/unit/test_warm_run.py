"""`stigmer-sandbox run` without Invoke: which command lines it takes (the rest is Invoke's),
and the request it sends (the same as `inv run`'s)."""

from __future__ import annotations

import pytest

from stigmer_sandbox import warm_run


@pytest.mark.parametrize(
    ("argv", "flags"),
    [
        (["run", "echo hi"], {"command": "echo hi", "env": []}),
        (
            ["run", "--json", "--timeout", "5", "--env", "A=1", "--env=B=2", "ls", "--session=s"],
            {"command": "ls", "json": True, "timeout": 5.0, "env": ["A=1", "B=2"], "session": "s"},
        ),
        (
            ["run", "--idle-timeout=2.5", "--workdir", "src", "--keep-background", "make"],
            {
                "command": "make",
                "idle-timeout": 2.5,
                "workdir": "src",
                "keep-background": True,
                "env": [],
            },
        ),
    ],
)
def test_a_plain_run_is_taken(argv, flags):
    assert warm_run.parse(argv) == flags


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["doctor"],
        ["run"],  # no command: Invoke says so
        ["run", "-j", "ls"],  # short flags: Invoke's
        ["run", "--help"],
        ["run", "--background", "sleep 9"],
        ["run", "--network", "none", "ls"],
        ["run", "--timeout", "soon", "ls"],
        ["run", "--timeout", "1", "--timeout", "2", "ls"],
        ["run", "--timeout"],
        ["run", "ls", "pwd"],  # a second task name
        ["--echo", "run", "ls"],
        ["run", "--json=yes", "ls"],
    ],
)
def test_anything_else_is_left_to_invoke(argv):
    assert warm_run.parse(argv) is None


def test_the_request_is_inv_runs():
    flags = warm_run.parse(["run", "--env", "A=b=c", "--workdir", "w", "--session", "s", "x"])
    assert flags is not None
    assert warm_run.request_of(flags) == {
        "command": "x",
        "options": {
            "timeout": None,
            "idle_timeout": None,
            "env": {"A": "b=c"},
            "cwd": "w",
            "keep_background": False,
        },
        "session": "s",
    }


def test_without_a_relay_nothing_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("INVOKE_STIGMER_STATE_DIR", str(tmp_path / "state"))
    assert warm_run.try_run(["run", "echo hi"], tmp_path) is None
