"""The images of the services beside a sandbox, built when missing or stale: the egress
gateway (`stigmer-sandbox-egress:local`) and the credentials broker
(`stigmer-sandbox-broker:local`).

Built through the same content-addressed builder as the sandbox images, from the
project's own Debian base and `dockerfiles/<folder>/`: an unchanged context finds its
hash tag and is not rebuilt. The extra CA enters the hash as in every build; the broker
uses it (pip through a TLS-inspecting proxy, and the upstream certificates it verifies),
the gateway does not (it splices TLS; Debian's archive is fetched over HTTP), so a
changed CA rebuilds the gateway once, harmlessly.
"""

from __future__ import annotations

import threading

from .. import engine
from ..config import Settings
from ..errors import SandboxNotReady
from .builder import (
    CONTEXT_DIR,
    SERVICE_KINDS,
    BuildOptions,
    BuildWatcher,
    SilentWatcher,
    build,
    default_tags,
    plan,
)

GATEWAY = "egress"
BROKER = "broker"
_lock = threading.Lock()
# Per process: (kind, project folder, base image id) -> the image id found up to date.
_checked: dict[tuple[str, str, str], str] = {}


def image_of(kind: str) -> str:
    """The image a service kind runs: stigmer-sandbox-<kind>:local."""
    return default_tags(kind)[0]


def context_available(settings: Settings, kind: str) -> bool:
    """Whether this project holds the service's build context (a checkout does; a library
    user's project may not, and then uses the image a checkout built)."""
    folder, dockerfile = SERVICE_KINDS[kind]
    return (settings.root / CONTEXT_DIR / folder / dockerfile).is_file()


def _built_elsewhere(kind: str) -> str:
    found = engine.image_id(image_of(kind))
    if found is None:
        raise SandboxNotReady(
            f"the image {image_of(kind)} does not exist and this project cannot build it",
            "build it from a stigmer-sandbox checkout (`inv dev-full`), or use egress: open",
        )
    return found


def ensure_service_image(settings: Settings, kind: str, watcher: BuildWatcher | None = None) -> str:
    """The service image's id, building it first when its inputs changed or it is
    missing. Checked once per process and base image (the check hashes the context)."""
    watcher = watcher or SilentWatcher()
    key = (kind, str(settings.root), engine.image_id(settings.base_image) or "")
    with _lock:
        known = _checked.get(key)
        if known and engine.image_id(image_of(kind)) == known:
            return known
        if not context_available(settings, kind):
            return _built_elsewhere(kind)
        planned = plan(settings, kind, BuildOptions(), watcher)
        image_id = build(planned, watcher).image_id
        _checked[key] = image_id
        return image_id


def ensure_gateway_image(settings: Settings, watcher: BuildWatcher | None = None) -> str:
    """The egress gateway's image id (built first when needed)."""
    return ensure_service_image(settings, GATEWAY, watcher)


def ensure_broker_image(settings: Settings, watcher: BuildWatcher | None = None) -> str:
    """The credentials broker's image id (built first when needed)."""
    return ensure_service_image(settings, BROKER, watcher)
