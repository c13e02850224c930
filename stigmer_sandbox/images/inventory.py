"""`sandbox.report`: what an image contains and where its bytes go.

Bytes per layer come from the image history; bytes per component from dpkg's
installed sizes (grouped by package name) plus the folders the Dockerfiles
fill outside dpkg (/opt/node, /opt/venv, /opt/tools/*).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .. import engine
from . import smoke

COMPONENTS = (
    (
        "toolchain",
        re.compile(
            r"^(gcc|g\+\+|cpp|binutils|make|libc6-dev|libc-dev-bin|linux-libc-dev|rpcsvc-proto|"
            r"libgcc-\d+-dev|libstdc\+\+-\d+-dev|lib(asan|tsan|lsan|ubsan|hwasan|itm|atomic|"
            r"quadmath|gomp|cc1-|isl|mpc|mpfr|ctf|ctf-nobfd|binutils|gprofng|jansson|sframe|"
            r"crypt-dev|nsl-dev|tirpc-dev)).*"
        ),
    ),
    (
        "python",
        re.compile(
            r"^(python3|libpython3|libexpat1-dev|zlib1g-dev|"
            r"javascript-common|libjs-).*"
        ),
    ),
    ("git + perl", re.compile(r"^(git|perl|libperl|liberror-perl|patch|less).*")),
)
# `|2 A=1 B=2 /bin/bash -o pipefail -c #(nop) ` and the like, before the instruction.
LAYER_NOISE = re.compile(r"^(\|\d+ (\S+=\S* )*)?(/bin/(ba)?sh (-o pipefail )?-c )?(#\(nop\) )?")
OUTSIDE_DPKG = "du -sb /opt/node /opt/venv /opt/tools/* 2>/dev/null || true"
DPKG_SIZES = "dpkg-query -W -f='${Package}\\t${Installed-Size}\\n'"
VERSIONS = {
    "python": "python --version",
    "pip": "pip --version | cut -d' ' -f1-2",
    "node": "node --version",
    "npm": "npm --version",
    "git": "git --version",
    "curl": "curl --version | head -1",
    "jq": "jq --version",
    "gcc": "gcc --version | head -1",
    "make": "make --version | head -1",
    "bash": "bash --version | head -1",
    "debian": "cat /etc/debian_version",
}


@dataclass(frozen=True)
class Share:
    """Bytes attributed to one named part of an image."""

    name: str
    size_bytes: int


def component_of(package: str) -> str:
    """The component a Debian package belongs to ("base" when none matches)."""
    for name, pattern in COMPONENTS:
        if pattern.match(package):
            return name
    return "base"


def group_packages(dpkg_output: str) -> dict[str, int]:
    """Installed bytes per component from `dpkg-query` lines (sizes are KiB)."""
    totals: dict[str, int] = {}
    for line in dpkg_output.splitlines():
        package, _, kib = line.partition("\t")
        if kib.strip().isdigit():
            part = component_of(package)
            totals[part] = totals.get(part, 0) + int(kib) * 1024
    return totals


def _outside_dpkg(du_output: str) -> dict[str, int]:
    names = {"/opt/node": "node", "/opt/venv": "python packages (venv)"}
    found = {}
    for line in du_output.splitlines():
        size, _, path = line.partition("\t")
        if size.isdigit():
            found[names.get(path, f"tool {path.rsplit('/', 1)[-1]}")] = int(size)
    return found


def _exec(container: Any, command: str) -> str:
    with engine.engine_errors():
        _code, output = container.exec_run(["bash", "-c", command])
    return (output or b"").decode(errors="replace").strip()


def layers(image: str) -> list[Share]:
    """Non-empty layers, newest first, named by the instruction that made them."""
    found = engine.image(image)
    with engine.engine_errors():
        history = found.history()
    shares = []
    for entry in history:
        if entry.get("Size", 0) > 0:
            made_by = " ".join(LAYER_NOISE.sub("", entry.get("CreatedBy", "")).split())
            shares.append(Share(made_by[:70] or "base image (imported)", int(entry["Size"])))
    return shares


def report(image: str) -> dict[str, Any]:
    """Versions, per-component and per-layer sizes of `image`."""
    size = int(engine.image(image).attrs.get("Size", 0))
    with smoke.probe_container(image) as container:
        versions = {name: _exec(container, cmd)[:70] for name, cmd in VERSIONS.items()}
        parts = group_packages(_exec(container, DPKG_SIZES))
        parts.update(_outside_dpkg(_exec(container, OUTSIDE_DPKG)))
        python_packages = _exec(container, "pip list --format=freeze")
        npm_globals = _exec(
            container, "npm list -g --depth=0 --parseable | tail -n +2 | xargs -r -n1 basename"
        )
    components = sorted((Share(k, v) for k, v in parts.items()), key=lambda s: -s.size_bytes)
    return {
        "image": image,
        "size_bytes": size,
        "versions": versions,
        "python_packages": python_packages.splitlines(),
        "npm_global": npm_globals.splitlines(),
        "components": [s.__dict__ for s in components],
        "layers": [s.__dict__ for s in layers(image)],
    }
