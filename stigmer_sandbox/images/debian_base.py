"""A Debian base image made from Debian's archive, with no container registry.

`debootstrap --variant=minbase`, then slimmed the way the official
`debian:*-slim` images are (debuerreotype): dpkg path excludes for docs, man
pages and locales, apt configured to keep no caches or lists, and those files
removed. The result is imported under a project-owned name with the project's
labels and a hash of its inputs, so an unchanged second run does nothing.
This is the air-gapped path: point `--mirror` at an internal Debian mirror.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import engine, labels
from ..config import split_image
from ..errors import SandboxError
from .record import ImageRecord

SUITE = "bookworm"
VARIANT = "minbase"
# Bump when the slimming below changes, so existing bases count as stale.
RECIPE = "slim-3"

DPKG_EXCLUDES = """\
# Written by stigmer-sandbox, as in the official slim images: no docs, man pages, locales.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/man/*
"""
APT_CONF = {
    "docker-clean": (
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
        '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
        'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
        '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
        'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n'
    ),
    "docker-no-languages": 'Acquire::Languages "none";\n',
    "docker-gzip-indexes": 'Acquire::GzipIndexes "true";\n',
    "docker-autoremove-suggests": 'Apt::AutoRemove::SuggestsImportant "false";\n',
}
REMOVE_GLOBS = (
    "var/lib/apt/lists/*",
    "var/cache/apt/*.bin",
    "var/cache/apt/archives/*.deb",
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
    "var/log/*.log",
    "var/log/apt/*",
    "var/cache/ldconfig/aux-cache",
)
SLIM_DIRS = (
    "usr/share/groff",
    "usr/share/info",
    "usr/share/linda",
    "usr/share/lintian",
    "usr/share/man",
)
_PHASES = {
    "Retrieving": "downloading",
    "Validating": "downloading",
    "Extracting": "extracting",
    "Installing": "installing",
    "Unpacking": "installing",
    "Configuring": "configuring",
    "Base": "done",
}
IMAGE_CHANGES = (
    'CMD ["bash"]',
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
)


@dataclass(frozen=True)
class BaseResult:
    """What `bootstrap` did: the image, whether it was (re)built, and its size."""

    image: str
    image_id: str
    built: bool
    size_bytes: int
    inputs: str


def architecture() -> str:
    """The host's Debian architecture name (amd64, arm64, ...)."""
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf"}.get(machine, machine)


def inputs_hash(mirror: str) -> str:
    """Identity of everything that decides the base image's contents."""
    recipe = json.dumps(
        [
            SUITE,
            VARIANT,
            RECIPE,
            architecture(),
            mirror,
            DPKG_EXCLUDES,
            APT_CONF,
            REMOVE_GLOBS,
            IMAGE_CHANGES,
        ],
        sort_keys=True,
    )
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def phase_of(line: str) -> str | None:
    """The coarse step a debootstrap output line belongs to, if it starts one."""
    words = line.split()
    return _PHASES.get(words[1]) if len(words) > 1 and words[0] == "I:" else None


def bootstrap(
    image: str,
    mirror: str = "",
    force: bool = False,
    on_line: Callable[[str], None] | None = None,
    record: ImageRecord | None = None,
) -> BaseResult:
    """Build `image` from Debian's archive unless an identical one exists; write the new
    image's id into `record` (cleanup removes an untagged base only when it is there)."""
    wanted = inputs_hash(mirror)
    found = engine.find_image(image)
    if found is not None and (found.labels or {}).get(labels.INPUTS) == wanted and not force:
        return BaseResult(image, str(found.id), False, _size(found), wanted)
    _require_tools()
    workdir = Path(tempfile.mkdtemp(prefix="stigmer-base-", dir="/var/tmp"))
    try:
        rootfs = workdir / "rootfs"
        _debootstrap(rootfs, mirror, on_line or (lambda _line: None))
        slim(rootfs)
        _import(rootfs, image, wanted)
    finally:
        _remove_workdir(workdir)
    made = engine.image(image)
    if record is not None:
        record.add("base", [made.id])
    return BaseResult(image, str(made.id), True, _size(made), wanted)


def _size(image: Any) -> int:
    return int(image.attrs.get("Size", 0))


