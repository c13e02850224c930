"""`sandbox.*`: the sandbox images and the sandbox container."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from invoke import Collection, Context, Exit

from .. import console
from ..errors import UsageError
from . import fleet, processes
from ._common import (
    EGRESS_LISTS,
    SANDBOX_HELP,
    egress_settings,
    sandbox_for,
    settings,
    task,
    wait_seconds,
)

if TYPE_CHECKING:
    from .. import images, runtime
    from ..config import Settings

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
    from ..images import debian_base
    from ..images.record import ImageRecord

    current = settings(c, debian_mirror=mirror)
    progress = console.Progress("bootstrap-base")

    def on_line(line: str) -> None:
        progress.update(line, phase=debian_base.phase_of(line))

    try:
        result = debian_base.bootstrap(
            current.base_image,
            current.debian_mirror,
            force,
            on_line,
            record=ImageRecord.of(current),
        )
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
    from .. import images  # the builder is heavy: loaded when a build runs, not at start-up

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
    from .. import images

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
    from .. import engine, labels

    found = engine.image(image)
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
    from ..images import smoke

    current = settings(c, image=image)
    kind = _kind_of(current.image)
    results = smoke.smoke_test(current.image, kind)
    if not console.show_checks(results, json, image=current.image):
        raise Exit(code=1)


def _print_shares(title: str, shares: list[dict[str, Any]], total: int) -> None:
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
    from ..images import inventory

    result = inventory.report(current.image)
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
    from .. import images
    from ..images import ca, tool_sources

    current = settings(c, tools_mirror=tools_mirror)
    context = current.root / images.CONTEXT_DIR
    skipped = images.check_skipped(context, skip_tool or [])

    extra_ca = ca.detect(ca_cert or current.ca_cert)
    reachable = tool_sources.preflight(
        context, current.tools_mirror, skip_tool or [], extra_ca.path if extra_ca else None
    )
    if reachable:
        console.info(f"preflight: all {len(reachable)} tool downloads answer")
    shared = _options([], False, pull, None, [], network, ca_cert, False)
    basic = build_kind(current, "basic", shared, progress)
    options = _options(tag or [], no_cache, pull, target, build_arg or [], network, ca_cert, force)
    extra = {
        "BASIC_IMAGE": basic.tags[-1],
        "SKIP_TOOLS": skipped,
        "TOOLS_MIRROR": current.tools_mirror,
    }
    build_kind(current, "full", options, progress, extra)


def _notes(sandbox: runtime.Sandbox) -> None:
    for note in sandbox.notes:
        console.info(note)


@task(
    help={
        "image": "image to run (default: config image, i.e. STIGMER_SANDBOX_IMAGE or "
        "stigmer-sandbox-basic:local)",
        "network": "bridge, or none to cut the sandbox off (default: config network, bridge)",
        "timeout": "seconds to wait until the sandbox is healthy (default: 60)",
        **SANDBOX_HELP,
    },
    iterable=EGRESS_LISTS,
)
def up(
    c: Context,
    image: str | None = None,
    network: str | None = None,
    timeout: float | None = None,
    egress: str | None = None,
    allow: list[str] | None = None,
    deny: list[str] | None = None,
    allow_preset: list[str] | None = None,
    secret: list[str] | None = None,
    isolation: str | None = None,
) -> None:
    """Start the sandbox container (idempotent) and wait until it is healthy."""
    from .. import runtime

    chosen = egress_settings(
        c,
        egress,
        allow,
        deny,
        allow_preset,
        secret,
        image=image,
        network=network,
        isolation=isolation,
    )
    sandbox = runtime.Sandbox(chosen)
    started = time.monotonic()
    sandbox.up(timeout=wait_seconds(timeout))
    _notes(sandbox)
    state = sandbox.status()
    console.success(
        f"sandbox {state['name']} is up ({state['id']}, {state['image']}, "
        f"network {state['network']}) in {time.monotonic() - started:.1f} s"
    )


@task
def down(c: Context) -> None:
    """Stop and remove the sandbox container; the workspace on the host is kept."""
    sandbox = sandbox_for(c)
    if sandbox.remove():
        console.success(
            f"removed {sandbox.name}; workspace kept at {sandbox.settings.path('workspace')}"
        )
    else:
        console.info(f"{sandbox.name} is not running; nothing to do")


@task
def pause(c: Context) -> None:
    """Freeze the sandbox with its memory (processes, shells, servers) until resume."""
    sandbox = sandbox_for(c)
    if sandbox.pause():
        console.success(f"paused {sandbox.name}; `inv sandbox.resume` lets it run on")
    else:
        console.info(f"{sandbox.name} is paused already")


@task
def resume(c: Context) -> None:
    """Let a paused sandbox run on where it was."""
    sandbox = sandbox_for(c)
    if sandbox.resume():
        console.success(f"resumed {sandbox.name}")
    else:
        console.info(f"{sandbox.name} is not paused; nothing to do")


@task(help={"json": "print the status as one JSON object (default: off)"})
def status(c: Context, json: bool = False) -> None:
    """Show the sandbox's state, health, image, limits and mounts."""
    state = sandbox_for(c).status()
    if json:
        console.emit_json(state)
        return
    if not state["exists"]:
        console.warning(f"{state['name']} does not exist — start it with `inv sandbox.up`")
        raise Exit(code=1)
    mounts = ", ".join(
        f"{m['source']}→{m['target']}{'' if m['rw'] else ' (ro)'}" for m in state["mounts"]
    )
    rows = [
        ("name", state["name"]),
        ("state", state["state"]),
        ("health", state["health"]),
        ("image", state["image"]),
        ("network", state["network"]),
        ("memory", console.human_bytes(state["memory"] or 0)),
        ("cpus", (state["nano_cpus"] or 0) / 1e9),
        ("pids limit", state["pids_limit"]),
        ("read-only root", state["read_only"]),
        ("mounts", mounts),
    ]
    console.table(("key", "value"), rows)


