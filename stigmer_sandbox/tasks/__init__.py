"""The Invoke task tree: one module per namespace, assembled here."""

from __future__ import annotations

import sys
from pathlib import Path

from invoke import Collection

from .. import config
from . import compose, deps, dev, engine, mcp, root, sandbox
from ._common import check_startup


def build_namespace(project_dir: Path | None = None) -> Collection:
    """The root collection; `project_dir` holds `invoke.yaml`, `workspace/`, `dockerfiles/`."""
    defaults = config.defaults()
    if project_dir is not None:
        defaults["project_dir"] = str(project_dir)
        check_startup(project_dir, sys.argv[1:])
    namespace = Collection()
    for item in (*root.TASKS, *dev.TASKS, *mcp.TASKS):
        namespace.add_task(item)
    for sub in (sandbox.ns, compose.ns, engine.ns, deps.ns):
        namespace.add_collection(sub)
    namespace.configure({config.SECTION: defaults})
    return namespace