def _require_tools() -> None:
    if os.geteuid() != 0:
        raise SandboxError(
            "debootstrap needs root to build the base image",
            "run `sudo inv sandbox.bootstrap-base`",
        )
    if not shutil.which("debootstrap"):
        raise SandboxError("debootstrap is not installed", "run `inv engine.install`")


def _debootstrap(rootfs: Path, mirror: str, on_line: Callable[[str], None]) -> None:
    argv = ["debootstrap", f"--variant={VARIANT}", f"--arch={architecture()}", SUITE, str(rootfs)]
    if mirror:
        argv.append(mirror)
    tail: list[str] = []
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            tail = [*tail[-19:], line.rstrip()]
            on_line(line.rstrip())
    if process.returncode != 0:
        last = next((t for t in reversed(tail) if t.startswith("E:")), tail[-1] if tail else "")
        raise SandboxError(
            f"debootstrap failed ({process.returncode}): {last}",
            "check that Debian's archive (or --mirror) is reachable from this host",
        )


def slim(rootfs: Path) -> None:
    """Slim a debootstrapped tree in place like the official slim images."""
    (rootfs / "etc/dpkg/dpkg.cfg.d/docker").write_text(DPKG_EXCLUDES, encoding="utf-8")
    for name, text in APT_CONF.items():
        (rootfs / "etc/apt/apt.conf.d" / name).write_text(text, encoding="utf-8")
    policy = rootfs / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\n# no services start in containers\nexit 101\n", encoding="utf-8")
    policy.chmod(0o755)
    _write_sources(rootfs)
    _prune_docs(rootfs)
    for directory in SLIM_DIRS:
        _empty_dir(rootfs / directory)
    for pattern in REMOVE_GLOBS:
        for path in rootfs.glob(pattern):
            if path.is_file() or path.is_symlink():
                path.unlink()
    (rootfs / "etc/machine-id").write_text("", encoding="utf-8")


def _write_sources(rootfs: Path) -> None:
    """Add the updates and security suites, on the mirror debootstrap used."""
    sources = rootfs / "etc/apt/sources.list"
    first = sources.read_text(encoding="utf-8").split()
    mirror = first[1].rstrip("/") if len(first) > 1 else ""
    if not mirror:
        return
    sources.write_text(
        f"deb {mirror} {SUITE} main\n"
        f"deb {mirror} {SUITE}-updates main\n"
        f"deb {mirror}-security {SUITE}-security main\n",
        encoding="utf-8",
    )


def _prune_docs(rootfs: Path) -> None:
    for package_docs in _children(rootfs / "usr/share/doc"):
        for item in _children(package_docs):
            if item.name != "copyright":
                _remove(item)
    for item in _children(rootfs / "usr/share/locale"):
        if item.name != "locale.alias":
            _remove(item)


def _empty_dir(path: Path) -> None:
    for item in _children(path):
        _remove(item)


def _children(path: Path) -> list[Path]:
    return list(path.iterdir()) if path.is_dir() and not path.is_symlink() else []


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _import(rootfs: Path, image: str, wanted: str) -> None:
    repository, tag = split_image(image)
    changes = [*IMAGE_CHANGES]
    changes += [
        f"LABEL {key}={value}"
        for key, value in labels.project_labels("base", inputs=wanted).items()
    ]
    tar = subprocess.Popen(
        ["tar", "-C", str(rootfs), "--numeric-owner", "-cf", "-", "."], stdout=subprocess.PIPE
    )
    assert tar.stdout is not None
    with engine.engine_errors():
        answer = engine.client().api.import_image_from_stream(
            tar.stdout, repository=repository, tag=tag, changes=changes
        )
    tar.stdout.close()
    if tar.wait() != 0:
        raise SandboxError(f"tar of {rootfs} failed", "is the disk full?")
    last = json.loads(answer.splitlines()[-1]) if isinstance(answer, str) and answer else {}
    if "error" in last:  # the engine answers 200 and names the failure in the stream
        raise SandboxError(f"importing {image} failed: {str(last['error']).strip()[:200]}")


def _remove_workdir(path: Path) -> None:
    """Remove a temporary tree, refusing to descend into anything still mounted."""
    prefix = str(path.resolve())
    with open("/proc/mounts", encoding="utf-8") as mounts:
        mounted = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(mounted, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    shutil.rmtree(path, ignore_errors=True)
