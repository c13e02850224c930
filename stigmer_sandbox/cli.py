"""The `stigmer-sandbox` console script: the task tree without a checkout's tasks.py.

A plain `run` on a warm relay is answered without loading Invoke (`warm_run`)."""

from __future__ import annotations

import sys

from . import __version__, warm_run


def main() -> None:
    """Console-script entry point."""
    code = warm_run.try_run(sys.argv[1:])
    if code is not None:
        raise SystemExit(code)
    from pathlib import Path

    from invoke import Program  # ~70 ms: only when the task tree is needed

    from .tasks import build_namespace
    from .tasks._common import check_startup

    class SandboxProgram(Program):
        """Runs the package's namespace; reads `invoke.yaml` from the current folder."""

        def create_config(self) -> None:
            super().create_config()
            self.config.set_project_location(str(Path.cwd()))
            self.config.load_project()

    check_startup(Path.cwd(), sys.argv[1:])
    program = SandboxProgram(
        name="stigmer-sandbox",
        binary="stigmer-sandbox",
        version=__version__,
        namespace=build_namespace(Path.cwd()),
    )
    program.run()
