"""The translation the framework adapters share (integrations/adapter.py), without an engine."""

from __future__ import annotations

import errno

import pytest

from stigmer_sandbox import config
from stigmer_sandbox.errors import SandboxNotReady, UsageError
from stigmer_sandbox.integrations import adapter
from stigmer_sandbox.runtime import ExecResult

from ..conftest import ROOT


def result(**changes) -> ExecResult:
    return ExecResult(**{"exit_code": 0, "stdout": "", "stderr": "", "duration_s": 0.1, **changes})


def test_the_timeout_is_the_frameworks_else_the_sandboxs_default():
    settings = config.load_settings(ROOT, environ={}).replace(timeout=42)
    assert adapter.command_timeout(5, settings) == (5.0, True)
    assert adapter.command_timeout(None, settings) == (42.0, False)
    assert adapter.command_timeout(0, settings) == (42.0, False)
    assert adapter.command_timeout(-1, settings) == (-1.0, True)  # Request.build refuses it


def test_relative_paths_land_under_the_workspace_and_absolute_ones_stay():
    assert adapter.sandbox_path("a/b.txt") == "/workspace/a/b.txt"
    assert adapter.sandbox_path("/tmp/x") == "/tmp/x"
    assert adapter.sandbox_path("file with space") == "/workspace/file with space"
    assert adapter.names_a_directory(".") and adapter.names_a_directory("a/..")
    assert adapter.names_a_directory("dir/./") and not adapter.names_a_directory("a.txt")


def test_notices_say_how_a_command_ended_beyond_its_exit_code():
    assert adapter.ended_notice(result()) is None
    assert adapter.ended_notice(result(exit_code=137, oom_killed=True)) == adapter.OOM_NOTICE
    lost = adapter.ended_notice(result(exit_code=None, error="the agent died"))
    assert lost is not None and "the agent died" in lost
    assert adapter.with_notice("out\n", None) == "out\n"
    assert adapter.with_notice("out\n\n", "Error: x") == "out\n\nError: x"
    assert adapter.with_notice("  ", "Error: x") == "Error: x"


def test_start_failures_and_refused_execution_are_told_apart():
    missing = result(exit_code=127, error="nope: No such file or directory")
    assert adapter.start_failure_text(missing) == (
        "stigmer-sandbox: the command could not start: nope: No such file or directory\n"
    )
    assert adapter.start_failure_text(result(exit_code=127, stderr="bash: nope\n")) is None
    assert adapter.start_failure_text(result(exit_code=1, error="x")) is None
    refused = result(exit_code=126, error="/etc/passwd: Permission denied")
    assert adapter.refused_execution(refused)
    assert not adapter.refused_execution(result(exit_code=126, stderr="Permission denied"))
    assert adapter.truncated(result(truncated={"stdout": False, "stderr": True}))
    assert not adapter.truncated(result(truncated={"stdout": False}))


@pytest.mark.parametrize(
    ("code", "kind", "number"),
    [
        ("file_not_found", FileNotFoundError, errno.ENOENT),
        ("permission_denied", PermissionError, errno.EACCES),
        ("is_directory", IsADirectoryError, errno.EISDIR),
        ("invalid_path", PermissionError, errno.EACCES),
        ("file_too_large", OSError, errno.EFBIG),
        ("no_space_left", OSError, errno.ENOSPC),
        ("error: the transfer failed (boom)", OSError, errno.EIO),
    ],
)
def test_a_transfer_error_becomes_pythons_own_error_naming_the_path(code, kind, number):
    error = adapter.file_error("notes.txt", code, adapter.ErrorTypes())
    assert type(error) is kind and error.errno == number and error.filename == "notes.txt"
    assert "notes.txt" in str(error)


def test_a_framework_swaps_in_its_own_error_types():
    errors = adapter.ErrorTypes(not_found=lambda path, why: KeyError(path), unavailable=EOFError)
    assert isinstance(adapter.file_error("x", "file_not_found", errors), KeyError)
    timed_out = adapter.file_error("x", adapter.TRANSFER_TIMED_OUT, errors)
    assert isinstance(timed_out, TimeoutError)
    assert isinstance(adapter.sandbox_error(UsageError("bad cwd"), errors), ValueError)
    gone = adapter.sandbox_error(SandboxNotReady("gone", "start one"), errors)
    assert isinstance(gone, EOFError) and str(gone) == "gone (start one)"
