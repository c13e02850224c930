"""The deepagents backend's result mapping, and the backend in local mode (no engine)."""

from __future__ import annotations

from stigmer_sandbox import config
from stigmer_sandbox.integrations.deepagents import StigmerSandbox, to_response
from stigmer_sandbox.runtime import ExecResult, LocalSandbox

from ..conftest import ROOT


def result(**changes) -> ExecResult:
    return ExecResult(**{"exit_code": 0, "stdout": "", "stderr": "", "duration_s": 0.1, **changes})


def test_a_timeout_is_124_with_the_partial_output_and_deepagents_wording():
    response = to_response(result(exit_code=137, stdout="half\n", timed_out=True), 5, True)
    assert response.exit_code == 124
    assert response.output.startswith("half\n\nError: Command timed out after 5 seconds")
    default = to_response(result(exit_code=124, timed_out=True), 600.0, False)
    assert default.output.endswith("re-run using the timeout parameter.")


def test_a_lost_result_has_no_exit_code_and_says_why():
    response = to_response(result(exit_code=None, error="the agent died"), 5, False)
    assert response.exit_code is None
    assert "the agent died" in response.output


def test_oom_and_truncation_are_reported():
    response = to_response(result(exit_code=137, oom_killed=True, truncated={"stdout": True}), 5, 0)
    assert "ran out of memory" in response.output and response.truncated


def test_local_mode_runs_on_the_host_and_never_raises(tmp_path):
    settings = config.load_settings(ROOT, environ={}).replace(
        execution_mode="local", workspace=str(tmp_path / "ws"), state_dir=str(tmp_path / "st")
    )
    with StigmerSandbox(settings=settings) as backend:
        assert isinstance(backend.sandbox, LocalSandbox) and backend.id == "local"
        ran = backend.execute("echo one; echo two >&2; echo three")
        assert (ran.output, ran.exit_code) == ("one\ntwo\nthree\n", 0)
        assert backend.execute("bad\0command").output.startswith("Error: ")
        assert backend.execute("echo x", timeout=-1).exit_code == 1
        target = str(tmp_path / "ws" / "f.txt")
        assert backend.upload_files([(target, b"hi")])[0].error is None
        assert backend.download_files([target])[0].content == b"hi"


def test_auto_mode_without_the_image_runs_locally_and_says_why(tmp_path, caplog):
    settings = config.load_settings(ROOT, environ={}).replace(
        execution_mode="auto",
        image="stigmer-sandbox-never-built:none",
        workspace=str(tmp_path / "ws"),
        state_dir=str(tmp_path / "st"),
    )
    with caplog.at_level("INFO"), StigmerSandbox(settings=settings) as backend:
        assert isinstance(backend.sandbox, LocalSandbox)
        assert backend.execute("echo here").output == "here\n"
    assert any("execution mode auto: local" in r.getMessage() for r in caplog.records)
