"""Preflight of `sandbox.build-full`: can every tool's download source be reached?

The full image fetches each `source: download` tool in its own build step, after
the slow Debian and PyPI tools; an unreachable host used to surface minutes into
the build, with advice about DNS. Here every URL the build will fetch is tried
first, in parallel with a short timeout, through the same proxy variables and
extra CA the build uses. URLs come from `dockerfiles/sandbox/install-tools.py`
itself, so the preflight and the build can never disagree. Debian and PyPI tools
come from the package sources the basic image already installs from: not probed.
"""

from __future__ import annotations

import importlib.util
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import BuildError, SandboxError
from . import debian_base
from .builder import load_tools

PROBE_TIMEOUT_S = 5.0
INSTALLER = "sandbox/install-tools.py"


@dataclass(frozen=True)
class Source:
    """Where the build fetches one tool, and why it cannot (empty when it can)."""

    tool: str
    url: str
    problem: str = ""


def _installer(context: Path) -> ModuleType:
    """install-tools.py from the build context, loaded as a module for its `tool_url`."""
    path = context / INSTALLER
    spec = importlib.util.spec_from_file_location("stigmer_install_tools", path)
    if spec is None or spec.loader is None:
        raise SandboxError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def download_sources(
    context: Path, arch: str, mirror: str, skipped: Iterable[str] = ()
) -> list[Source]:
    """The URL of every download tool the build will fetch, as install-tools.py builds it."""
    tool_url = _installer(context).tool_url
    leave_out = set(skipped)
    tools: dict[str, dict[str, Any]] = load_tools(context)
    return [
        Source(name, tool_url(name, spec, arch, mirror))
        for name, spec in tools.items()
        if spec.get("source") == "download" and name not in leave_out
    ]


def probe(url: str, timeout: float, tls: ssl.SSLContext | None = None) -> str:
    """Why `url` cannot be fetched, or "" when it answers.

    A one-byte ranged GET: servers and redirects treat it like the real download
    (a HEAD is refused by some), and no body is read.
    """
    request = urllib.request.Request(url, headers={"Range": "bytes=0-0"})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=tls):
            return ""
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} {exc.reason}"
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except (OSError, ValueError) as exc:  # timeouts, resets, a malformed mirror URL
        return str(exc) or type(exc).__name__


def check(
    sources: list[Source], timeout: float = PROBE_TIMEOUT_S, extra_ca: Path | None = None
) -> list[Source]:
    """`sources` with the problem of each, probed in parallel."""
    tls = ssl.create_default_context()
    if extra_ca is not None:
        tls.load_verify_locations(cafile=str(extra_ca))
    with ThreadPoolExecutor(max_workers=max(len(sources), 1)) as pool:
        problems = list(pool.map(lambda s: probe(s.url, timeout, tls), sources))
    return [Source(s.tool, s.url, problem) for s, problem in zip(sources, problems, strict=True)]


def require_reachable(sources: list[Source], mirror: str) -> None:
    """Stop, naming the tools and the flag that gets the build through, if any is unreachable."""
    failed = [s for s in sources if s.problem]
    if not failed:
        return
    names = [s.tool for s in failed]
    skip = " ".join(f"--skip-tool {name}" for name in names)
    where = f"the mirror {mirror}" if mirror else "their download hosts"
    fix = "make the mirror serve URL/<tool><original path>" if mirror else "--tools-mirror URL"
    raise BuildError(
        f"{len(failed)} tool download(s) do not answer from {where}: {', '.join(names)}",
        f"build without them: {skip}; or {fix}",
        details=tuple(f"{s.tool}: {s.url}: {s.problem}" for s in failed),
    )


def preflight(
    context: Path, mirror: str, skipped: Iterable[str], extra_ca: Path | None = None
) -> list[Source]:
    """Every download the full build will make, checked; raises when one is unreachable."""
    sources = download_sources(context, debian_base.architecture(), mirror, skipped)
    checked = check(sources, extra_ca=extra_ca)
    require_reachable(checked, mirror)
    return checked
