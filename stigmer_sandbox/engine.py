"""The one place that talks to the Docker Engine's API.

`client()` creates (once per process) the SDK client, honouring `DOCKER_HOST`
and otherwise the active Docker context. `engine_errors()` turns every failure
of the SDK or its transport into an `EngineError` with one actionable line.
Connection failures are classified by walking the exception chain (a missing
socket is a `FileNotFoundError`, a denied one a `PermissionError`), never by
matching message text.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .errors import EngineError, SandboxError, SandboxNotReady

if TYPE_CHECKING:
    import docker

MIN_API_VERSION = (1, 40)
DEFAULT_SOCKET = "/var/run/docker.sock"
CONNECT_TIMEOUT_S = 60
ROOTLESS_DOCS = "https://docs.docker.com/engine/security/rootless/"

_lock = threading.Lock()
_client: docker.DockerClient | None = None


def engine_url() -> str:
    """Where the engine is expected: `DOCKER_HOST`, else the active context's host."""
    if os.environ.get("DOCKER_HOST"):
        return os.environ["DOCKER_HOST"]
    try:
        from docker.context import ContextAPI

        context = ContextAPI.get_current_context()
        if context is not None and context.Host:
            return str(context.Host)
    except Exception:
        pass
    return f"unix://{DEFAULT_SOCKET}"


def client() -> docker.DockerClient:
    """The shared SDK client; connects and checks the API version on first use."""
    global _client  # noqa: PLW0603 - one client per process, created lazily
    with _lock:
        if _client is None:
            _client = _connect()
        return _client


def reset_client() -> None:
    """Forget the cached client (after the engine restarted, or in tests)."""
    global _client  # noqa: PLW0603
    with _lock:
        if _client is not None:
            _client.close()
        _client = None


def _connect() -> docker.DockerClient:
    import docker

    url = engine_url()
    with engine_errors(url):
        if os.environ.get("DOCKER_HOST"):
            made = docker.from_env(timeout=CONNECT_TIMEOUT_S)
        else:
            made = docker.DockerClient(base_url=url, timeout=CONNECT_TIMEOUT_S)
        _check_api_version(made.api.api_version, url)
        return made


def _check_api_version(version: str, url: str) -> None:
    parts = tuple(int(p) for p in version.split(".")[:2])
    if parts < MIN_API_VERSION:
        wanted = ".".join(map(str, MIN_API_VERSION))
        raise EngineError(
            f"the Docker Engine at {url} speaks API {version}; this tool needs {wanted} or newer",
            "upgrade Docker Engine to 19.03 or later",
        )


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """Every exception reachable from `exc`: causes, contexts, wrapped reasons and args."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None)]
        linked.extend(a for a in current.args if isinstance(a, BaseException))
        todo.extend(e for e in linked if isinstance(e, BaseException))


def classify(exc: BaseException, url: str | None = None) -> EngineError:
    """The friendly error for a failure to reach or use the engine."""
    url = url or engine_url()
    causes = list(_chain(exc))
    if any(isinstance(e, PermissionError) for e in causes):
        return EngineError(
            f"permission denied on the Docker socket ({url})",
            "add your user to the 'docker' group (sudo usermod -aG docker $USER, then log in "
            f"again) or use rootless Docker: {ROOTLESS_DOCS}",
        )
    if any(isinstance(e, FileNotFoundError | ConnectionRefusedError) for e in causes):
        return _not_running(url)
    if any(type(e).__name__ in {"ReadTimeout", "ConnectTimeout", "TimeoutError"} for e in causes):
        return EngineError(
            f"the Docker Engine at {url} did not answer in time",
            "check `docker info`; restart the engine if it hangs",
        )
    return _api_error(exc, url)


def _not_running(url: str) -> EngineError:
    local = url.startswith("unix://") and url.removeprefix("unix://") == DEFAULT_SOCKET
    if local and not shutil.which("dockerd"):
        return EngineError(
            "Docker Engine is not installed",
            "run `inv engine.install` (Debian/Ubuntu) or install Docker Engine",
        )
    return EngineError(
        f"the Docker Engine is not running (nothing answers at {url})",
        "run `inv engine.start`, or start the docker service",
    )


def _api_error(exc: BaseException, url: str) -> EngineError:
    text = str(getattr(exc, "explanation", None) or exc).strip()
    first_line = text.splitlines()[0] if text else type(exc).__name__
    if "no space left on device" in text.lower():
        return EngineError(
            "Docker's disk is full (no space left on device)",
            "free space with `inv clean --all`; see `docker system df`",
        )
    return EngineError(f"Docker Engine error: {first_line}", f"engine: {url}")


@contextmanager
def engine_errors(url: str | None = None) -> Iterator[None]:
    """Re-raise any SDK or transport failure inside the block as an `EngineError`."""
    import docker.errors
    import requests.exceptions

    try:
        yield
    except SandboxError:
        raise
    except docker.errors.ImageNotFound as exc:
        missing = re.findall(r"no such image: ([^\s:]+(?::[^\s:]+)?)", _explain(exc), re.I)
        raise SandboxNotReady(
            f"image not found: {missing[-1] if missing else _explain(exc)}",
            "build it with `inv sandbox.build-basic` (or `inv sandbox.build-full`)",
        ) from None
    except docker.errors.NotFound as exc:
        raise SandboxNotReady(f"not found: {_explain(exc)}") from None
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        raise classify(exc, url) from None


def _explain(exc: Any) -> str:
    return str(getattr(exc, "explanation", None) or exc).strip()


def ping() -> dict[str, Any]:
    """The engine's version report; raises `EngineError` when it does not answer."""
    with engine_errors():
        return client().version()
