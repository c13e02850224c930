"""Integration tests run against a real Docker Engine; they fail (never skip) without one.

Every resource a test creates carries `TEST_LABEL` with this session's id; the session
removes its own at the end, whatever happened, and never touches another session's
(test runs may overlap on one engine).

A module gets the project images it needs from the `base_image` and `basic_image`
fixtures, which build them through the library when they are missing, never from a
module that ran before it; every module here uses the basic image, so the session
makes sure of it before the first test even where a module does not ask. Tests marked
`destroys_project_images` (`inv clean --all`) run after every other test, so the
suite passes again right after it.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stigmer_sandbox import engine, images
from stigmer_sandbox.config import Settings, load_settings
from stigmer_sandbox.errors import SandboxError
from stigmer_sandbox.host import cleanup
from stigmer_sandbox.images import debian_base
from stigmer_sandbox.images.builder import SilentWatcher
from stigmer_sandbox.images.record import ImageRecord

from ..conftest import ROOT, run_inv
from .images_support import build_full_from_mirror, project_copy

TEST_LABEL = "dev.stigmer.sandbox.test"
SESSION_ID = uuid.uuid4().hex[:12]
TEST_LABELS = {TEST_LABEL: SESSION_ID}
DESTROYS_IMAGES = "destroys_project_images"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{DESTROYS_IMAGES}: removes this project's images; runs after every other test"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Move the tests that remove the project's images to the end (stable otherwise)."""
    items.sort(key=lambda item: item.get_closest_marker(DESTROYS_IMAGES) is not None)


@pytest.fixture(scope="session", autouse=True)
def docker_engine():
    """The SDK client; fails every test with the fix when no engine answers."""
    try:
        engine.ping()
    except SandboxError as exc:
        pytest.fail(
            f"integration tests need a Docker Engine: {exc} "
            "(CI starts one in .ci/run; locally run `inv engine.start`)"
        )
    client = engine.client()
    yield client
    remove_test_resources(client)


@pytest.fixture(scope="session")
def project_settings() -> Settings:
    """This checkout's settings, as the tasks read them."""
    return load_settings(ROOT)


@pytest.fixture(scope="session")
def base_image(docker_engine, project_settings):
    """The project's Debian base image, bootstrapped from Debian's archive if missing."""
    settings = project_settings
    debian_base.bootstrap(
        settings.base_image, settings.debian_mirror, record=ImageRecord.of(settings)
    )
    return engine.image(settings.base_image)


@pytest.fixture(scope="session", autouse=True)
def basic_image(base_image, project_settings):
    """stigmer-sandbox-basic:local of this checkout, built through the library unless it
    is up to date (then this takes well under a second)."""
    watcher = SilentWatcher()
    planned = images.plan(project_settings, "basic", images.BuildOptions(), watcher)
    return engine.image(images.build(planned, watcher).image_id)


@pytest.fixture(scope="session")
def full_image_from_mirror(basic_image, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """The full image, built once per session (its smoke test and the AWS broker test share
    it) from a project copy: its downloads come from a loopback mirror of fake artifacts,
    the AWS CLI from Debian and PyPI for real, Azure's 900 MB CLI skipped (its real install
    is `inv test --all`'s). Yields its tag and the project copy; removed at the end."""
    project = project_copy(tmp_path_factory.mktemp("full-image"))
    tag = f"stigmer-sandbox-test-full:{SESSION_ID}"
    done = build_full_from_mirror(run_inv, project, tag, skip=("azure-cli",))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    yield tag, project
    with contextlib.suppress(SandboxError), engine.engine_errors():
        found = engine.image_id(tag)
        if found:  # by id: also drops the sha- tag the build added
            engine.client().images.remove(found, force=True)
    leftovers = cleanup.plan(load_settings(project, environ={}))
    cleanup.remove([found for found in leftovers if found.kind == "image"])


def remove_test_resources(client) -> None:
    """Remove every container, network, volume and image carrying the test label."""
    wanted = {"label": [f"{TEST_LABEL}={SESSION_ID}"]}
    for container in client.containers.list(all=True, filters=wanted):
        container.remove(force=True, v=True)
    for network in client.networks.list(filters=wanted):
        network.remove()
    for volume in client.volumes.list(filters=wanted):
        volume.remove(force=True)
    for image in client.images.list(filters=wanted):
        client.images.remove(image.id, force=True)


def run_in(client, image: str, command: list[str], **kwargs) -> str:
    """Output of `command` in a throwaway, labelled container of `image`."""
    output = client.containers.run(image, command, remove=True, labels=TEST_LABELS, **kwargs)
    return output.decode(errors="replace")


def wait_for(predicate, seconds: float = 15.0) -> bool:
    """Whether `predicate()` became true within `seconds` (polled every 0.2 s)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False
