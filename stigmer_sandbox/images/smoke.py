"""Smoke tests of a sandbox image: the guide's checks and more, in one container.

The check list lives in `resources/smoke-checks.tsv`, which
`scripts/test-sandbox.sh` reads too, so the two can never disagree.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from .. import engine, labels
from ..checks import CheckResult, verdict

HEALTH_TIMEOUT_S = 30.0
# Probe health often so the check takes seconds, with the image's own test command.
FAST_HEALTHCHECK = {
    "interval": 500_000_000,
    "start_period": 0,
    "retries": 3,
    "timeout": 5_000_000_000,
}
KEEPALIVE = ["sandbox-keepalive"]
TOOLS_MANIFEST = "/opt/tools/manifest.json"


@dataclass(frozen=True)
class SmokeCheck:
    """One check: a bash command and the pattern its output must contain."""

    name: str
    command: str
    expect: str
    kinds: tuple[str, ...]


def load_checks(kind: str, extra: list[SmokeCheck] | None = None) -> list[SmokeCheck]:
    """The checks that apply to an image of `kind`."""
    text = (
        resources.files("stigmer_sandbox")
        .joinpath("resources/smoke-checks.tsv")
        .read_text(encoding="utf-8")
    )
    checks = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        kinds, name, command, expect = line.split("\t")
        checks.append(SmokeCheck(name, command, expect, tuple(kinds.split(","))))
    return [c for c in [*checks, *(extra or [])] if kind in c.kinds]


@contextmanager
def probe_container(image: str, **options: Any) -> Iterator[Any]:
    """A throwaway, labelled container of `image` kept alive until the block ends."""
    client = engine.client()
    name = f"stigmer-probe-{uuid.uuid4().hex[:8]}"
    with engine.engine_errors():
        container = client.containers.run(
            image,
            KEEPALIVE,
            name=name,
            detach=True,
            labels=labels.project_labels("probe"),
            **options,
        )
    try:
        yield container
    finally:
        with engine.engine_errors():
            container.remove(force=True)


def run_check(container: Any, check: SmokeCheck) -> CheckResult:
    """Run one check inside `container`."""
    started = time.monotonic()
    with engine.engine_errors():
        code, output = container.exec_run(["bash", "-c", check.command], demux=False)
    text = (output or b"").decode(errors="replace").strip()
    took = time.monotonic() - started
    first = text.splitlines()[0][:100] if text else ""
    if code != 0:
        return CheckResult(check.name, "fail", f"exit {code}: {first}", seconds=took)
    match = re.search(check.expect, text, re.MULTILINE)
    if not match:
        detail = f"output does not match /{check.expect}/: {first}"
        return CheckResult(check.name, "fail", detail, seconds=took)
    line_start = text.rfind("\n", 0, match.start()) + 1
    matched_line = text[line_start:].split("\n", 1)[0][:100]
    return CheckResult(check.name, "pass", matched_line, seconds=took)


def wait_healthy(container: Any, timeout_s: float = HEALTH_TIMEOUT_S) -> CheckResult:
    """Wait until the container's health check reports healthy."""
    health = engine.wait_healthy(container, timeout_s)
    return CheckResult(
        "health check", verdict(health.healthy), health.detail, seconds=health.seconds
    )


def tool_checks(container: Any) -> list[SmokeCheck]:
    """One check per tool the full image recorded in its manifest."""
    with engine.engine_errors():
        code, output = container.exec_run(["cat", TOOLS_MANIFEST])
    if code != 0:
        return [SmokeCheck("tools manifest", f"cat {TOOLS_MANIFEST}", ".", ("full",))]
    manifest = json.loads(output)
    return [
        SmokeCheck(f"tool {name}", spec["check"], spec["expect"], ("full",))
        for name, spec in sorted(manifest.items())
    ]


def smoke_test(image: str, kind: str) -> list[CheckResult]:
    """Every check of `kind` against `image` (and each installed tool), plus health."""
    with probe_container(image, healthcheck=FAST_HEALTHCHECK) as container:
        extra = tool_checks(container) if kind == "full" else []
        results = [run_check(container, check) for check in load_checks(kind, extra)]
        results.append(wait_healthy(container))
    return results