@task(
    help={"root": "open the shell as root (refused unless allow_root_shell is set; default: off)"}
)
def shell(c: Context, root: bool = False) -> None:
    """Open an interactive bash in the sandbox (inherited terminal, not Invoke's pty)."""
    current = settings(c)
    if root and not current.allow_root_shell:
        raise UsageError(
            "a root shell is disabled", "set allow_root_shell: true in invoke.yaml to allow it"
        )
    from .. import runtime  # the runtime is heavy: loaded when a task uses it, not at start-up

    sandbox = runtime.Sandbox(current).up()
    code = sandbox.shell(root=root)
    if code:
        raise Exit(code=code)


@task(
    help={
        "follow": "keep printing new log lines (default: off)",
        "tail": "lines to show from the end, or all (default: all)",
    }
)
def logs(c: Context, follow: bool = False, tail: str = "all") -> None:
    """Show the sandbox container's logs (docker logs)."""
    for chunk in sandbox_for(c).logs(follow=follow, tail=tail):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()


@task
def inspect(c: Context) -> None:
    """Print the sandbox container's full configuration (docker inspect) as JSON."""
    console.emit_json(sandbox_for(c).inspect())


def _print_command(sandbox: runtime.Sandbox, command: str) -> None:
    result = sandbox.up().exec(command, timeout=120)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    if result.exit_code:
        raise Exit(code=result.exit_code)


@task
def env(c: Context) -> None:
    """Show the sandbox's environment variables (as its commands see them)."""
    _print_command(sandbox_for(c), "env | sort")


@task
def packages(c: Context) -> None:
    """List installed Python (pip list) and global Node (npm list -g) packages."""
    _print_command(sandbox_for(c), "pip list && echo && npm list -g --depth=0")


@task(
    help={
        "n": "number of most recent commands to show (default: 20)",
        "json": "print the entries as JSON (default: off)",
    }
)
def history(c: Context, n: int | None = None, json: bool = False) -> None:
    """Show the audit trail: the last commands run in sandboxes, recorded by the host."""
    from ..runtime.client.history import AuditLog

    entries = AuditLog(settings(c).path("state_dir") / "audit.jsonl").tail(20 if n is None else n)
    if json:
        console.emit_json(entries)
        return
    rows = [
        (
            e.get("time", ""),
            e.get("sandbox", ""),
            e.get("exit_code", ""),
            e.get("cause", ""),
            f"{e.get('duration_s', 0):.3f}s",
            str(e.get("command", ""))[:60],
        )
        for e in entries
    ]
    console.table(("time", "sandbox", "exit", "cause", "took", "command"), rows)


