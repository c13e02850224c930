"""What the compose tests share: a compose sandbox of their own, labelled and named apart.

Each sandbox gets a unique container name (so the compose project, its network and the
database are unique too), folders in tmp, and an extra compose file with the session's
test label, so the session's cleanup finds it even when a test's own `compose.down` did
not run. The shared `stigmer-sandbox` container is never touched.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import yaml

from .conftest import TEST_LABEL, TEST_LABELS


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def unique_name(prefix: str = "stigmer-compose-test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def labels_file(folder: Path) -> Path:
    """A compose file that puts the session's test label on the services and network."""
    path = folder / "test-labels.yml"
    labelled = {"labels": dict(TEST_LABELS)}
    document = {
        "services": {"sandbox": labelled},
        "networks": {"default": labelled},
    }
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def sandbox_env(tmp: Path, name: str, **settings: str) -> dict[str, str]:
    """Environment for `inv compose.*` and `load_settings`: folders in `tmp`, `name`."""
    home = tmp / "home"
    for folder in (".aws", ".kube"):
        (home / folder).mkdir(parents=True, exist_ok=True)
    env = {
        "INVOKE_STIGMER_WORKSPACE": str(tmp / "workspace"),
        "INVOKE_STIGMER_LOGS": str(tmp / "logs"),
        "INVOKE_STIGMER_STATE_DIR": str(tmp / "state"),
        "INVOKE_STIGMER_CONTAINER_NAME": name,
        "STIGMER_APP_PORT": str(free_port()),
        "STIGMER_DATABASE_IMAGE": "stigmer-sandbox-basic:local",
        "STIGMER_DATABASE_COMMAND": "python3 -m http.server 5432",
        "HOME": str(home),
    }
    env.update({f"INVOKE_STIGMER_{key.upper()}": value for key, value in settings.items()})
    return env


__all__ = ["TEST_LABEL", "free_port", "labels_file", "sandbox_env", "unique_name"]
