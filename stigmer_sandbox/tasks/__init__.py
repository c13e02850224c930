"""The Invoke task tree: one module per namespace, assembled here."""

from __future__ import annotations

import sys
from pathlib import Path

from invoke import Collection

from .. import config, console
from ..errors import ConfigError
from . import compose, dev, engine, root, sandbox


def build_namespace(project_dir: Path | None = None) -> Collection:
    """The root collection; `project_dir` holds `invoke.yaml`, `workspace/`, `dockerfiles/`."""
    defaults = config.defaults()
    if project_dir is not None:
        defaults["project_dir"] = str(project_dir)
        _check_project_file(project_dir / config.PROJECT_FILE)
    namespace = Collection()
    for item in (*root.TASKS, *dev.TASKS):
        namespace.add_task(item)
    for sub in (sandbox.ns, compose.ns, engine.ns):
        namespace.add_collection(sub)
    namespace.configure({config.SECTION: defaults})
    return namespace


def _check_project_file(path: Path) -> None:
    """Fail with one line before Invoke itself trips over a broken project file."""
    try:
        config.read_project_file(path)
    except ConfigError as exc:
        print(console.error_line(exc.message, exc.hint), file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
