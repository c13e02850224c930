"""The server's sandboxes: the ones it started, by name, the default one started on first
use, all labelled `MCP_LABEL` (plus the `--label` ones) and removed when it closes."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ... import labels
from ...config import Settings
from ...errors import SandboxError, SandboxNotReady, UsageError
from ...runtime import Sandbox

# Marks every sandbox this server starts (beside the owner labels of an ephemeral one).
MCP_LABEL = f"{labels.PREFIX}.mcp"
# Labels the project sets on a sandbox; `--label` may not replace them.
RESERVED_LABELS = frozenset(
    {
        labels.MANAGED,
        labels.KIND,
        labels.VERSION,
        labels.INPUTS,
        labels.OWNER_PID,
        labels.OWNER_HOST,
        labels.EXPIRES,
        labels.OWNER,
        MCP_LABEL,
        *(f"{labels.PREFIX}.{key}" for key in ("config", "sandbox", "private", "source")),
    }
)


def parse_labels(items: Sequence[str]) -> dict[str, str]:
    """`KEY=VALUE` labels for the server's sandboxes; the project's own keys are refused."""
    found = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key or key != key.strip() or "\0" in item:
            raise UsageError(f"--label must be KEY=VALUE, got {item!r}")
        if key in RESERVED_LABELS:
            raise UsageError(f"--label {key} is set by stigmer-sandbox itself; pick another key")
        found[key] = value
    return found


@dataclass
class Entry:
    sandbox: Sandbox
    origin: str


class Sandboxes:
    """The sandboxes this server started, by name; the default one started on first use.
    Thread-safe: tools call it from worker threads."""

    def __init__(self, settings: Settings, extra_labels: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.labels = {**(extra_labels or {}), MCP_LABEL: "true"}
        self._entries: dict[str, Entry] = {}
        self._default: str | None = None
        self._lock = threading.Lock()
        self._starting = threading.Lock()  # one default, however many first calls race
        self.closed = False

    def get(self, name: str | None) -> Sandbox:
        """The sandbox called `name`, or the default one (started now if need be)."""
        if not name:
            return self.default()
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise UsageError(f"no sandbox {name!r} on this server (see sandbox_list)")
        return entry.sandbox

    def default(self) -> Sandbox:
        """The server's own sandbox, started with the project's settings on first use."""
        with self._starting:
            with self._lock:
                entry = self._entries.get(self._default or "")
            if entry is not None:
                return entry.sandbox
            sandbox = self._started(
                lambda: Sandbox.create_ephemeral(self.settings, extra_labels=self.labels)
            )
            self._add(sandbox, "default")
            self._default = sandbox.name
            return sandbox

    def create(self, image: str | None, snapshot: str | None, **egress: Any) -> Sandbox:
        """A new sandbox: the project's settings with this image or egress, or from a
        snapshot."""
        if image and snapshot:
            raise UsageError("give image or snapshot, not both")
        if snapshot:
            sandbox = self._checked(
                lambda: Sandbox.from_snapshot(
                    snapshot, self.settings, extra_labels=self.labels, **egress
                )
            )
            return self._add(sandbox, f"snapshot {snapshot}")
        sandbox = self._started(
            lambda: Sandbox.create_ephemeral(
                self.settings, image=image, extra_labels=self.labels, **egress
            )
        )
        return self._add(sandbox, "created")

    def fork(self, name: str | None) -> Sandbox:
        """A started copy of sandbox `name` (or the default)."""
        source = self.get(name)
        forked = self._checked(lambda: source.fork(extra_labels=self.labels))
        return self._add(forked, f"fork of {source.name}")

    def destroy(self, name: str | None) -> str:
        """Remove sandbox `name` (or the default one); its name."""
        with self._lock:
            chosen = name or self._default
            entry = self._entries.pop(chosen or "", None)
            if entry is not None and chosen == self._default:
                self._default = None
        if entry is None:
            if name:
                raise UsageError(f"no sandbox {name!r} on this server (see sandbox_list)")
            raise UsageError("the default sandbox is not running (nothing to destroy)")
        entry.sandbox.remove()
        return entry.sandbox.name

    def listing(self) -> list[dict[str, Any]]:
        """Each sandbox: name, whether it is the default, origin, image, egress, state."""
        with self._lock:
            entries = list(self._entries.values())
            default = self._default
        rows = []
        for entry in entries:
            sandbox = entry.sandbox
            try:
                container = sandbox.find()
                state = container.status if container is not None else "gone"
            except SandboxError as exc:
                state = f"unknown ({exc.message})"
            rows.append(
                {
                    "name": sandbox.name,
                    "default": sandbox.name == default,
                    "origin": entry.origin,
                    "image": sandbox.settings.image,
                    "egress": sandbox.settings.egress,
                    "state": state,
                }
            )
        return rows

    def close(self) -> list[tuple[str, str | None]]:
        """Remove every sandbox (in parallel: a client gives a server a few seconds to
        exit); each name with the error that kept it, if any. Later starts are refused."""
        with self._lock:
            self.closed = True
            entries = list(self._entries.values())
            self._entries.clear()
            self._default = None
        if not entries:
            return []
        with ThreadPoolExecutor(max_workers=min(8, len(entries))) as pool:
            return list(pool.map(_removed, [entry.sandbox for entry in entries]))

    def _started(self, make: Callable[[], Sandbox]) -> Sandbox:
        def start() -> Sandbox:
            sandbox = make()
            try:
                sandbox.up()
                sandbox.connect()
            except BaseException:
                with contextlib.suppress(SandboxError):
                    sandbox.remove()
                raise
            return sandbox

        return self._checked(start)

    def _checked(self, start: Callable[[], Sandbox]) -> Sandbox:
        if self.closed:
            raise SandboxNotReady("the MCP server is shutting down")
        return start()

    def _add(self, sandbox: Sandbox, origin: str) -> Sandbox:
        with self._lock:
            closed = self.closed
            if not closed:
                self._entries[sandbox.name] = Entry(sandbox, origin)
        if closed:  # started while the server was closing: it goes at once
            _removed(sandbox)
            raise SandboxNotReady("the MCP server is shutting down")
        return sandbox


def _removed(sandbox: Sandbox) -> tuple[str, str | None]:
    try:
        sandbox.remove()
    except SandboxError as exc:
        return sandbox.name, str(exc)
    return sandbox.name, None
