"""`inv engine.install --gvisor` on a real engine: where runsc is installed and registered,
`inv doctor`'s gvisor check passes, a container run with `--runtime` sees gVisor's kernel,
and installing again changes nothing. Skipped, with the reason, where gVisor is not set up
(the engine is never reloaded or restarted by these tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

from stigmer_sandbox import engine, isolation
from stigmer_sandbox.host import diagnostics, gvisor

from ..conftest import run_inv
from .conftest import TEST_LABEL, TEST_LABELS


@pytest.fixture(scope="module", autouse=True)
def gvisor_registered(docker_engine):
    """Skip the module, saying why, unless runsc is installed and the engine lists it."""
    if not gvisor.runsc_installed():
        pytest.skip(f"{isolation.RUNSC} is not installed ({isolation.INSTALL_HINT})")
    why = isolation.unusable_reason(docker_engine.info())
    if why:
        pytest.skip(f"{why} ({isolation.INSTALL_HINT})")


def test_the_doctor_check_passes():
    result = diagnostics._gvisor_check()  # the line `inv doctor` prints (the rest takes ~10 s)
    assert result.name == "gvisor" and result.status == "pass", result
    assert isolation.RUNTIME in result.detail and not result.required


def test_a_container_under_the_runtime_sees_gvisors_kernel(basic_image, project_settings):
    result = gvisor.smoke(project_settings.image, timeout_s=60, extra_labels=TEST_LABELS)
    assert result.kernel and result.kernel != os.uname().release
    leftover = engine.client().containers.list(
        all=True, filters={"label": [f"{TEST_LABEL}={TEST_LABELS[TEST_LABEL]}"]}
    )
    assert not [c for c in leftover if c.name.startswith("stigmer-gvisor-smoke-")]


def test_docker_run_with_the_runtime_flag(basic_image, project_settings):
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI on PATH")
    name = f"stigmer-gvisor-test-{uuid.uuid4().hex[:8]}"
    label = f"{TEST_LABEL}={TEST_LABELS[TEST_LABEL]}"
    argv = [docker, "run", "--rm", "--name", name, "--label", label]
    argv += [f"--runtime={isolation.RUNTIME}", project_settings.image, "uname", "-r"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    finally:
        # a hung run leaves its container behind: remove it (the --rm covers the rest)
        subprocess.run([docker, "rm", "-f", name], capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() != os.uname().release


def test_installing_again_changes_nothing():
    # nothing to install, write or reload here, so no root is needed either
    before = gvisor.DAEMON_JSON.read_bytes()
    done = run_inv("engine.install", "--gvisor", timeout=300)
    assert done.returncode == 0, done.stderr
    names = " and ".join(isolation.RUNTIME_ARGS)  # stigmer-gvisor and stigmer-gvisor-nonet
    assert f"{names} already registered" in done.stdout
    assert f"the engine already lists {names}" in done.stdout
    assert gvisor.DAEMON_JSON.read_bytes() == before
