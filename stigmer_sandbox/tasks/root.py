"""Root tasks: `doctor` and the other everyday commands."""

from __future__ import annotations

from invoke import Context, Exit

from .. import console, diagnostics
from ._common import settings, task


@task(help={"json": "print the report as one JSON object (default: off)"})
def doctor(c: Context, json: bool = False) -> None:
    """Check this host: Python packages, engine, compose, disk, images, workspace, CA."""
    checks = diagnostics.run_checks(settings(c))
    result = diagnostics.report(checks)
    if json:
        console.emit_json(result)
    else:
        for check in checks:
            console.check_line(check.status, check.name, check.detail, check.hint)
    if not result["ok"]:
        raise Exit(code=1)


TASKS = (doctor,)
