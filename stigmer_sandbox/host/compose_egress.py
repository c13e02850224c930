"""The egress policy of a compose sandbox: the same gateway `Sandbox.up` puts in front.

The gateway and its network are made by `runtime.egress_gateway`, outside the compose
project (compose sees the network as external), so `inv sandbox.egress`, the audit's probe
and `inv clean` treat a compose sandbox like any other. The generated override puts the
sandbox service on that network only, at the fixed address the gateway expects, with the
gateway as resolver and proxy. Any other network the sandbox joins (the database's) is
made internal, with no host address: the sandbox reaches the services on it and nothing
else through it. A service of the user's that joined the sandbox's egress network could
become its router, and an external network could lead to the host: both are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .. import engine, labels
from ..config import Settings
from ..errors import ConfigError
from ..runtime import broker, network
from ..runtime.backends.docker import DOCKER
from ..runtime.egress_gateway import (
    GATEWAY_MODES,
    INHIBIT_IPV4,
    GatewayPlacement,
    GatewayStart,
    bridge_gateway,
)
from .compose_check import is_on

SANDBOX_SERVICE = "sandbox"
# `--advanced` maps this name to the host (extra_hosts); under a gateway it is an explicit
# allow entry of the host's bridge address, reached directly rather than by the proxy.
HOST_ALIAS = "host.docker.internal"


def with_policy_entries(settings: Settings, advanced: bool) -> Settings:
    """`settings` with what the chosen compose files add to the egress policy: with
    `--advanced` under a gateway, an allow entry for the host address host.docker.internal
    names (so the user sees it in `inv sandbox.egress` and can deny it)."""
    if not advanced or network.policy_of(settings).mode not in GATEWAY_MODES:
        return settings
    return settings.with_egress(allow=[bridge_gateway()], source="--advanced")


def gated(settings: Settings) -> bool:
    """Whether this compose sandbox sits behind an egress gateway."""
    return network.policy_of(settings).mode in GATEWAY_MODES


def placement(settings: Settings) -> GatewayPlacement | None:
    """The sandbox's place behind its gateway, once the gateway's network exists."""
    if not gated(settings):
        return None
    gateway = network.gateway_for(
        settings, settings.container_name, network.policy_of(settings), {}, DOCKER
    )
    return gateway.placement()


def begin(settings: Settings, service_labels: Mapping[str, str]) -> GatewayStart | None:
    """Make the gateway's network now and bring the gateway to the policy in a thread (None
    without a gateway). The gateway carries the sandbox service's own labels (a test's, a
    user's), never one that would say it is something else."""
    if not gated(settings):
        return None
    extra = {k: v for k, v in service_labels.items() if not k.startswith(labels.PREFIX)}
    chosen = network.policy_of(settings)
    gateway = network.gateway_for(settings, settings.container_name, chosen, extra, DOCKER)
    if chosen.brokered:  # a source that gives no value stops the start before anything
        gateway.broker.write_secrets()
    return gateway.begin()


def secret_keys(settings: Settings, image: str) -> dict[str, Any]:
    """The sandbox service's keys for the secrets it uses (none without): each secret's
    placeholder and the trust variables in its environment, the bundle that trusts the
    broker CA mounted read-only over the image's (what `Sandbox.up` gives, as compose
    writes it)."""
    if not settings.use_secrets:
        return {}
    options = broker.sandbox_options(settings, settings.container_name, image)
    volumes = [_volume(mount) for mount in options["mounts"]]
    return {"environment": options["environment"], "volumes": volumes}


def _volume(mount: Mapping[str, Any]) -> str:
    """A bind mount of the SDK's (`docker.types.Mount`) as compose's short syntax."""
    mode = "ro" if mount.get("ReadOnly") else "rw"
    return f"{mount['Source']}:{mount['Target']}:{mode}"


def service_keys(placed: GatewayPlacement, bypass: Sequence[str]) -> dict[str, Any]:
    """The sandbox service's keys in the generated override: the gateway's network only,
    its resolver, and proxy variables that leave out `bypass` (names reached directly)."""
    return {
        "networks": {placed.network: {"ipv4_address": placed.address}},
        "dns": [placed.resolver],
        "environment": placed.environment(bypass),
    }


def direct_names(config: Mapping[str, Any], advanced: bool) -> list[str]:
    """What the sandbox reaches without the proxy: the services that share a network with it
    (the database, by service and container name and alias; the gateway could not reach
    them), and host.docker.internal under `--advanced`."""
    services = config.get("services") or {}
    mine = set(_joined(services.get(SANDBOX_SERVICE) or {}))
    found = [HOST_ALIAS] if advanced else []
    for name, spec in sorted(services.items()):
        joined = (spec or {}).get("networks") or {}
        shared = mine.intersection(_joined(spec or {}))
        if name == SANDBOX_SERVICE or not shared:
            continue
        found.append(name)
        if (spec or {}).get("container_name"):
            found.append(str(spec["container_name"]))
        for shared_network in shared:
            entry = joined.get(shared_network) if isinstance(joined, Mapping) else None
            found += [str(alias) for alias in (entry or {}).get("aliases") or []]
    return list(dict.fromkeys(found))


