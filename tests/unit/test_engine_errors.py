"""Every engine failure becomes one actionable line, classified by exception type."""

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
