"""`inv test`: the pytest runs it makes, and the second run under gVisor of `--all`."""

from __future__ import annotations

import pytest

from stigmer_sandbox.tasks import dev

PY = "/venv/bin/python"


def test_ci_run_is_one_run_without_stress_and_says_nothing():
    runs, note = dev.planned_runs(PY, unit=False, k=None, all=False, gvisor_unusable=None)
    assert [run.argv for run in runs] == [[PY, "-m", "pytest", "tests", "-m", "not stress"]]
    assert runs[0].isolation is None and note is None


def test_all_runs_the_integration_tests_again_under_gvisor_and_says_so():
    runs, note = dev.planned_runs(PY, unit=False, k="pool", all=True, gvisor_unusable=None)
    assert [(run.argv, run.isolation) for run in runs] == [
        ([PY, "-m", "pytest", "tests", "-k", "pool"], None),
        ([PY, "-m", "pytest", "tests/integration", "-k", "pool"], "gvisor"),
    ]
    assert note == "then the integration tests again under gVisor (INVOKE_STIGMER_ISOLATION=gvisor)"


def test_all_without_gvisor_runs_once_and_says_why():
    runs, note = dev.planned_runs(
        PY, unit=False, k=None, all=True, gvisor_unusable="the engine has no stigmer-gvisor runtime"
    )
    assert [run.argv for run in runs] == [[PY, "-m", "pytest", "tests"]]
    assert note == (
        "the integration tests do not run again under gVisor: "
        "the engine has no stigmer-gvisor runtime"
    )


@pytest.mark.parametrize("all_", [False, True])
def test_unit_never_runs_gvisor(all_):
    runs, note = dev.planned_runs(PY, unit=True, k=None, all=all_, gvisor_unusable=None)
    assert len(runs) == 1 and runs[0].argv[3] == "tests/unit" and note is None


def test_each_run_sets_its_own_isolation_and_drops_the_callers():
    caller = {"PATH": "/bin", dev.ISOLATION_VAR: "gvisor"}
    assert dev.PytestRun(["x"]).env(caller) == {"PATH": "/bin"}
    assert dev.PytestRun(["x"], "gvisor").env({"PATH": "/bin"}) == {
        "PATH": "/bin",
        dev.ISOLATION_VAR: "gvisor",
    }


def test_an_engine_that_does_not_answer_is_a_reason(monkeypatch):
    from stigmer_sandbox import engine
    from stigmer_sandbox.errors import SandboxError

    def refused():
        raise SandboxError("the Docker Engine does not answer")

    monkeypatch.setattr(engine, "client", refused)
    assert dev.gvisor_unusable() == "the Docker Engine does not answer"
