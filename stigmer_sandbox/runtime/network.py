"""Which network a sandbox's container joins, as its egress policy says (issue 22).

- `none`: no network at all (`network_mode: none`);
- `open`: the engine's default bridge, as before egress policies existed;
- `public` and `allowlist`: the sandbox's own network behind its egress gateway
  (`egress_gateway`), started or brought to the policy before the sandbox is.

A policy changed on a running sandbox is applied to its gateway live (and said so); a
change of mode that moves the sandbox to another network recreates it (`Sandbox.up` says
which, as for any other change of its container's configuration).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .. import egress
from ..config import Settings
from . import broker
from .backends.base import Backend
from .backends.docker import DOCKER
from .client.history import AuditLog
from .egress_gateway import (
    GATEWAY_MODES,
    STATE_FOLDER,
    EgressGateway,
    GatewayStart,
    read_records,
)

# The command audit's newest entries searched for the command behind an egress attempt,
# and the slack around a command's start and end (clocks of host and gateway agree; the
# log lines are written a moment after the attempt).
AUDIT_JOIN_ENTRIES = 5000
JOIN_SLACK_S = 0.5
# A gateway looked up only to be removed needs no real policy.
_NO_POLICY = egress.EgressPolicy("allowlist", (), (), ())


def policy_of(settings: Settings) -> egress.EgressPolicy:
    """The egress policy the settings describe (`network: none` is mode none)."""
    return egress.EgressPolicy.from_settings(settings)


def policy_in_force(settings: Settings, name: str, attrs: Mapping[str, Any]) -> egress.EgressPolicy:
    """The egress policy running sandbox `name` is under, from what the engine and its
    gateway say: today's settings may differ from those it was started with (and a compose
    sandbox's policy came from `compose.up`'s flags)."""
    if (attrs.get("HostConfig") or {}).get("NetworkMode") == "none":
        return egress.EgressPolicy("none", (), (), ())
    gateway = gateway_for(settings, name, _NO_POLICY, {}, DOCKER)
    joined = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    if gateway.network_name not in joined:
        return egress.EgressPolicy("open", (), (), ())
    try:
        written = json.loads((gateway.config_dir / "policy.json").read_text(encoding="utf-8"))
        return egress.EgressPolicy.from_dict(written)
    except (OSError, ValueError, AttributeError):
        return policy_of(settings)  # behind a gateway whose configuration is not readable


def gateway_for(
    settings: Settings,
    name: str,
    policy: egress.EgressPolicy,
    extra_labels: Mapping[str, str],
    backend: Backend,
) -> EgressGateway:
    """The egress gateway of sandbox `name` (made or found by `up`/`apply`)."""
    return EgressGateway(settings, name, policy, extra_labels=extra_labels, backend=backend)


@dataclass
class Placement:
    """Where a sandbox's container goes: the spec keys that put it there, and the gateway
    being started meanwhile (None without one)."""

    options: dict[str, Any]
    gateway: GatewayStart | None = None
    options_again: Callable[[], dict[str, Any]] | None = None  # once the network exists

    def network_ready(self) -> bool:
        """Wait until the network exists (being made while the sandbox's container is
        created); whether `options` were right: False when the network got another subnet,
        and `options` are then updated."""
        if self.gateway is None or self.gateway.network_ready():
            return True
        assert self.options_again is not None
        self.options = self.options_again()
        return False

    def finish(self, name: str) -> list[str]:
        """Wait for the gateway; the lines to show (a policy applied to a running one)."""
        if self.gateway is None:
            return []
        outcome = self.gateway.result()
        if outcome != "restarted":
            return []
        mode = self.gateway.gateway.policy.mode
        return [f"{name}: egress policy ({mode}) applied live; its open connections were cut"]


def prepare(
    settings: Settings,
    name: str,
    extra_labels: Mapping[str, str],
    backend: Backend,
    image: str,
) -> Placement:
    """Make the network side of sandbox `name` ready for its policy: its gateway's network
    and the gateway itself in the background (`Placement.network_ready` waits for the
    network, `Placement.finish` for the gateway). With
    secrets, `image` (the sandbox's) gets the placeholders and the broker CA."""
    chosen = policy_of(settings)
    if chosen.mode == "none":
        return Placement({"network_mode": "none"})
    if chosen.mode not in GATEWAY_MODES:
        return Placement({})
    gateway = gateway_for(settings, name, chosen, extra_labels, backend)
    if chosen.brokered:  # a source that gives no value stops the start before anything
        gateway.broker.write_secrets()
    started = gateway.begin_all()

    def options() -> dict[str, Any]:
        found = gateway.sandbox_options()
        if settings.use_secrets:
            found = merged(found, broker.sandbox_options(settings, name, image))
        return found

    return Placement(options(), started, options)


def merged(spec: dict[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """`spec` with the network options in (the environment is added to, not replaced; a
    `network` replaces `network_mode`)."""
    result = dict(spec)
    if "network" in options:
        result.pop("network_mode", None)
    for key, value in options.items():
        if key == "environment":
            result["environment"] = {**spec.get("environment", {}), **value}
        elif key == "mounts":
            result["mounts"] = [*spec.get("mounts", []), *value]
        else:
            result[key] = value
    return result


def release(
    settings: Settings, name: str, backend: Backend, container: Any = None
) -> Callable[[], None]:
    """Start removing sandbox `name`'s gateway (if it has one) while its container goes;
    call the result once the container is gone: it waits, then removes the network (the
    egress audit stays). A `container` (the sandbox's) not on a gateway's network has none
    to remove: no engine call is made for it."""
    gateway = gateway_for(settings, name, _NO_POLICY, {}, backend)
    joined = ((getattr(container, "attrs", None) or {}).get("NetworkSettings") or {}).get(
        "Networks"
    )
    if isinstance(joined, Mapping) and joined and gateway.network_name not in joined:
        return lambda: None
    worker = threading.Thread(target=gateway.remove_container, daemon=True)
    worker.start()

    def finish() -> None:
        worker.join()
        gateway.down()

    return finish


def egress_records(
    settings: Settings, name: str | None = None, denied_only: bool = False
) -> list[dict[str, Any]]:
    """The egress audit of sandbox `name` (every sandbox with one when None), oldest first,
    each attempt with the id of the command that ran in that sandbox at the time, when
    exactly one did."""
    root = settings.path("state_dir") / STATE_FOLDER
    if name:
        names = [name]
    else:
        names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    found = [
        record
        for sandbox in names
        for record in read_records(root / sandbox / "logs", sandbox, denied_only)
    ]
    windows = _command_windows(settings)
    for record in found:
        record["command_id"] = _command_at(windows.get(record["sandbox"], []), record["time"])
    return sorted(found, key=lambda record: record["time"])


def _command_windows(settings: Settings) -> dict[str, list[tuple[float, float, str]]]:
    """(start, end, id) of the recent commands of each sandbox, from the command audit."""
    windows: dict[str, list[tuple[float, float, str]]] = {}
    for entry in AuditLog(settings.path("state_dir") / "audit.jsonl").tail(AUDIT_JOIN_ENTRIES):
        ended, took = entry.get("ended_at"), entry.get("duration_s")
        if isinstance(ended, int | float) and isinstance(took, int | float) and entry.get("id"):
            span = (float(ended) - float(took), float(ended))
            windows.setdefault(str(entry.get("sandbox")), []).append((*span, str(entry["id"])))
    return windows


def _command_at(windows: list[tuple[float, float, str]], when: str) -> str | None:
    """The one command running at `when`: within its own span, else within the slack
    around it (a log line written just after); None when none or several fit."""
    try:
        moment = datetime.fromisoformat(when).timestamp()
    except ValueError:
        return None
    for slack in (0.0, JOIN_SLACK_S):
        running = {cid for start, end, cid in windows if start - slack <= moment <= end + slack}
        if running:
            return running.pop() if len(running) == 1 else None
    return None
