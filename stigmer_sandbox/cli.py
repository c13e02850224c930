"""The `stigmer-sandbox` console script: the task tree without a checkout's tasks.py."""

from __future__ import annotations

import sys
from pathlib import Path

from invoke import Program

from . import __version__
from .tasks import build_namespace
from .tasks._common import check_startup


class SandboxProgram(Program):
    """Runs the package's namespace; reads `invoke.yaml` from the current folder."""

    def create_config(self) -> None:
        super().create_config()
        self.config.set_project_location(str(Path.cwd()))
        self.config.load_project()


def main() -> None:
    """Console-script entry point."""
    check_startup(Path.cwd(), sys.argv[1:])
    program = SandboxProgram(
        name="stigmer-sandbox",
        binary="stigmer-sandbox",
        version=__version__,
        namespace=build_namespace(Path.cwd()),
    )
    program.run()
