"""Append-only JSON-lines files on the host (the audit trail, the image record)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def append(path: Path, entry: dict[str, Any], mode: int = 0o600) -> None:
    """Append `entry` as one line in a single `write` to a file opened for appending, so
    concurrent writers interleave whole lines and never lose one."""
    line = json.dumps(entry, sort_keys=True, default=str) + "\n"
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    try:
        descriptor = os.open(path, flags, mode)
    except FileNotFoundError:  # the folder only on the first entry: not on every command
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, flags, mode)
    try:
        os.write(descriptor, line.encode())
    finally:
        os.close(descriptor)
