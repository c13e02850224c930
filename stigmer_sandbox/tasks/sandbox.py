"""`sandbox.*`: the sandbox images and the sandbox container."""

from __future__ import annotations

from invoke import Collection, Context, Exit

from .. import base_image, console, image_checks, image_report, images, labels
from ..config import Settings
from ..errors import UsageError
from ._common import settings, task

BUILD_HELP = {
    "tag": "image tag, repeatable (default: stigmer-sandbox-<kind>:local and :v<version>)",
    "no_cache": "rebuild every layer, ignoring the layer cache (default: off)",
    "pull": "pull the upstream base image first; fall back to the project base (default: off)",
    "target": "build only up to this Dockerfile stage, e.g. base (default: the final stage)",
    "build_arg": "KEY=VALUE build argument, repeatable (default: none)",
    "network": "network for RUN steps, e.g. host or none (default: the engine's bridge)",
    "ca_cert": "extra CA bundle (PEM) to trust during the build (default: config ca_cert, else "
    "PIP_CERT / REQUESTS_CA_BUNDLE / SSL_CERT_FILE / NODE_EXTRA_CA_CERTS)",
    "progress": "auto: live step view on a terminal; plain: raw build log (default: auto)",
    "force": "build even when an identical image exists (default: off)",
}


@task(
    help={
        "mirror": "Debian mirror URL, e.g. an internal mirror (default: config debian_mirror, "
        "else debootstrap's default)",
        "force": "rebuild even when an identical base image exists (default: off)",
    }
)
def bootstrap_base(c: Context, mirror: str | None = None, force: bool = False) -> None:
    """Build the Debian base image from Debian's archive (no registry needed)."""
    current = settings(c, debian_mirror=mirror)
    progress = console.Progress("bootstrap-base")

    def on_line(line: str) -> None:
        progress.update(line, phase=base_image.phase_of(line))

    try:
        result = base_image.bootstrap(current.base_image, current.debian_mirror, force, on_line)
    finally:
        progress.finish()
    size = console.human_bytes(result.size_bytes)
    if result.built:
        console.success(f"built {result.image} ({size}) in {progress.elapsed:.0f} s")
    else:
        console.success(f"up to date: {result.image} ({size}, inputs {result.inputs})")


def _options(
    tag: list[str],
    no_cache: bool,
    pull: bool,
    target: str | None,
    build_arg: list[str],
    network: str | None,
    ca_cert: str | None,
    force: bool,
) -> images.BuildOptions:
    return images.BuildOptions(
        tags=tuple(tag),
        no_cache=no_cache,
        pull=pull,
        target=target,
        build_args=images.parse_build_args(build_arg),
        network=network,
        ca_cert=ca_cert or "",
        force=force,
    )


def build_kind(
    current: Settings,
    kind: str,
    options: images.BuildOptions,
    progress: str,
    extra_args: dict[str, str] | None = None,
) -> images.BuildOutcome:
    """Plan, report and run one image build; prints its summary."""
    if progress not in ("auto", "plain"):
        raise UsageError(f"--progress must be auto or plain, got {progress!r}")
    view = console.StepView(f"build {kind}", plain_output=progress == "plain")
    try:
        planned = images.plan(current, kind, options, view, extra_args)
        console.info(f"base: {planned.base.reference} — {planned.base.reason}")
        if planned.extra_ca:
            console.info(
                f"trusting extra CA {planned.extra_ca.path} (from {planned.extra_ca.source})"
            )
        outcome = images.build(planned, view)
    finally:
        view.finish()
    _summary(kind, outcome)
    return outcome


def _summary(kind: str, outcome: images.BuildOutcome) -> None:
    size = console.human_bytes(outcome.size_bytes)
    short_id = outcome.image_id.removeprefix("sha256:")[:12]
    if not outcome.built:
        console.success(
            f"up to date: {outcome.tags[-1]} ({short_id}, {size}); "
            f"checked in {outcome.seconds:.2f} s"
        )
    else:
        console.success(
            f"built {kind}: {short_id}, {size} in {outcome.seconds:.0f} s; "
            f"layers reused {outcome.cached_steps}/{outcome.steps}"
        )
    console.plain("tags: " + ", ".join(outcome.tags))


