"""`deps.*`: the development environment's lock (requirements/dev.lock)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from invoke import Collection, Context, Exit

from .. import console
from ._common import settings, task


def _run(argv: list[str], root: Path, failure: str) -> None:
    console.echo_command(argv)
    code = subprocess.run(argv, cwd=root, check=False).returncode
    if code:
        raise Exit(console.error_line(failure), code)


@task(help={"test": "run the test suite on the new lock (default: on; --no-test skips it)"})
def upgrade(c: Context, test: bool = True) -> None:
    """Refresh requirements/dev.lock to the newest allowed versions, install it, run the tests."""
    from ..host import dependencies

    root = settings(c).root
    keep = f"the old lock is in git: `git checkout {dependencies.LOCK_FILE}`"
    locker = dependencies.locker_install_command()
    if locker:
        _run(locker, root, f"could not install {dependencies.LOCKER}")
    _run(dependencies.lock_command(upgrade=True), root, f"locking failed; {keep}")
    for argv in dependencies.install_commands(root):
        _run(argv, root, f"installing the new lock failed; {keep}")
    console.success(f"{dependencies.LOCK_FILE} refreshed and installed")
    if test:
        _run(
            [sys.executable, "-m", "invoke", "test"], root, f"tests failed on the new lock; {keep}"
        )


@task
def install(c: Context) -> None:
    """Install exactly what requirements/dev.lock pins (hashes checked), then this project."""
    from ..host import dependencies

    root = settings(c).root
    for argv in dependencies.install_commands(root):
        _run(argv, root, "installing the lock failed")
    console.success(f"installed {dependencies.LOCK_FILE}")


ns = Collection("deps", upgrade, install)
