"""Helpers for image tests: throwaway project copies and a loopback artifact server."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import shutil
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from stigmer_sandbox.images import debian_base

from ..conftest import ROOT


def project_copy(tmp_path: Path) -> Path:
    """A project folder whose dockerfiles/ is a copy of the real one (safe to edit)."""
    project = tmp_path / "project"
    shutil.copytree(
        ROOT / "dockerfiles", project / "dockerfiles", ignore=shutil.ignore_patterns("*.crt")
    )
    return project


def _script(text: str) -> bytes:
    return f"#!/bin/sh\necho '{text}'\n".encode()


def _tar_gz(files: dict[str, bytes]) -> bytes:
    """Byte-for-byte reproducible (no timestamps), so equal inputs give equal checksums."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            archive.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def fake_artifact(spec: dict, arch: str) -> bytes:
    """An archive shaped like the real download whose binaries print what `expect` wants."""
    arch_name = spec.get("arch_names", {}).get(arch, arch)
    expected = spec["expect"].lstrip("^").replace("\\", "").replace(" +", " ")
    files = {
        path.format(arch=arch_name): _script(f"{expected} (fake {command})")
        for command, path in spec["binaries"].items()
    }
    if spec["archive"] == "binary":
        return next(iter(files.values()))
    return _tar_gz(files) if spec["archive"] == "tar.gz" else _zip(files)


def write_fake_tools(project: Path, root: Path, arch: str, corrupt: str | None = None) -> None:
    """Point every download tool at a fake artifact under `root` (mirror layout)."""
    from urllib.parse import urlsplit

    tools_file = project / "dockerfiles" / "tools.yaml"
    document = yaml.safe_load(tools_file.read_text())
    for name, spec in document["tools"].items():
        if spec["source"] != "download":
            continue
        data = fake_artifact(spec, arch)
        url = spec["url"].format(
            version=spec["version"], arch=spec.get("arch_names", {}).get(arch, arch)
        )
        target = root / name / urlsplit(url).path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        spec["sha256"] = {arch: "0" * 64 if name == corrupt else digest}
    tools_file.write_text(yaml.safe_dump(document, sort_keys=False))


@contextmanager
def serve(root: Path) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 serving `root`; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def download_tools(project: Path) -> list[str]:
    document = yaml.safe_load((project / "dockerfiles" / "tools.yaml").read_text())
    return [n for n, s in document["tools"].items() if s["source"] == "download"]


def build_full_from_mirror(
    inv, project: Path, tag: str, corrupt: str | None = None, skip: tuple[str, ...] = ()
):
    """`inv sandbox.build-full` of a project copy whose downloads come from a loopback
    mirror of fake artifacts; the PyPI and Debian tools install for real unless skipped."""
    mirror = project.parent / "mirror"
    write_fake_tools(project, mirror, debian_base.architecture(), corrupt=corrupt)
    skip = [arg for name in skip for arg in ("--skip-tool", name)]
    with serve(mirror) as url:
        done = inv(
            "sandbox.build-full",
            "--network",
            "host",
            "--tools-mirror",
            url,
            "--tag",
            tag,
            *skip,
            env={"INVOKE_STIGMER_PROJECT_DIR": str(project)},
        )
    return done