@task(help={**BUILD_HELP}, iterable=["tag", "build_arg"])
def build_basic(
    c: Context,
    tag: list[str] | None = None,
    no_cache: bool = False,
    pull: bool = False,
    target: str | None = None,
    build_arg: list[str] | None = None,
    network: str | None = None,
    ca_cert: str | None = None,
    progress: str = "auto",
    force: bool = False,
) -> None:
    """Build stigmer-sandbox-basic:local (Python 3.11, Node 20, git, build tools)."""
    options = _options(tag or [], no_cache, pull, target, build_arg or [], network, ca_cert, force)
    build_kind(settings(c), "basic", options, progress)


def _kind_of(image: str) -> str:
    from .. import engine

    with engine.engine_errors():
        found = engine.client().images.get(image)
    return (found.labels or {}).get(labels.KIND) or ("full" if "full" in image else "basic")


@task(
    help={
        "image": "image to test (default: config image, i.e. STIGMER_SANDBOX_IMAGE or "
        "stigmer-sandbox-basic:local)",
        "json": "print the results as one JSON object (default: off)",
    }
)
def test(c: Context, image: str | None = None, json: bool = False) -> None:
    """Smoke-test a sandbox image: tools, packages, user, workspace, health check."""
    current = settings(c, image=image)
    kind = _kind_of(current.image)
    results = image_checks.smoke_test(current.image, kind)
    report = image_checks.as_json(current.image, results)
    if json:
        console.emit_json(report)
    else:
        for result in results:
            status = "pass" if result.passed else "fail"
            console.check_line(status, result.name, f"{result.detail}  ({result.seconds:.2f}s)")
        passed = sum(r.passed for r in results)
        console.plain(f"{passed} passed, {len(results) - passed} failed")
    if not report["ok"]:
        raise Exit(code=1)


def _print_shares(title: str, shares: list[dict[str, object]], total: int) -> None:
    console.plain()
    rows = [
        (
            s["name"],
            console.human_bytes(int(s["size_bytes"])),
            console.bar(int(s["size_bytes"]) / max(total, 1)),
        )
        for s in shares
    ]
    console.table((title, "size", "share of image"), rows)


@task(
    help={
        "image": "image to report on (default: config image)",
        "json": "print the report as one JSON object (default: off)",
    }
)
def report(c: Context, image: str | None = None, json: bool = False) -> None:
    """Show an image's tool versions and where its bytes go (per component and layer)."""
    current = settings(c, image=image)
    result = image_report.report(current.image)
    if json:
        console.emit_json(result)
        return
    total = int(result["size_bytes"])
    console.info(f"{current.image}: {console.human_bytes(total)}")
    console.table(("tool", "version"), sorted(result["versions"].items()))
    _print_shares("component", result["components"], total)
    _print_shares("layer (newest first)", result["layers"], total)


@task(
    help={
        **BUILD_HELP,
        "skip_tool": "leave this tool out (name from dockerfiles/tools.yaml), repeatable "
        "(default: install all)",
        "tools_mirror": "base URL replacing the tools' download hosts, for offline builds "
        "(default: config tools_mirror, else the original hosts)",
    },
    iterable=["tag", "build_arg", "skip_tool"],
)
def build_full(
    c: Context,
    tag: list[str] | None = None,
    no_cache: bool = False,
    pull: bool = False,
    target: str | None = None,
    build_arg: list[str] | None = None,
    network: str | None = None,
    ca_cert: str | None = None,
    progress: str = "auto",
    force: bool = False,
    skip_tool: list[str] | None = None,
    tools_mirror: str | None = None,
) -> None:
    """Build stigmer-sandbox-full:local: basic plus cloud and infrastructure CLIs."""
    current = settings(c, tools_mirror=tools_mirror)
    skipped = images.check_skipped(current.root / images.CONTEXT_DIR, skip_tool or [])
    shared = _options([], False, pull, None, [], network, ca_cert, False)
    basic = build_kind(current, "basic", shared, progress)
    options = _options(tag or [], no_cache, pull, target, build_arg or [], network, ca_cert, force)
    extra = {
        "BASIC_IMAGE": basic.tags[-1],
        "SKIP_TOOLS": skipped,
        "TOOLS_MIRROR": current.tools_mirror,
    }
    build_kind(current, "full", options, progress, extra)


ns = Collection("sandbox", bootstrap_base, build_basic, build_full, test, report)
