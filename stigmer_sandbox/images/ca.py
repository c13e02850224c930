"""Extra CA bundles: a TLS-inspecting corporate proxy, or this machine's own CA.

Builds that fetch from PyPI or npm must trust the same CA as the host does.
The bundle comes from `--ca-cert`/the `ca_cert` key, else from the variables
tools already use for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

ENV_VARS = ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS")
PEM_MARKER = b"-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True)
class ExtraCA:
    """A PEM bundle to trust, and where we learned of it."""

    path: Path
    source: str


def detect(explicit: str = "", environ: dict[str, str] | None = None) -> ExtraCA | None:
    """The extra CA bundle to use: `explicit` if given, else the first env variable set."""
    environ = dict(os.environ) if environ is None else environ
    if explicit:
        return _checked(Path(explicit).expanduser(), "--ca-cert", required=True)
    for var in ENV_VARS:
        value = environ.get(var)
        if value:
            found = _checked(Path(value).expanduser(), var, required=False)
            if found:
                return found
    return None


def _checked(path: Path, source: str, required: bool) -> ExtraCA | None:
    try:
        data = path.read_bytes()
    except OSError as exc:
        if required:
            raise ConfigError(f"{source}: cannot read CA bundle {path}: {exc.strerror}") from None
        return None
    if PEM_MARKER not in data:
        if required:
            raise ConfigError(
                f"{source}: {path} is not a PEM certificate bundle",
                "give a file containing '-----BEGIN CERTIFICATE-----' blocks",
            )
        return None
    return ExtraCA(path.resolve(), source)
