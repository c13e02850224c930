"""The audit trail: every command run in a sandbox, recorded by the host.

A JSON-lines file under the state folder, which is never mounted into a
sandbox, so a sandboxed command can neither forge nor erase its entries.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from ... import jsonl
from ...errors import UsageError


class AuditLog:
    """Append-only JSON lines at `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, entry: dict[str, Any]) -> None:
        """Append one entry (with the time); a single write, so concurrent appends interleave
        whole lines."""
        jsonl.append(self.path, {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry})

    def tail(self, count: int) -> list[dict[str, Any]]:
        """The last `count` entries, oldest first (unreadable lines are skipped); UsageError
        for a negative count."""
        if count < 0:
            raise UsageError(f"the number of entries must be 0 or more, got {count}")
        if not self.path.exists():
            return []
        with self.path.open(encoding="utf-8", errors="replace") as handle:
            last = deque(handle, maxlen=min(count, sys.maxsize))
        entries = []
        for line in last:
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return entries
