"""Install one pinned tool of the full image, as tools.yaml describes it.

Runs inside the image build (as root, with the basic image's venv Python,
which has PyYAML). Every download is checked against its pinned SHA-256 before
anything is unpacked; a mismatch stops the build with a message naming the
tool and both checksums. `--mirror URL` fetches `URL/<tool><original path>`
instead of the original host, for air-gapped builds.

    python install-tools.py --tools tools.yaml --only kubectl --skip "$SKIP_TOOLS"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import yaml

TOOLS_DIR = Path("/opt/tools")
BIN_DIR = Path("/usr/local/bin")
MANIFEST = TOOLS_DIR / "manifest.json"
CHUNK = 1 << 20


def fail(message: str) -> None:
    print(f"ERROR: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def architecture() -> str:
    return subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()


def tool_url(name: str, spec: dict, arch: str, mirror: str) -> str:
    arch_name = spec.get("arch_names", {}).get(arch, arch)
    url = spec["url"].format(version=spec["version"], arch=arch_name)
    if mirror:
        url = f"{mirror.rstrip('/')}/{name}{urlsplit(url).path}"
    return url


def download(name: str, url: str, expected: str, dest: Path) -> None:
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=300) as response, dest.open("wb") as out:
            while chunk := response.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except OSError as exc:
        fail(f"tool {name}: download of {url} failed: {exc}")
    got = digest.hexdigest()
    if got != expected:
        fail(f"tool {name}: checksum mismatch for {url}: expected sha256 {expected}, got {got}")
    print(f"verified {name} sha256 {got}", flush=True)


def _safe_member(name: str, target: Path) -> Path:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        fail(f"archive member escapes the target folder: {name}")
    return target / path


def unpack(name: str, kind: str, archive: Path, target: Path) -> None:
    if kind == "binary":
        return
    if kind == "tar.gz":
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                _safe_member(member.name, target)
                if member.issym() or member.islnk():
                    link_target = (
                        _safe_member(member.linkname, target)
                        if member.islnk()
                        else (target / PurePosixPath(member.name).parent / member.linkname)
                    )
                    if not str(link_target.resolve()).startswith(str(target.resolve())):
                        fail(f"tool {name}: link {member.name} points outside the archive")
            tar.extractall(target)
    elif kind == "zip":
        with zipfile.ZipFile(archive) as zipped:
            for member in zipped.namelist():
                _safe_member(member, target)
            zipped.extractall(target)
    else:
        fail(f"tool {name}: unknown archive type {kind!r}")


def install_download(name: str, spec: dict, arch: str, mirror: str) -> None:
    sha = spec.get("sha256", {}).get(arch)
    if not sha:
        fail(f"tool {name}: no sha256 pinned for architecture {arch}")
    arch_name = spec.get("arch_names", {}).get(arch, arch)
    target = TOOLS_DIR / name
    url = tool_url(name, spec, arch, mirror)
    with tempfile.TemporaryDirectory() as scratch:
        archive, tree = Path(scratch) / "download", Path(scratch) / "tree"
        tree.mkdir()
        download(name, url, sha, archive)
        if spec["archive"] == "binary":
            shutil.copyfile(archive, tree / next(iter(spec["binaries"].values())))
        else:
            unpack(name, spec["archive"], archive, tree)
        if spec.get("tree"):
            shutil.copytree(tree, target, symlinks=True)
        else:
            # Keep only the binaries: release archives often carry daemons and docs too.
            target.mkdir(parents=True)
            for command, relative in spec["binaries"].items():
                found = tree / relative.format(arch=arch_name)
                if not found.is_file():
                    fail(f"tool {name}: {relative} not found in the download")
                shutil.copyfile(found, target / command)
            spec = {**spec, "binaries": {command: command for command in spec["binaries"]}}
    for command, relative in spec["binaries"].items():
        binary = target / relative.format(arch=arch_name)
        if not binary.is_file():
            fail(f"tool {name}: {relative} not found in the download")
        binary.chmod(0o755)
        link(command, binary)


def install_pypi(name: str, spec: dict) -> None:
    venv = TOOLS_DIR / name
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [
            str(venv / "bin/pip"),
            "install",
            "--no-cache-dir",
            "--no-compile",
            "--disable-pip-version-check",
            f"{spec['package']}=={spec['version']}",
        ],
        check=True,
    )
    for command in spec["binaries"]:
        link(command, venv / "bin" / command)


def install_debian(name: str, spec: dict) -> None:
    packages = [
        f"{p}={spec['version']}" if spec.get("pin_version") else p for p in spec["packages"]
    ]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "-o", "APT::Update::Error-Mode=any", "update"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", *packages], check=True, env=env
    )
    subprocess.run(["apt-get", "clean"], check=True)
    shutil.rmtree("/var/lib/apt/lists", ignore_errors=True)
    Path("/var/lib/apt/lists/partial").mkdir(parents=True)


def link(command: str, binary: Path) -> None:
    destination = BIN_DIR / command
    destination.unlink(missing_ok=True)
    destination.symlink_to(binary)


def record(name: str, spec: dict) -> None:
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}
    manifest[name] = {
        "version": str(spec["version"]),
        "source": spec["source"],
        "check": spec["check"],
        "expect": spec["expect"],
    }
    MANIFEST.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tools", required=True, help="path of tools.yaml")
    parser.add_argument("--only", required=True, help="the tool to install")
    parser.add_argument("--skip", default="", help="comma-separated tools not to install")
    parser.add_argument("--mirror", default="", help="base URL replacing download hosts")
    args = parser.parse_args()
    tools = yaml.safe_load(Path(args.tools).read_text())["tools"]
    skipped = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skipped - set(tools)
    if unknown:
        fail(f"unknown tool(s) to skip: {', '.join(sorted(unknown))}; known: {', '.join(tools)}")
    if args.only in skipped:
        print(f"skipping {args.only} (--skip-tool)", flush=True)
        return
    spec = tools[args.only]
    TOOLS_DIR.mkdir(parents=True, exist_ok=True)
    installers = {
        "download": lambda: install_download(args.only, spec, architecture(), args.mirror),
        "pypi": lambda: install_pypi(args.only, spec),
        "debian": lambda: install_debian(args.only, spec),
    }
    installers[spec["source"]]()
    record(args.only, spec)
    print(f"installed {args.only} {spec['version']} from {spec['source']}", flush=True)


if __name__ == "__main__":
    main()
