"""`sandbox.build-full` preflight against loopback servers only (127.0.0.1)."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from stigmer_sandbox.errors import BuildError
from stigmer_sandbox.images import tool_sources

from ..conftest import ROOT

CONTEXT = ROOT / "dockerfiles"
PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY")


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder and remembers every path asked for (as a proxy sees absolute URLs)."""

    asked: list[str]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.asked.append(self.path)
        super().do_GET()


@contextmanager
def serve(root: Path) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1 serving `root`: its base URL and the paths it was asked."""
    asked: list[str] = []
    handler = functools.partial(type("H", (_Handler,), {"asked": asked}), directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()


def closed_port_url() -> str:
    """A loopback URL on a port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def download_tools() -> list[str]:
    tools = yaml.safe_load((CONTEXT / "tools.yaml").read_text())["tools"]
    return [name for name, spec in tools.items() if spec["source"] == "download"]


def mirror_of(root: Path, mirror: str) -> None:
    """Files at every path the build would fetch from `mirror`."""
    for source in tool_sources.download_sources(CONTEXT, "amd64", mirror):
        target = root / source.url.removeprefix(mirror).lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x")


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


def test_sources_are_the_urls_the_installer_fetches_without_skipped_tools():
    sources = tool_sources.download_sources(CONTEXT, "arm64", "http://m.invalid/", ["helm"])
    assert [s.tool for s in sources] == [t for t in download_tools() if t != "helm"]
    kubectl = next(s for s in sources if s.tool == "kubectl")
    assert kubectl.url == "http://m.invalid/kubectl/release/v1.34.2/bin/linux/arm64/kubectl"
    gcloud = next(s for s in sources if s.tool == "gcloud")
    assert gcloud.url.endswith("-linux-arm.tar.gz")  # arch_names applied


def test_a_closed_port_stops_with_every_tool_and_both_fixes():
    mirror = closed_port_url()
    with pytest.raises(BuildError) as caught:
        tool_sources.preflight(CONTEXT, mirror, skipped=["gcloud"])
    error = caught.value
    expected = [t for t in download_tools() if t != "gcloud"]
    assert error.message.endswith(", ".join(expected))
    assert " ".join(f"--skip-tool {t}" for t in expected) in (error.hint or "")
    assert "make the mirror serve URL/<tool><original path>" in (error.hint or "")
    assert len(error.details) == len(expected)
    assert all("refused" in line for line in error.details), error.details


def test_a_mirror_that_answers_passes_and_is_asked_for_every_tool(tmp_path):
    with serve(tmp_path) as (mirror, asked):
        mirror_of(tmp_path, mirror)
        checked = tool_sources.preflight(CONTEXT, mirror, skipped=[])
    assert [s.problem for s in checked] == [""] * len(download_tools())
    assert sorted(p.split("/")[1] for p in asked) == sorted(download_tools())


def test_a_mirror_missing_one_file_names_that_tool_only(tmp_path):
    with serve(tmp_path) as (mirror, _asked):
        mirror_of(tmp_path, mirror)
        for path in (tmp_path / "helm").rglob("*.tar.gz"):
            path.unlink()
        with pytest.raises(BuildError) as caught:
            tool_sources.preflight(CONTEXT, mirror, skipped=[])
    assert caught.value.message.endswith(": helm")
    assert caught.value.details[0].endswith("HTTP 404 File not found")


def test_downloads_go_through_the_proxy_variables(tmp_path, monkeypatch):
    # The mirror host cannot resolve: only the proxy can answer for it.
    mirror = "http://tools-mirror.invalid"
    with serve(tmp_path) as (proxy, asked):
        for source in tool_sources.download_sources(CONTEXT, "amd64", mirror):
            # A forward proxy is asked for absolute URLs; serve them as paths.
            target = tmp_path / source.url
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"x")
        monkeypatch.setenv("http_proxy", proxy)
        checked = tool_sources.preflight(CONTEXT, mirror, skipped=[])
    assert all(not s.problem for s in checked), checked
    assert all(path.startswith(mirror) for path in asked)


def test_build_full_stops_before_building_anything(inv):
    done = inv("sandbox.build-full", "--tools-mirror", closed_port_url(), timeout=60)
    assert done.returncode == 4, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "--skip-tool kubectl" in lines[-1]
    assert [line.split(":")[0].strip(" |") for line in lines[:-1]] == download_tools()
    assert "base:" not in done.stdout and "Step" not in done.stdout
