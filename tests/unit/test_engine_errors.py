"""Every engine failure becomes one actionable line, classified by exception type; the
lookups (images, containers, health) carry that mapping themselves."""

from types import SimpleNamespace

import docker.errors
import pytest
import requests.exceptions
from urllib3.exceptions import ProtocolError

from stigmer_sandbox import engine
from stigmer_sandbox.errors import EngineError, SandboxNotReady

URL = "unix:///var/run/docker.sock"


def wrapped(inner: BaseException) -> BaseException:
    """Shaped like the SDK's failure: DockerException raised from a requests error."""
    try:
        try:
            raise requests.exceptions.ConnectionError(ProtocolError("Connection aborted.", inner))
        except requests.exceptions.ConnectionError as exc:
            raise docker.errors.DockerException("Error while fetching server API version") from exc
    except docker.errors.DockerException as outer:
        return outer


def test_missing_socket_with_dockerd_installed_says_not_running(monkeypatch):
    monkeypatch.setattr(engine.shutil, "which", lambda name: "/usr/sbin/dockerd")
    err = engine.classify(wrapped(FileNotFoundError(2, "No such file")), URL)
    assert "not running" in err.message
    assert "inv engine.start" in err.hint


def test_missing_socket_without_dockerd_says_not_installed(monkeypatch):
    monkeypatch.setattr(engine.shutil, "which", lambda name: None)
    err = engine.classify(wrapped(FileNotFoundError(2, "No such file")), URL)
    assert err.message == "Docker Engine is not installed"
    assert "inv engine.install" in err.hint


def test_refused_connection_says_not_running():
    err = engine.classify(wrapped(ConnectionRefusedError(111, "refused")), "tcp://127.0.0.1:1")
    assert "not running" in err.message and "tcp://127.0.0.1:1" in err.message


def test_permission_denied_points_to_docker_group_never_chmod():
    err = engine.classify(wrapped(PermissionError(13, "Permission denied")), URL)
    assert "permission denied" in err.message
    assert "docker' group" in err.hint and "rootless" in err.hint
    assert "chmod" not in str(err)


def test_timeout():
    err = engine.classify(requests.exceptions.ReadTimeout("read timed out"), URL)
    assert "did not answer in time" in err.message


def test_old_api_is_refused():
    with pytest.raises(EngineError, match=r"API 1\.39; this tool needs 1\.40"):
        engine._check_api_version("1.39", URL)
    engine._check_api_version("1.41", URL)


def test_disk_full_from_api_error():
    exc = docker.errors.APIError("500", explanation="write /var/lib: no space left on device")
    err = engine.classify(exc, URL)
    assert "disk is full" in err.message and "inv clean" in err.hint


def test_engine_errors_maps_missing_image_to_build_hint():
    with pytest.raises(SandboxNotReady) as caught, engine.engine_errors(URL):
        raise docker.errors.ImageNotFound("No such image: stigmer-sandbox-basic:local")
    assert "inv sandbox.build-basic" in caught.value.hint


def test_engine_url_prefers_docker_host(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "tcp://10.0.0.1:2375")
    assert engine.engine_url() == "tcp://10.0.0.1:2375"


class FakeCollection:
    """`client.images` / `client.containers`: `get` returns `found` or raises `error`."""

    def __init__(self, found=None, error: BaseException | None = None):
        self.found, self.error = found, error

    def get(self, _name):
        if self.error is not None:
            raise self.error
        return self.found


def fake_engine(monkeypatch, found=None, error: BaseException | None = None) -> None:
    collection = FakeCollection(found, error)
    client = SimpleNamespace(images=collection, containers=collection)
    monkeypatch.setattr(engine, "client", lambda: client)


CONNECTION_LOST = requests.exceptions.ConnectionError(
    ProtocolError("Connection aborted.", ConnectionRefusedError(111, "refused"))
)


def test_image_lookups_answer_none_or_the_image(monkeypatch):
    fake_engine(monkeypatch, found=SimpleNamespace(id="sha256:abc"))
    assert engine.image_id("x:1") == "sha256:abc"
    assert engine.image("x:1").id == "sha256:abc"
    fake_engine(monkeypatch, error=docker.errors.ImageNotFound("No such image: x:1"))
    assert engine.find_image("x:1") is None
    assert engine.image_id("x:1") is None


def test_a_missing_image_asked_for_is_a_friendly_not_ready(monkeypatch):
    fake_engine(monkeypatch, error=docker.errors.ImageNotFound("No such image: x:1"))
    with pytest.raises(SandboxNotReady) as caught:
        engine.image("x:1")
    assert caught.value.message == "image not found: x:1"
    assert "inv sandbox.build-basic" in caught.value.hint


def test_a_missing_container_is_none(monkeypatch):
    fake_engine(monkeypatch, error=docker.errors.NotFound("No such container: box"))
    assert engine.find_container("box") is None


@pytest.mark.parametrize(
    "lookup", [engine.find_image, engine.image_id, engine.image, engine.find_container]
)
@pytest.mark.parametrize(
    ("error", "fragment"),
    [
        (CONNECTION_LOST, "not running"),
        (docker.errors.APIError("500", explanation="boom\nmore"), "Docker Engine error: boom"),
        (requests.exceptions.ReadTimeout("read timed out"), "did not answer in time"),
    ],
)
def test_lookups_turn_every_other_failure_into_one_engine_error(
    monkeypatch, lookup, error, fragment
):
    monkeypatch.setattr(engine.shutil, "which", lambda name: "/usr/sbin/dockerd")
    fake_engine(monkeypatch, error=error)
    with pytest.raises(EngineError) as caught:
        lookup("x:1")
    assert fragment in caught.value.message and "\n" not in caught.value.message


class FakeContainer:
    """A container whose `reload` walks through the given `State` values."""

    def __init__(self, *states: dict):
        self.states = list(states)
        self.attrs: dict = {}

    def reload(self) -> None:
        self.attrs = {"State": self.states.pop(0) if len(self.states) > 1 else self.states[0]}


def health(status: str, output: str = "") -> dict:
    return {"Status": "running", "Health": {"Status": status, "Log": [{"Output": output}]}}


@pytest.mark.parametrize(
    ("states", "healthy", "detail"),
    [
        ((health("starting"), health("healthy")), True, "healthy"),
        ((health("starting"), health("unhealthy", "no bash\n")), False, "unhealthy: no bash"),
        (({"Status": "exited", "ExitCode": 3},), False, "exited with code 3"),
        (({"Status": "running"},), False, "no HEALTHCHECK"),
        ((health("starting"),), False, "still starting after 0 s"),
    ],
)
def test_wait_healthy_reports_how_the_wait_ended(monkeypatch, states, healthy, detail):
    monkeypatch.setattr(engine, "HEALTH_POLL_S", 0.01)
    result = engine.wait_healthy(FakeContainer(*states), 0.2)
    assert result.healthy is healthy
    assert detail in result.detail
    assert result.seconds < 1


def test_wait_healthy_maps_a_vanished_container(monkeypatch):
    class Gone:
        def reload(self):
            raise docker.errors.NotFound("No such container: box")

    with pytest.raises(SandboxNotReady):
        engine.wait_healthy(Gone(), 1)