def gateway_names(settings: Settings) -> tuple[str, str]:
    """The names of the sandbox's egress network and gateway container (existing or not)."""
    chosen = network.policy_of(settings)
    gateway = network.gateway_for(settings, settings.container_name, chosen, {}, DOCKER)
    return gateway.network_name, gateway.container_name


def refuse_bypasses(config: Mapping[str, Any], egress_network: str, gateway: str) -> None:
    """Refuse what compose resolved when it opens a way around the sandbox's gateway: a
    service of the user's on its egress network or in its gateway's (it could answer as
    the sandbox's router), `network_mode` on the sandbox, or an external network (it may
    reach the host)."""
    services = config.get("services") or {}
    defined = config.get("networks") or {}
    named = {key: (value or {}).get("name") or key for key, value in defined.items()}
    for name, spec in services.items():
        joined = {named.get(key, key) for key in _joined(spec or {})}
        inside = str((spec or {}).get("network_mode", "")) == f"container:{gateway}"
        if name != SANDBOX_SERVICE and (egress_network in joined or inside):
            raise ConfigError(
                f"service {name!r} joins the sandbox's egress network or gateway "
                f"({egress_network})",
                "only the sandbox may be on it: put the service on a network of its own",
            )
    sandbox = services.get(SANDBOX_SERVICE) or {}
    if sandbox.get("network_mode"):
        raise ConfigError(
            f"the sandbox service sets network_mode {sandbox['network_mode']!r}, which would "
            "take it around its egress gateway",
            "remove it, or start with --egress open",
        )
    for name in _joined(sandbox):
        if name != egress_network and (defined.get(name) or {}).get("external"):
            raise ConfigError(
                f"the sandbox joins the external network {name!r}, which may reach the host "
                "around its egress gateway",
                "remove it from the sandbox service, or start with --egress open",
            )


def network_keys(placed: GatewayPlacement, config: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level networks of the override: the gateway's (external to compose) and each
    other network the sandbox joins (`config`: what compose resolved), made internal with
    no host address."""
    defined = config.get("networks") or {}
    sandbox = (config.get("services") or {}).get(SANDBOX_SERVICE) or {}
    found: dict[str, Any] = {placed.network: {"external": True, "name": placed.network}}
    for name in _joined(sandbox):
        if name == placed.network or (defined.get(name) or {}).get("external"):
            continue  # an external one is refused by `refuse_bypasses`
        definition = dict(defined.get(name) or {})
        options = {**(definition.get("driver_opts") or {}), INHIBIT_IPV4: "true"}
        found[name] = {**definition, "internal": True, "driver_opts": options}
    return found


def _joined(service: Mapping[str, Any]) -> list[str]:
    joined = service.get("networks") or {}
    return list(joined) if isinstance(joined, Mapping | list) else []


def notes(settings: Settings, config: Mapping[str, Any], advanced: bool) -> list[str]:
    """What the user should know about a compose sandbox behind its gateway: the allow
    entry `--advanced` added, published ports that no longer reach it."""
    found = []
    if advanced:
        host = bridge_gateway()
        found.append(
            f"egress: host.docker.internal ({host}) is allowed for --advanced; "
            f"`--deny {host}` keeps the sandbox away from the host"
        )
    ports = published_ports_note(config)
    return [*found, ports] if ports else found


def published_ports_note(config: Mapping[str, Any]) -> str | None:
    """Ports published from a sandbox behind a gateway are not reachable from the host
    (its network has no host address): the line that says so, or None."""
    sandbox = (config.get("services") or {}).get(SANDBOX_SERVICE) or {}
    if not sandbox.get("ports"):
        return None
    return (
        "note: the sandbox's published ports are not reachable from the host while egress is "
        "enforced (its network has no host address); use --egress open to publish them"
    )


def stale_networks(project: str, config: Mapping[str, Any]) -> list[str]:
    """The project's networks that exist but were made for another egress mode (internal or
    host address differ): compose refuses to start with them until they are recreated."""
    defined = config.get("networks") or {}
    stale = []
    with engine.engine_errors():
        found = engine.client().networks.list(
            filters={"label": f"com.docker.compose.project={project}"}
        )
    for existing in found:
        key = (existing.attrs.get("Labels") or {}).get("com.docker.compose.network", "")
        wanted = defined.get(key)
        if not isinstance(wanted, Mapping) or wanted.get("external"):
            continue
        options = existing.attrs.get("Options") or {}
        now = (bool(existing.attrs.get("Internal")), options.get(INHIBIT_IPV4) == "true")
        then = (
            is_on(wanted.get("internal")),
            str((wanted.get("driver_opts") or {}).get(INHIBIT_IPV4)).lower() == "true",
        )
        if now != then:
            stale.append(existing.name)
    return stale
