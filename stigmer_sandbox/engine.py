"""The one place that talks to the Docker Engine's API.

`client()` creates (once per process) the SDK client, honouring `DOCKER_HOST`
and otherwise the active Docker context. `engine_errors()` turns every failure
of the SDK or its transport into an `EngineError` with one actionable line.
Connection failures are classified by walking the exception chain (a missing
socket is a `FileNotFoundError`, a denied one a `PermissionError`), never by
matching message text.

The lookups every module needs (`find_image`, `image_id`, `image`,
`find_container`, `wait_healthy`) live here with that mapping built in, so a
call site cannot forget it: "missing" is None or a friendly `SandboxNotReady`,
anything else one line, never a traceback.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import EngineError, SandboxError, SandboxNotReady

if TYPE_CHECKING:
    import docker

MIN_API_VERSION = (1, 40)
DEFAULT_SOCKET = "/var/run/docker.sock"
CONNECT_TIMEOUT_S = 60
ROOTLESS_DOCS = "https://docs.docker.com/engine/security/rootless/"
BUILD_HINT = "build it with `inv sandbox.build-basic` (or `inv sandbox.build-full`)"
HEALTH_POLL_S = 0.2
# Connections the SDK keeps open: a pool starts and removes many sandboxes at once.
MAX_CONNECTIONS = 64

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
            made = docker.from_env(timeout=CONNECT_TIMEOUT_S, max_pool_size=MAX_CONNECTIONS)
        else:
            made = docker.DockerClient(
                base_url=url, timeout=CONNECT_TIMEOUT_S, max_pool_size=MAX_CONNECTIONS
            )
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


# What the engine says when the machine runs out of something, and what to do about it.
EXHAUSTION = (
    (
        ("no space left on device",),
        "Docker's disk is full (no space left on device)",
        "free space with `inv clean --all`; see `docker system df`",
    ),
    (
        ("cannot allocate memory", "out of memory"),
        "the host is out of memory",
        "stop sandboxes (`inv sandbox.ls`), lower `memory` or a pool's size",
    ),
    (
        ("resource temporarily unavailable", "too many open files", "pids.max"),
        "the host is out of processes or file handles",
        "stop sandboxes (`inv sandbox.ls`) or raise the host's limits (ulimit, pid_max)",
    ),
    (
        ("could not find an available, non-overlapping", "no available ip", "address pool"),
        "Docker has no network addresses left",
        "remove unused networks (`docker network prune`) or widen default-address-pools",
    ),
)


def _api_error(exc: BaseException, url: str) -> EngineError:
    text = str(getattr(exc, "explanation", None) or exc).strip()
    first_line = text.splitlines()[0] if text else type(exc).__name__
    return exhausted(text) or EngineError(f"Docker Engine error: {first_line}", f"engine: {url}")


def exhausted(text: str) -> EngineError | None:
    """The error for an engine message saying the machine ran out of something, else None
    (whatever status the engine gave it: address pools come back as 404)."""
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    for needles, message, hint in EXHAUSTION:
        if any(needle in text.lower() for needle in needles):
            return EngineError(f"{message}: {first_line[:160]}", hint)
    return None


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
            f"image not found: {missing[-1] if missing else _explain(exc)}", BUILD_HINT
        ) from None
    except docker.errors.NotFound as exc:
        raise exhausted(_explain(exc)) or SandboxNotReady(f"not found: {_explain(exc)}") from None
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        raise classify(exc, url) from None


def _explain(exc: Any) -> str:
    return str(getattr(exc, "explanation", None) or exc).strip()


def ping() -> dict[str, Any]:
    """The engine's version report; raises `EngineError` when it does not answer."""
    with engine_errors():
        return client().version()


def find_image(reference: str) -> Any | None:
    """The image a name:tag or id refers to, or None when the engine has no such image."""
    import docker.errors

    with engine_errors():
        try:
            return client().images.get(reference)
        except docker.errors.ImageNotFound:
            return None


def image_id(reference: str) -> str | None:
    """The id (`sha256:...`) of the image `reference` names, or None when it is missing."""
    found = find_image(reference)
    return None if found is None else str(found.id)


def image(reference: str) -> Any:
    """The image `reference` names; a missing one is a `SandboxNotReady` saying how to build it."""
    found = find_image(reference)
    if found is None:
        raise SandboxNotReady(f"image not found: {reference}", BUILD_HINT)
    return found


def remove_image(reference: str) -> bool:
    """Remove an image if nothing needs it any more; whether it went. One that a container
    or a child image still uses stays (cleanup finds it later by its labels)."""
    import docker.errors

    with engine_errors():
        try:
            client().images.remove(reference, force=True)
        except (docker.errors.NotFound, docker.errors.ImageNotFound):
            return False
        except docker.errors.APIError as exc:
            if exc.status_code == 409:  # conflict: in use
                return False
            raise
    return True


def find_container(name: str) -> Any | None:
    """The container with this name or id, or None when there is none."""
    import docker.errors

    with engine_errors():
        try:
            return client().containers.get(name)
        except docker.errors.NotFound:
            return None


class Health(NamedTuple):
    """How a wait for a container's health check ended."""

    healthy: bool
    detail: str
    seconds: float


def wait_healthy(container: Any, timeout_s: float) -> Health:
    """Wait until the engine reports `container` healthy; stop early when it cannot become so
    (it exited, its check failed, or its image has no HEALTHCHECK)."""
    started = time.monotonic()
    status = "starting"
    while time.monotonic() - started < timeout_s:
        with engine_errors():
            container.reload()
        state = container.attrs["State"]
        ended = _health_verdict(state)
        if ended is not None:
            return Health(ended[0], ended[1], time.monotonic() - started)
        status = (state.get("Health") or {}).get("Status", status)
        time.sleep(HEALTH_POLL_S)
    return Health(False, f"still {status} after {timeout_s:.0f} s", time.monotonic() - started)


def _health_verdict(state: dict[str, Any]) -> tuple[bool, str] | None:
    """(healthy, detail) once the container's state settles the question, else None."""
    if state.get("Status") in ("exited", "dead"):
        return False, f"the container exited with code {state.get('ExitCode')}"
    health = state.get("Health")
    if not health:
        return False, "the image has no HEALTHCHECK"
    if health.get("Status") == "healthy":
        return True, "healthy"
    if health.get("Status") == "unhealthy":
        log = health.get("Log") or [{}]
        return False, f"unhealthy: {str(log[-1].get('Output', '')).strip()[:100]}"
    return None


def experimental() -> bool:
    """Whether the engine's API is in experimental mode (its ping header, what checkpoints
    need: `docker info` can say so after a reload while the API still refuses)."""
    api = client().api
    with engine_errors():
        response = api.get(api._url("/_ping"))
    return response.headers.get("Docker-Experimental", "").lower() == "true"
