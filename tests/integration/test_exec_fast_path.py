"""The agent's command path kept lean without giving anything up: warm helpers started by
`posix_spawn` leak no descriptor of the agent into a command (warm or started on demand,
with or without stdin, merged output), a command's environment is exactly the agent's
with the request's entries over it (the agent's own part encoded once), and a command
still runs in the folder it names."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from stigmer_sandbox.config import load_settings
from stigmer_sandbox.runtime import Sandbox

from ..conftest import ROOT
from .conftest import TEST_LABELS

# The shell's own descriptors, listed by the shell itself (a prestarted shell is
# non-dumpable: no other process, not even its own `ls`, may list them), one per line:
# 0, 1, 2 and 3, the folder its glob reads (with a leaked 3, that would be 4).
OWN_FDS = 'cd /proc/self/fd && printf "%s\\n" *'
OWN = ["0", "1", "2", "3"]


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fast-path")
    settings = load_settings(ROOT).replace(
        state_dir=str(folder / "state"), workspace=str(folder / "ws"), logs=str(folder / "logs")
    )
    sandbox = Sandbox.create_ephemeral(settings, extra_labels=TEST_LABELS, egress="open")
    sandbox.up().connect()
    yield sandbox
    sandbox.remove()


@pytest.mark.parametrize(
    "options",
    [{}, {"stdin": "x"}, {"merge_output": True}, {"env": {"FOO": "1"}}],
    ids=["plain", "stdin", "merged", "env"],
)
def test_a_command_has_only_its_three_standard_descriptors(box, options):
    for _ in range(3):  # each on a helper started while the previous command ran
        result = box.exec(OWN_FDS, **options)
        assert result.exit_code == 0, result
        assert result.stdout.split() == OWN


def test_commands_beyond_the_warm_helpers_have_no_extra_descriptor_either(box):
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: box.exec(f"sleep 0.3; {OWN_FDS}"), range(12)))
    assert all(r.exit_code == 0 and r.stdout.split() == OWN for r in results)


def test_the_environment_is_the_agents_with_the_requests_entries_over_it(box):
    plain = box.exec("env -0").stdout.split("\0")
    home = box.exec("echo $HOME").stdout.strip()
    assert f"HOME={home}" in plain and not any(e.startswith("FOO=") for e in plain)
    changed = box.exec("env -0", env={"HOME": "/tmp/elsewhere", "FOO": "a=b"}).stdout
    entries = changed.split("\0")
    assert [e for e in entries if e.startswith("HOME=")] == ["HOME=/tmp/elsewhere"]
    assert "FOO=a=b" in entries
    again = box.exec("env -0").stdout.split("\0")
    assert [e for e in again if e.startswith("HOME=")] == [f"HOME={home}"]
    assert not any(e.startswith("FOO=") for e in again)


def test_a_command_starts_in_its_folder_and_the_default_one(box):
    assert box.exec("pwd").stdout == "/workspace\n"
    assert box.exec("pwd", cwd="/tmp").stdout == "/tmp\n"
    missing = box.exec("pwd", cwd="/no/such/folder")
    assert missing.exit_code == 126 and "cd: /no/such/folder" in (missing.error or "")


def test_every_command_is_answered_while_both_warm_pools_refill(box):
    """Shell and argv commands at once drain both pools of warm helpers, whose threads
    then start the next ones at the same moment. A helper started while the other's pipe
    ends were inheritable held that pipe open, and its command was never answered (two in
    ~100 rounds before the fix; the timeout keeps a lost one short)."""
    mixed = [["true"] if i % 2 else "true" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(200):
            results = list(pool.map(lambda command: box.exec(command, timeout=5), mixed))
            assert [r.exit_code for r in results] == [0] * 8, [r.error for r in results]
