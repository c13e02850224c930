"""Root tasks: `doctor` and the other everyday commands."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from invoke import Context, Exit

from .. import console
from ..errors import SandboxError, UsageError

if TYPE_CHECKING:
    from .. import runtime
    from ..host import cleanup, workflow
from .. import relay
from ..streams import stream_writer
from ._common import EGRESS_LISTS, SANDBOX_HELP, egress_settings, report_result, settings, task


@task(help={"json": "print the report as one JSON object (default: off)"})
def doctor(c: Context, json: bool = False) -> None:
    """Check this host: Python packages, engine, compose, disk, images, workspace, CA."""
    from ..host import diagnostics  # its probes are heavy: loaded when doctor runs

    if not console.show_checks(diagnostics.run_checks(settings(c)), json):
        raise Exit(code=1)


@task(
    help={
        "command": "the command, run by bash inside the sandbox; quote it (required, no default)",
        "json": "print the result object (exit code, output, cause...) instead of streaming "
        "(default: off)",
        "timeout": "seconds before the command and everything it started is killed "
        "(default: config timeout, 600)",
        "idle_timeout": "end the command once it has printed nothing for this many seconds, "
        "e.g. a stuck prompt (default: none)",
        "env": "KEY=VALUE for the command, repeatable (default: none)",
        "workdir": "working directory, relative to /workspace (default: /workspace, or the "
        "session's folder)",
        "network": "none runs it in a separate sandbox without network (default: config network)",
        "keep_background": "let background processes it starts outlive it, e.g. a server "
        "(default: off, they end with the command)",
        "session": "run it in this named shell session: cd, exports and an activated venv "
        "carry over to the next --session run (default: none, a fresh shell)",
        "background": "start it in the background and print its id; see inv sandbox.ps, "
        "sandbox.output, sandbox.kill (default: off)",
        **SANDBOX_HELP,
    },
    iterable=["env", *EGRESS_LISTS],
)
def run(
    c: Context,
    command: str,
    json: bool = False,
    timeout: float | None = None,
    idle_timeout: float | None = None,
    env: list[str] | None = None,
    workdir: str | None = None,
    network: str | None = None,
    keep_background: bool = False,
    session: str | None = None,
    background: bool = False,
    egress: str | None = None,
    allow: list[str] | None = None,
    deny: list[str] | None = None,
    allow_preset: list[str] | None = None,
    secret: list[str] | None = None,
    isolation: str | None = None,
) -> None:
    """Run a command in the sandbox (or on the host with STIGMER_EXECUTION_MODE=local)."""
    if session and background:
        raise UsageError("--background runs outside any session; drop one of the two")
    current = egress_settings(c, egress, allow, deny, allow_preset, secret, isolation=isolation)
    callbacks = {
        "on_stdout": None if json else stream_writer(sys.stdout),
        "on_stderr": None if json else stream_writer(sys.stderr),
    }
    options = {
        "timeout": timeout,
        "idle_timeout": idle_timeout,
        "env": relay.env_pairs(env or []),
        "cwd": workdir,
        "keep_background": keep_background,
    }
    # Ctrl-C ends the command (KeyboardInterrupt closes the relay connection, or the agent
    # channel). An ignored SIGINT inherited from the caller stays ignored on purpose: a
    # shell does that to its background jobs so that Ctrl-C at the terminal spares them.
    warm = not background and network is None and current.relay_idle_s > 0
    if warm and current.execution_mode != "local":
        request = {"command": command, "options": options, "session": session}
        answer = relay.run(current, request, **callbacks)
        if answer is not None:
            report_result(answer, json)
            return
    from .. import runtime

    sandbox = runtime.open_sandbox(current, network=network)
    if background:
        _start_background(_needs_sandbox(sandbox), command, options, json)
        return
    result = _run_in(sandbox, session, command, {**options, **callbacks})
    if warm and isinstance(sandbox, runtime.Sandbox):
        from ..runtime import relay_server

        relay_server.start_in_background(current)
    report_result(result, json)


def _run_in(
    sandbox: runtime.Sandbox | runtime.LocalSandbox,
    session: str | None,
    command: str,
    options: dict[str, Any],
) -> dict[str, Any]:
    """The result of `command` run in `sandbox` (in its `session`, if named); its notes shown."""
    runner = _needs_sandbox(sandbox).session(session) if session else sandbox
    result = runner.exec(command, **options)
    for note in sandbox.notes:
        console.warning(note)
    return result.to_dict()


def _needs_sandbox(sandbox: runtime.Sandbox | runtime.LocalSandbox) -> runtime.Sandbox:
    from .. import runtime

    if not isinstance(sandbox, runtime.Sandbox):
        raise UsageError("--session and --background need the sandbox, not local mode")
    return sandbox


def _start_background(
    sandbox: runtime.Sandbox, command: str, options: dict[str, Any], json: bool
) -> None:
    chosen = {key: options[key] for key in ("env", "cwd", "timeout")}
    process = sandbox.start(command, **chosen)
    if json:
        console.emit_json({"id": process.id, "command": command})
    else:
        print(process.id, flush=True)


@task(
    help={"progress": "auto: live build view on a terminal; plain: raw build log (default: auto)"}
)
def dev_full(c: Context, progress: str = "auto") -> None:
    """Everything from a fresh clone to a running, tested sandbox (idempotent)."""
    view = console.StepView("dev-full", plain_output=progress == "plain")
    from ..host import workflow

    done: list[workflow.StepResult] = []
    try:
        for result in workflow.dev_full(settings(c), view, lambda n: console.info(f"→ {n}")):
            view.finish()
            done.append(result)
    except SandboxError:
        view.finish()
        _steps_table(done)
        raise
    _steps_table(done)
    console.success(f"ready in {sum(r.seconds for r in done):.1f} s; next:")
    for line in workflow.NEXT_STEPS:
        console.plain(f"  {line}")


def _steps_table(done: list[workflow.StepResult]) -> None:
    if done:
        rows = [(r.name, f"{r.seconds:.1f}s", r.detail) for r in done]
        console.table(("step", "took", "result"), rows)


@task(
    help={
        "all_": "also remove the project's images (basic, full, base, hashed tags), networks "
        "and build intermediates (asks first; default: off)",
        "volumes": "also remove the project's volumes (asks first; default: off)",
        "system": "run the guide's `docker system prune -a` for the WHOLE machine, after a "
        "confirmation (default: off)",
        "dry_run": "list what would be removed and change nothing (default: off)",
        "yes": "do not ask for confirmation (default: off)",
        "json": "print what was (or would be) removed as JSON (default: off)",
    }
)
def clean(
    c: Context,
    all_: bool = False,
    volumes: bool = False,
    system: bool = False,
    dry_run: bool = False,
    yes: bool = False,
    json: bool = False,
) -> None:
    """Remove this project's labelled leftovers; never the workspace, never others' resources."""
    from ..host import cleanup  # it loads the image builder: not at start-up

    planned = cleanup.plan(settings(c), everything=all_, volumes=volumes)
    if dry_run:
        _report_clean(planned, [], json, "would remove")
        return
    if (all_ or volumes) and planned and not yes:
        console.confirm(
            f"Remove {len(planned)} project resources (containers, images"
            f"{', volumes' if volumes else ''})?"
        )
    removed, failed = cleanup.remove(planned)
    _report_clean(removed, failed, json, "removed")
    if system:
        if not yes:
            console.confirm(
                "`docker system prune -a` removes EVERY stopped container, unused "
                "network and unused image on this machine, not only this project's. "
                "Continue?"
            )
        pruned = cleanup.system_prune()
        reclaimed = sum(int(p.get("SpaceReclaimed") or 0) for p in pruned.values())
        console.success(f"system prune reclaimed {console.human_bytes(reclaimed)}")
    if failed:
        raise Exit(code=1)


def _report_clean(
    resources: list[cleanup.Resource],
    failed: list[tuple[cleanup.Resource, str]],
    json: bool,
    verb: str,
) -> None:
    from ..host import cleanup

    if json:
        console.emit_json(
            {
                verb.replace(" ", "_"): cleanup.as_json(resources),
                "failed": [{"id": r.id, "name": r.name, "error": e} for r, e in failed],
            }
        )
        return
    if resources:
        console.table(("kind", "name", "why"), [(r.kind, r.name[:70], r.reason) for r in resources])
    console.success(f"{verb} {len(resources)} resources")
    for resource, error in failed:
        console.warning(f"could not remove {resource.kind} {resource.name}: {error}")


@task(
    help={
        "to_host": "give the files to you (the host user; under sudo, the sudo user) instead "
        "of the user the sandbox runs as (default: off: your uid/gid, or 1000 for root)",
        "uid": "owner uid to set (default: the uid the sandbox runs as)",
        "gid": "owner gid to set (default: the uid)",
        "dry_run": "count what would change and change nothing (default: off)",
    }
)
def fix_permissions(
    c: Context,
    to_host: bool = False,
    uid: int | None = None,
    gid: int | None = None,
    dry_run: bool = False,
) -> None:
    """Fix "Permission denied" in the workspace: set its owner, never following symlinks."""
    from ..host import permissions

    owner = permissions.target_owner(to_host, uid, gid)
    changes = permissions.fix_ownership(settings(c), *owner, dry_run=dry_run)
    verb = "would change" if dry_run else "changed"
    for change in changes:
        console.success(
            f"{verb} {change.entries} entries in {change.folder} to {owner[0]}:{owner[1]}"
        )
        if change.problems:
            console.warning(f"some entries could not be reached: {change.problems}")
        if change.skipped:
            console.warning(change.skipped_line())


TASKS = (doctor, run, dev_full, clean, fix_permissions)
