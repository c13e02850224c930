"""Docker Compose: the one place that finds compose and builds its commands.

Compose v2 (`docker compose`) is preferred; the standalone v1 `docker-compose`
is the fallback. v1 releases before 1.27 apply `deploy.resources` limits only
with `--compatibility`, so the version decides that flag.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from .errors import SandboxError

INSTALL_HINT = (
    "install the compose plugin (https://docs.docker.com/compose/install/) "
    "or `inv engine.install` for docker-compose"
)


@dataclass(frozen=True)
class ComposeTool:
    """Which compose was found: its argv prefix, flavour (v1/v2) and version."""

    prefix: tuple[str, ...]
    flavour: str
    version: str

    @property
    def needs_compatibility_flag(self) -> bool:
        return self.flavour == "v1" and version_tuple(self.version) < (1, 27)


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _probe(argv: list[str]) -> str | None:
    if not shutil.which(argv[0]):
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"v?(\d+\.\d+\.\d+)", done.stdout)
    return match.group(1) if done.returncode == 0 and match else None


def detect(preference: str = "auto") -> ComposeTool:
    """The compose to use; `preference` is auto, v2 or v1."""
    candidates = {
        "v2": (("docker", "compose"), ["docker", "compose", "version", "--short"]),
        "v1": (("docker-compose",), ["docker-compose", "version", "--short"]),
    }
    order = ["v2", "v1"] if preference == "auto" else [preference]
    for flavour in order:
        prefix, probe = candidates[flavour]
        version = _probe(probe)
        if version:
            return ComposeTool(prefix, flavour, version)
    wanted = "Docker Compose" if preference == "auto" else f"compose {preference}"
    raise SandboxError(f"{wanted} is not installed", INSTALL_HINT)
