"""Issue 3 on a real engine: builds from the project's own base, smoke tests, failures."""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid

import pytest

from stigmer_sandbox import labels
from stigmer_sandbox.config import load_settings
from stigmer_sandbox.host import cleanup

from ..conftest import ROOT
from .images_support import build_full_from_mirror, download_tools, project_copy

BASIC = "stigmer-sandbox-basic:local"


@pytest.fixture
def scratch_tags(docker_engine):
    """Unique tags for builds from project copies; their images are removed afterwards."""
    made: list[str] = []

    def new(kind: str) -> str:
        made.append(f"stigmer-sandbox-test-{kind}:{uuid.uuid4().hex[:8]}")
        return made[-1]

    yield new
    for tag in made:
        found = docker_engine.images.list(name=tag)
        for image in found:  # by id: also drops the sha- tag the build added
            docker_engine.images.remove(image.id, force=True)


@pytest.fixture
def project(tmp_path, docker_engine):
    """A project copy to build from. Its builds record their images in its own state
    folder; the untagged ones (a failed build's finished steps) are removed afterwards,
    as `inv clean` run in that project would."""
    copy = project_copy(tmp_path)
    yield copy
    leftovers = cleanup.plan(load_settings(copy, environ={}))
    cleanup.remove([found for found in leftovers if found.kind == "image"])


def test_basic_image_is_labelled_non_root_and_small_enough(basic_image):
    config = basic_image.attrs["Config"]
    assert config["User"] not in ("", "0", "root")
    assert basic_image.labels[labels.MANAGED] == "true"
    assert basic_image.labels[labels.KIND] == "basic"
    for key in ("version", "revision", "created", "source", "title"):
        assert basic_image.labels.get(f"org.opencontainers.image.{key}"), key
    assert config["Healthcheck"]["Test"]
    assert basic_image.attrs["Size"] <= 560 * 1000**2, basic_image.attrs["Size"]


def test_unchanged_rebuild_is_a_noop(inv, basic_image):
    done = inv("sandbox.build-basic")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert "up to date" in done.stdout
    assert "Step 1/" not in done.stdout


def test_smoke_tests_pass_and_agree_with_the_shell_script(inv, basic_image):
    report = json.loads(inv("sandbox.test", "--json").stdout)
    assert report["ok"], report
    names = {c["name"] for c in report["checks"]}
    assert {"python", "node", "npm", "user", "workspace writable", "health check"} <= names
    script = subprocess.run(
        [str(ROOT / "scripts/test-sandbox.sh"), BASIC],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert script.returncode == 0, script.stdout + script.stderr
    tested = re.findall(r"✓ Testing (.+)\.\.\.", script.stdout)
    assert set(tested) == names - {"health check"}


def test_the_guides_own_script_passes_unchanged(basic_image):
    script = ROOT / "tests/integration/guide/test-sandbox.sh"
    done = subprocess.run(
        ["bash", str(script), BASIC], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Python 3.11." in done.stdout and "v20." in done.stdout
    assert "✅ All tests passed!" in done.stdout


def test_report_shows_components_and_layers(inv, basic_image):
    report = json.loads(inv("sandbox.report", "--json").stdout)
    parts = {c["name"] for c in report["components"]}
    assert {"toolchain", "node", "python", "base"} <= parts
    assert report["versions"]["node"].startswith("v20.")
    assert any("pip install" in layer["name"] for layer in report["layers"])


def test_requirements_change_rebuilds_only_later_layers(inv, project, basic_image, scratch_tags):
    requirements = project / "dockerfiles/requirements.txt"
    original = requirements.read_text()
    # Another user's clone under another umask: the builder's COPY cache keys on owner
    # and mode, so the context must not carry them.
    for path in project.rglob("*"):
        os.lchown(path, 1234, 1234)
        path.chmod(path.stat().st_mode | 0o020)
    env = {"INVOKE_STIGMER_PROJECT_DIR": str(project)}
    # Two edits: the first warms every stage's cache whatever the engine held before
    # (a user's `docker image prune` drops the Node stage, for one).
    for edit in range(2):
        requirements.write_text(original + f"# bust {uuid.uuid4().hex}\n")
        done = inv(
            "sandbox.build-basic", "--progress", "plain", "--tag", scratch_tags("basic"), env=env
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr
        assert inv("clean").returncode == 0  # its default tier keeps the build cache
        steps = re.split(r"^Step \d+/\d+ : ", done.stdout, flags=re.MULTILINE)[1:]
        if edit == 0:  # the base stage is in basic:local's own layers: always cached
            first_run = next(s for s in steps if s.startswith("RUN"))
            assert "Using cache" in first_run, first_run[:300]
    copy_at = next(i for i, s in enumerate(steps) if s.startswith("COPY") and "requirements" in s)
    later_run = [s for s in steps[copy_at:] if s.startswith("RUN")]
    earlier_run = [s for s in steps[:copy_at] if s.startswith("RUN")]
    rebuilt = [s.splitlines()[0][:80] for s in earlier_run if "Using cache" not in s]
    assert earlier_run and not rebuilt, rebuilt
    assert later_run and "Using cache" not in later_run[0]


def test_build_without_network_names_the_network_and_tags_nothing(
    inv, project, basic_image, scratch_tags, docker_engine
):
    requirements = project / "dockerfiles/requirements.txt"
    requirements.write_text(requirements.read_text() + f"# bust {uuid.uuid4().hex}\n")
    tag = scratch_tags("basic")
    done = inv(
        "sandbox.build-basic",
        "--network",
        "none",
        "--tag",
        tag,
        env={"INVOKE_STIGMER_PROJECT_DIR": str(project)},
    )
    assert done.returncode == 4
    assert "Traceback" not in done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert re.search(r"build failed at step \d+/\d+ \(RUN pip install", error)
    assert "no network" in error
    assert not docker_engine.images.list(name=tag)


def loopback_tools(inv, tag: str) -> set[str]:
    """The `tool ...` checks of the smoke tests of `tag`, all passed."""
    report = json.loads(inv("sandbox.test", "--image", tag, "--json").stdout)
    assert report["ok"], [c for c in report["checks"] if c["status"] != "pass"]
    return {c["name"] for c in report["checks"] if c["name"].startswith("tool ")}


def test_full_image_with_loopback_tools_passes_smoke_tests(inv, full_image_from_mirror):
    tag, project = full_image_from_mirror
    tools = loopback_tools(inv, tag)
    assert tools == {"tool aws"} | {f"tool {name}" for name in download_tools(project)}


@pytest.mark.stress
def test_full_image_with_the_real_azure_cli_passes_smoke_tests(
    inv, project, basic_image, scratch_tags
):
    """The whole full image: Azure's CLI (900 MB from PyPI) too, which CI's shared build
    skips."""
    tag = scratch_tags("full")
    done = build_full_from_mirror(inv, project, tag)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    tools = loopback_tools(inv, tag)
    assert tools == {"tool aws", "tool azure-cli"} | {
        f"tool {name}" for name in download_tools(project)
    }


def test_full_image_bad_checksum_fails_naming_tool_and_both_sums(
    inv, project, basic_image, scratch_tags
):
    done = build_full_from_mirror(
        inv, project, scratch_tags("full"), corrupt="kubectl", skip=("aws", "azure-cli")
    )
    assert done.returncode == 4
    error = done.stderr.strip().splitlines()[-1]
    assert "tool kubectl: checksum mismatch" in done.stderr
    assert re.search(r"expected sha256 0{64}, got [0-9a-f]{64}", done.stderr)
    assert "pinned checksum" in error
