"""Invoke entry point: `inv --list`. The tasks live in `stigmer_sandbox.tasks`."""

from pathlib import Path

from stigmer_sandbox.tasks import build_namespace

ns = build_namespace(Path(__file__).resolve().parent)
