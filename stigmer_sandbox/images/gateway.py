"""The egress gateway's image (`stigmer-sandbox-egress:local`), built when missing or stale.

Built through the same content-addressed builder as the sandbox images, from the
project's own Debian base and `dockerfiles/egress/`: an unchanged context finds its hash
tag and is not rebuilt. The gateway never needs the extra CA (it splices TLS, it does not
decrypt; Debian's archive is fetched over HTTP), but the CA still enters the hash as in
every build, so a changed CA rebuilds it once, harmlessly.
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

KIND = "egress"
IMAGE = default_tags(KIND)[0]  # stigmer-sandbox-egress:local
_lock = threading.Lock()
# Per process: (project folder, base image id) -> the image id found up to date.
_checked: dict[tuple[str, str], str] = {}


def context_available(settings: Settings) -> bool:
    """Whether this project holds the gateway's build context (a checkout does; a library
    user's project may not, and then uses the image a checkout built)."""
    folder, dockerfile = SERVICE_KINDS[KIND]
    return (settings.root / CONTEXT_DIR / folder / dockerfile).is_file()


def _built_elsewhere() -> str:
    found = engine.image_id(IMAGE)
    if found is None:
        raise SandboxNotReady(
            f"the egress gateway's image {IMAGE} does not exist and this project cannot build it",
            "build it from a stigmer-sandbox checkout (`inv dev-full`), or use egress: open",
        )
    return found


def ensure_gateway_image(settings: Settings, watcher: BuildWatcher | None = None) -> str:
    """The gateway image's id, building it first when its inputs changed or it is missing.
    Checked once per process and base image (the check hashes the context: ~10 ms)."""
    watcher = watcher or SilentWatcher()
    key = (str(settings.root), engine.image_id(settings.base_image) or "")
    with _lock:
        known = _checked.get(key)
        if known and engine.image_id(IMAGE) == known:
            return known
        if not context_available(settings):
            return _built_elsewhere()
        planned = plan(settings, KIND, BuildOptions(), watcher)
        image_id = build(planned, watcher).image_id
        _checked[key] = image_id
        return image_id