@task(
    help={
        "json": "print the records as JSON (default: off)",
        "denied": "only the refused attempts (default: all)",
        "name": "only this sandbox's attempts (default: the configured sandbox; all for "
        "--name all)",
        "policy": "show the policy the configuration gives instead (mode, allow and deny "
        "entries, presets, and the secrets' hosts, which go through the credentials broker) "
        "(default: off)",
    }
)
def egress(
    c: Context,
    json: bool = False,
    denied: bool = False,
    name: str | None = None,
    policy: bool = False,
) -> None:
    """Show the egress audit: every connection a sandbox tried, allowed or refused, and why."""
    from ..runtime import network

    current = settings(c)
    if policy:
        described = network.policy_of(current).to_dict()
        if json:
            console.emit_json(described)
        else:
            shown = [(k, ", ".join(v) if isinstance(v, list) else v) for k, v in described.items()]
            console.table(("key", "value"), [(k, v or "-") for k, v in shown])
        return
    chosen = None if name == "all" else name or current.container_name
    records = network.egress_records(current, chosen, denied_only=denied)
    if json:
        console.emit_json(records)
        return
    rows = [
        (
            str(r.get("time", ""))[11:23],
            r.get("sandbox", ""),
            r.get("decision", ""),
            r.get("rule", ""),
            f"{r.get('name') or r.get('address') or ''}:{r.get('port') or ''}",
            r.get("via", ""),
            r.get("command_id") or "",
        )
        for r in records
    ]
    console.table(("time", "sandbox", "decision", "rule", "destination", "via", "command"), rows)


@task(
    name="secrets",
    help={
        "json": "print the list as JSON (default: off)",
        "check": "read each secret's source now and say whether it gives a value; the value "
        "is never shown (default: off)",
    },
)
def list_secrets(c: Context, json: bool = False, check: bool = False) -> None:
    """List the configured secrets: names, sources, destinations; never values."""
    from .. import credentials
    from ..config import split_packages

    current = settings(c)
    rows = credentials.listing(
        current.secrets, split_packages(current.use_secrets), current.root, check
    )
    if json:
        console.emit_json(rows)
    elif not rows:
        console.info("no secrets configured: define them under 'secrets' in invoke.yaml")
    else:
        headers = ["name", "source", "from", "hosts", "applied", "in use"]
        shown = [
            [
                r["name"],
                r["source"],
                r["from"],
                ", ".join(r["hosts"]),
                r["applied"],
                "yes" if r["in_use"] else "no",
            ]
            + ([r["problem"] or "readable"] if check else [])
            for r in rows
        ]
        console.table([*headers, "check"] if check else headers, shown)
    if check and not all(r["readable"] for r in rows):
        raise Exit(code=1)


@task(
    name="audit",
    help={
        "json": "print the report as one JSON object (default: off)",
        "compose": "audit the running compose sandbox (`inv compose.up`), reached through its "
        "agent; never started from here (default: off, the `inv sandbox.up` sandbox)",
    },
)
def audit_security(c: Context, json: bool = False, compose: bool = False) -> None:
    """Check the running sandbox against every SECURITY.md property that applies."""
    from ..runtime import security_audit

    if compose:
        from ..host import compose as compose_host

        sandbox = compose_host.attach(settings(c))
    else:
        sandbox = sandbox_for(c)

    results = security_audit.audit(sandbox)
    if not console.show_checks(results, json, sandbox=sandbox.name):
        raise Exit(code=1)


ns = Collection(
    "sandbox",
    bootstrap_base,
    build_basic,
    build_full,
    test,
    report,
    up,
    down,
    pause,
    resume,
    status,
    shell,
    logs,
    inspect,
    env,
    packages,
    history,
    egress,
    list_secrets,
    audit_security,
    *processes.TASKS,
    *fleet.TASKS,
)
