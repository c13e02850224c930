"""Integration tests run against a real Docker Engine; they fail (never skip) without one.

Every resource a test creates carries `TEST_LABEL` with this session's id; the session
removes its own at the end, whatever happened, and never touches another session's
(test runs may overlap on one engine).
"""

from __future__ import annotations

import uuid

import pytest

from stigmer_sandbox import engine
from stigmer_sandbox.errors import SandboxError

TEST_LABEL = "dev.stigmer.sandbox.test"
SESSION_ID = uuid.uuid4().hex[:12]
TEST_LABELS = {TEST_LABEL: SESSION_ID}


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
