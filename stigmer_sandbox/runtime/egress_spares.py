"""Spare egress gateways: started ahead for a process's next ephemeral sandbox or fork.

Starting a sandbox's gateway (a container that joins two networks) is most of what an
egress policy adds to a sandbox's start. With `egress_spares: N`, once a sandbox behind a
gateway is up, the process starts up to N more gateways in the background, each for a
sandbox name not used yet, under the same policy, state folder and subnet pool. The next
`Sandbox.create_ephemeral`, `fork` or `from_snapshot` under that policy takes a spare's
name, and its `up()` finds the gateway running that very policy ("unchanged").

Spares belong to the process that made them: none is offered to another process (so no
claim can race), those left when it exits are removed then, and `inv clean` removes those
of a process that was killed (their maker is gone and no sandbox has their name).
"""

from __future__ import annotations

import atexit
import contextlib
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from ..config import Settings
from . import network, snapshots
from .backends.base import Backend
from .egress_gateway import GATEWAY_MODES

# Seconds the exit waits for spares still starting, so none is left half made.
EXIT_WAIT_S = 10.0
EGRESS_OPTIONS = ("egress", "allow", "deny", "allow_presets", "secrets")

_lock = threading.Condition()
_ready: dict[tuple[str, ...], list[str]] = {}
_starting: dict[tuple[str, ...], int] = {}
_made: dict[str, tuple[Settings, Backend]] = {}  # every spare not yet taken


def _key(settings: Settings) -> tuple[str, ...]:
    """What a spare must share with the sandbox that takes it: policy, folder, subnets, and
    the name's stem (a spare's name looks like any other of that sandbox's)."""
    stem = snapshots.new_name(settings).rpartition("-")[0]
    return (
        network.policy_of(settings).fingerprint(),
        str(settings.path("state_dir")),
        settings.egress_subnets,
        stem,
    )


def _wanted(settings: Settings) -> bool:
    return settings.egress_spares > 0 and network.policy_of(settings).mode in GATEWAY_MODES


def name_for(settings: Settings, options: Mapping[str, Any] | None = None) -> str:
    """A name for a new private or ephemeral sandbox under `settings` and the egress keywords
    in `options`: a ready spare's (its gateway is up), else a new one."""
    options = options or {}
    chosen = settings
    if any(options.get(key) for key in EGRESS_OPTIONS):
        egress, allow, deny, presets, secrets = (_option(options, k) for k in EGRESS_OPTIONS)
        chosen = settings.with_egress(egress, allow, deny, presets, secrets=secrets)
    taken = take(chosen)
    return taken or snapshots.new_name(settings)


def _option(options: Mapping[str, Any], key: str) -> Any:
    value = options.get(key)
    return value if key == "egress" else tuple(value or ())


def take(settings: Settings) -> str | None:
    """The name of a ready spare for this policy (no longer offered), or None."""
    if not _wanted(settings):
        return None
    with _lock:
        names = _ready.get(_key(settings))
        if not names:
            return None
        name = names.pop(0)
        _made.pop(name, None)
        return name


def refill(settings: Settings, extra_labels: Mapping[str, str], backend: Backend) -> None:
    """Start, in the background, the spares this policy lacks (`egress_spares`)."""
    if not _wanted(settings):
        return
    key = _key(settings)
    with _lock:
        missing = settings.egress_spares - len(_ready.get(key, ())) - _starting.get(key, 0)
        if missing <= 0:
            return
        _starting[key] = _starting.get(key, 0) + missing
    for _ in range(missing):
        worker = threading.Thread(
            target=_start_one, args=(settings, key, dict(extra_labels), backend), daemon=True
        )
        worker.start()


def _start_one(
    settings: Settings, key: tuple[str, ...], extra_labels: dict[str, str], backend: Backend
) -> None:
    name = snapshots.new_name(settings)
    gateway = network.gateway_for(
        settings, name, network.policy_of(settings), extra_labels, backend
    )
    started = False
    try:
        gateway.up()
        started = True
    except Exception:  # a spare is an optimisation: the next sandbox starts its own
        _discard(settings, name, backend)
    finally:
        with _lock:
            _starting[key] -= 1
            if started:
                _ready.setdefault(key, []).append(name)
                _made[name] = (settings, backend)
            _lock.notify_all()


def spare_names() -> list[str]:
    """The names of this process's spares not yet taken (ready ones)."""
    with _lock:
        return sorted(_made)


def wait_started(wait_s: float = EXIT_WAIT_S) -> bool:
    """Wait until no spare is starting (at most `wait_s`); whether none is. A benchmark
    waits for this so a spare's start in the background is not timed with its next start."""
    with _lock:
        return _lock.wait_for(lambda: not any(_starting.values()), timeout=wait_s)


def discard_all(wait_s: float = EXIT_WAIT_S) -> None:
    """Remove every spare not taken, after those still starting are up (at most `wait_s`)."""
    with _lock:
        _lock.wait_for(lambda: not any(_starting.values()), timeout=wait_s)
        left = list(_made.items())
        _made.clear()
        _ready.clear()
    _discard_many(left)


def _discard_many(left: Sequence[tuple[str, tuple[Settings, Backend]]]) -> None:
    for name, (settings, backend) in left:
        _discard(settings, name, backend)


def _discard(settings: Settings, name: str, backend: Backend) -> None:
    """Remove a spare's gateway, network and folder (it served no sandbox: no audit)."""
    gateway = network.gateway_for(settings, name, network.policy_of(settings), {}, backend)
    with contextlib.suppress(Exception):  # ending anyway; `inv clean` removes what is left
        gateway.down(purge_logs=True)


atexit.register(discard_all)
