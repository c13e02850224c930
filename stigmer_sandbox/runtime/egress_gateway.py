"""A sandbox's egress gateway: the container that enforces its egress policy (issue 22).

Layout (design B of the egress prototype): every sandbox gets its own small Docker
bridge network whose bridge has no host address (`inhibit_ipv4`: the sandbox cannot reach
the host through it), and one gateway container on that network and on the default
bridge. The gateway claims the network's IPAM gateway address (`.1`, reserved by Docker
but, with `inhibit_ipv4`, held by nobody), so the default route Docker gives the sandbox
leads into the gateway: nothing is set up inside the sandbox. In the gateway, nftables
sends all DNS to dnsmasq and TCP 80/443 to squid (intercepted; TLS is peeked for its SNI
and spliced, never decrypted), forwards other TCP only where the policy allows it, and
refuses the rest; squid also serves as the explicit proxy the sandbox's HTTP(S)_PROXY
names. Squid decides by name and by the resolved address, and an nft rule on squid's
own uid refuses its connections to refused addresses whatever DNS said (rebinding).
Every decision is logged (squid, ulogd2, dnsmasq) into a host folder; `records` merges
them into the egress audit.

Modes `none` and `open` have no gateway: the caller keeps `network_mode none`, or the
default bridge. This module renders the configuration from `egress.EgressPolicy` (the
model decides what the entries mean; the renderer only translates), and manages the
network and container; `Sandbox` merges `sandbox_options()` into its container spec.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from .. import egress, engine, labels
from ..config import Settings
from ..errors import SandboxError, UsageError
from ..images.services import ensure_gateway_image
from . import broker
from .backends.base import Backend
from .backends.docker import DOCKER

T = TypeVar("T")
GATEWAY_MODES = ("public", "allowlist")
# Where sandbox networks come from: /29s (.1 claimed by the gateway, .2 the gateway, the
# sandbox from .3). Docker's own pools hand out a /16 or /20 per network and run dry
# after ~30; these never overlap a network Docker already has (creation retries).
DEFAULT_SUBNETS = "10.231.0.0/16"
SUBNET_PREFIX = 29
MAX_SUBNET_TRIES = 64
BROKER_PORT = 3180  # the credentials broker, on the gateway's loopback
BROKER_PEER = "broker"
PROXY_PORT = 3128  # the explicit proxy (HTTP_PROXY)
# On a sandbox's /29: .1 is claimed by the gateway, .2 is the gateway, .3 the sandbox.
GATEWAY_HOST, SANDBOX_HOST = 2, 3
HTTP_INTERCEPT_PORT = 3129
TLS_INTERCEPT_PORT = 3130
CONFIG_DIR = "/etc/egress"  # in the gateway, read-only
LOG_DIR = "/var/log/egress"  # in the gateway; a host folder
STATE_FOLDER = "egress"  # <state_dir>/egress/<sandbox>/{config,logs}
READY_FILE = "ready"
# The gateway writes its generation here once its rules are loaded; the host writes it to
# CONNECTED_FILE once the sandbox's network is connected (see entrypoint.sh).
FILTERING_FILE = "filtering"
CONNECTED_FILE = "connected"
CONFIG_LABEL = f"{labels.PREFIX}.config"
BUMP_CERT = "/etc/squid/bump.pem"  # made in the image; never shown to a spliced client
INHIBIT_IPV4 = "com.docker.network.bridge.inhibit_ipv4"
# The engine's NAT rule for a network's subnet: the sandbox's traffic leaves through its
# gateway, never through the host, so the rule has nothing to do (and without it the engine
# makes the network ~30 ms sooner, on every fresh sandbox's start).
MASQUERADE = "com.docker.network.bridge.enable_ip_masquerade"
BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"
DEFAULT_TIMEOUT = 20.0
GATEWAY_MEMORY = "128m"
GATEWAY_PIDS = 128
GATEWAY_CAPABILITIES = (
    "NET_ADMIN",  # nft rules, the claimed address, the default route
    "NET_BIND_SERVICE",  # dnsmasq on 53
    "SETUID",  # squid and dnsmasq drop to their users
    "SETGID",
    "CHOWN",  # log files made for each daemon
    "KILL",
    "DAC_OVERRIDE",
    "FOWNER",
)
AUDIT_TAIL_BYTES = 8 * 1024 * 1024  # read at most this much of each log (the newest part)
# The audit is written to the host's disk at the sandbox's pace: unbounded, a flood of
# connection attempts wrote ~17 MB/s (one ~830-byte record per SYN). Each rule records at
# most LOG_RATE new connections a second after a burst of LOG_BURST (a pip install opens a
# few dozen); beyond that its attempts get the same verdict, and one record a second
# says some went unrecorded (OVER_RATE in its rule). DNS queries and new connections to
# the proxy beyond their rates are dropped unanswered (dnsmasq and squid log each one).
LOG_RATE, LOG_BURST = 10, 100
OVER_RATE = f"over {LOG_RATE}/s, not each recorded"
DNS_RATE, DNS_BURST = 100, 500
PROXY_RATE, PROXY_BURST = 50, 500
NO_PROXY = "localhost,127.0.0.1,::1"
RESOLV_FILES = ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf")
# IPv6 forms that carry an IPv4 address (egress.py judges them by that address): the
# gateway refuses them outright, IPv6 being off in every container of the engine anyway.
CARRIER_FORMS_V6 = (
    "::ffff:0:0/96",
    "::ffff:0:0:0/96",
    "::/96",
    "64:ff9b::/96",
    "2002::/16",
    "2001::/32",
)


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway's configuration files are rendered from."""

    policy: egress.EgressPolicy
    subnet: str  # the sandbox network, a /29
    host_addresses: tuple[str, ...]  # this host's own addresses and every bridge gateway
    upstream_dns: tuple[str, ...]  # the resolvers dnsmasq forwards to
    egress_router: str = ""  # the gateway's default route out
    # Test-only: domain -> stand-in resolver (None: answered NXDOMAIN by the gateway).
    test_dns_routes: tuple[tuple[str, str | None], ...] = ()
    generation: str = ""  # written to the ready file once the gateway listens
    broker_uid: int = 0  # the credentials broker's user (with brokered destinations)

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def claimed(self) -> str:
        """The network's IPAM gateway address, claimed by the gateway (the sandbox's route)."""
        return str(self.network.network_address + 1)

    @property
    def gateway_ip(self) -> str:
        return str(self.network.network_address + GATEWAY_HOST)


def refused_networks(host_addresses: Iterable[str]) -> list[egress.IPNetwork]:
    """The built-in refused ranges, the host's addresses and the IPv6 carrier forms, without
    a network that another one holds (squid warns about those)."""
    nets: list[egress.IPNetwork] = [r.network for r in egress.REFUSED_V4 + egress.REFUSED_V6]
    nets += [r.network for r in egress.host_refusals(tuple(host_addresses))]
    nets += [ipaddress.IPv6Network(text) for text in CARRIER_FORMS_V6]
    unique = sorted(set(nets), key=lambda n: (n.version, n.prefixlen, int(n.network_address)))
    kept: list[egress.IPNetwork] = []
    for net in unique:
        if not any(net.version == k.version and net.subnet_of(k) for k in kept):  # type: ignore[arg-type]
            kept.append(net)
    return kept


def _in_refused(network: egress.IPNetwork, refused: Sequence[egress.IPNetwork]) -> bool:
    """Whether an allow entry lies wholly in refused space: only then does it open a
    refused address (egress.py's rule: `0.0.0.0/0` does not open the metadata address)."""
    return any(network.version == r.version and network.subnet_of(r) for r in refused)  # type: ignore[arg-type]


def _v4(entries: Iterable[egress.Entry]) -> list[egress.Entry]:
    return [e for e in entries if e.network is not None and e.network.version == 4]


def _nft_elements(entries: Iterable[egress.Entry]) -> str:
    """`net . port` elements of an nft set (no port: every port)."""
    return ", ".join(f"{e.network} . {e.port if e.port else '1-65535'}" for e in entries)


def _nft_set(name: str, kind: str, elements: str) -> str:
    body = f" elements = {{ {elements} }}" if elements else ""
    return f"  set {name} {{ type {kind}; flags interval;{body} }}"


def split_allow(
    policy: egress.EgressPolicy, refused: Sequence[egress.IPNetwork]
) -> tuple[list[egress.Entry], list[egress.Entry], list[egress.Entry]]:
    """(unlocking, addresses, names): allow entries that open refused addresses (checked
    before the refused ranges), other address entries, and name/wildcard entries."""
    unlock = [e for e in policy.allow if e.network is not None and _in_refused(e.network, refused)]
    addresses = [e for e in policy.allow if e.network is not None and e not in unlock]
    names = [e for e in policy.allow if e.network is None]
    return unlock, addresses, names


class _LoggedVerdicts:
    """`logged(verdict, why)`: a jump to the chain that records a new connection (NFLOG
    group 1, at most LOG_RATE a second per chain) and gives it `verdict`."""

    def __init__(self) -> None:
        self.chains: dict[str, tuple[str, str]] = {}

    def __call__(self, verdict: str, why: str) -> str:
        name = "log_" + re.sub(r"[^a-z0-9]", "_", f"{verdict} {why}")
        self.chains[name] = (verdict, why)
        return f"jump {name}"

    def rendered(self) -> list[str]:
        lines = []
        for name, (verdict, why) in self.chains.items():
            limit = f"limit rate {LOG_RATE}/second burst {LOG_BURST} packets"
            lines += [
                f"  chain {name} {{",
                f'    {limit} counter log prefix "{why} " group 1 {verdict}',
                f'    limit rate 1/second counter log prefix "{why} ({OVER_RATE}) " group 1 '
                f"{verdict}",
                f"    counter {verdict}",
                "  }",
            ]
        return lines


def render_nft(config: GatewayConfig) -> str:
    """The gateway's ruleset: DNS to dnsmasq, HTTP(S) to squid, other TCP forwarded only
    where the policy allows it; every decision on a new connection logged (group 1), at a
    bounded rate."""
    policy, sb = config.policy, config.subnet
    refused = refused_networks(config.host_addresses)
    unlock, addresses, _names = split_allow(policy, refused)
    refused4 = ", ".join(str(n) for n in refused if n.version == 4)
    ports = f"{PROXY_PORT}, {HTTP_INTERCEPT_PORT}, {TLS_INTERCEPT_PORT}"
    pair = "ipv4_addr . inet_service"
    to = f"ip saddr {sb} ip daddr"  # a new connection from the sandbox to ...
    proxy = 'meta skuid "proxy" ip daddr'  # squid's own connection to ...

    logged = _LoggedVerdicts()
    dns = f"ip saddr {sb} meta l4proto {{ tcp, udp }} th dport 53"
    last = "refused not-in-allowlist" if policy.mode == "allowlist" else "refused not-tcp"
    public = (
        [f"    ip saddr {sb} meta l4proto tcp {logged('accept', 'allowed public')}"]
        if policy.mode == "public"
        else []
    )
    lines = [
        "flush ruleset",
        "table inet egress {",
        f"  set refused4 {{ type ipv4_addr; flags interval; auto-merge; "
        f"elements = {{ {refused4} }} }}",
        _nft_set("deny4", pair, _nft_elements(_v4(policy.deny))),
        _nft_set("unlock4", pair, _nft_elements(_v4(unlock))),
        _nft_set("allow4", pair, _nft_elements(_v4(addresses))),
        "  chain sb_pre {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        f"    ip saddr {sb} meta l4proto {{ tcp, udp }} th dport 53 counter redirect to :53",
        f"    ip saddr {sb} tcp dport 80 counter redirect to :{HTTP_INTERCEPT_PORT}",
        f"    ip saddr {sb} tcp dport 443 counter redirect to :{TLS_INTERCEPT_PORT}",
        "  }",
        "  chain sb_fwd {",
        "    type filter hook forward priority filter; policy drop;",
        "    ct state established,related accept",
        f"    meta nfproto ipv6 {logged('reject', 'refused ipv6')}",
        f"    {to} . tcp dport @deny4 {logged('reject', 'refused deny')}",
        f"    {to} . tcp dport @unlock4 {logged('accept', 'allowed allow')}",
        f"    {to} @refused4 {logged('reject', 'refused refused-address')}",
        f"    {to} . tcp dport @allow4 {logged('accept', 'allowed allow')}",
        *public,
        f"    ip saddr {sb} {logged('reject', last)}",
        f"    {logged('drop', 'refused inbound')}",
        "  }",
        "  chain sb_post {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f"    ip saddr {sb} ip daddr != {sb} masquerade",
        "  }",
        "  chain sb_in {",
        "    type filter hook input priority filter; policy accept;",
        "    iif lo accept",
        # Before the established flows: a UDP socket's queries are one flow after the first.
        f"    {dns} limit rate over {DNS_RATE}/second burst {DNS_BURST} packets counter drop",
        "    ct state established,related accept",
        f"    {dns} accept",
        f"    ip saddr {sb} tcp dport {{ {ports} }} ct state new "
        f"limit rate over {PROXY_RATE}/second burst {PROXY_BURST} packets counter drop",
        f"    ip saddr {sb} tcp dport {{ {ports} }} accept",
        f"    ip saddr {sb} {logged('reject', 'refused gateway')}",
        f"    meta l4proto {{ tcp, udp }} th dport {{ 53, {ports} }} counter drop",
        "  }",
        "  chain sb_out {",
        "    type filter hook output priority filter; policy accept;",
        "    oif lo accept",
        # First: squid's replies to the sandbox (a refused address) must pass.
        "    ct state established,related accept",
        "    meta nfproto ipv6 counter drop",
        # The last word on squid's own connections, whatever DNS said (rebinding).
        f"    {proxy} . tcp dport @deny4 {logged('reject', 'refused deny')}",
        f"    {proxy} . tcp dport @unlock4 accept",
        f"    {proxy} @refused4 {logged('reject', 'refused refused-address')}",
        *_broker_rules(config, logged),
        # dnsmasq only ever talks DNS.
        '    meta skuid "dnsmasq" meta l4proto { tcp, udp } th dport != 53 counter reject',
        "  }",
        *logged.rendered(),
        "}",
    ]
    return "\n".join(lines) + "\n"


def _annotation(tag: str) -> str:
    """An annotate_transaction value: the rule's text without spaces or quotes."""
    return re.sub(r"[^A-Za-z0-9._:*/\[\]-]", "_", tag)


class _SquidAcls:
    """Builds squid ACL lines for entries, numbering them."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.count = 0

    def annotate(self, rule: str) -> str:
        self.count += 1
        name = f"r{self.count}"
        self.lines.append(f"acl {name} annotate_transaction rule={_annotation(rule)}")
        return name

    def entry(self, entry: egress.Entry) -> tuple[list[str], str | None]:
        """(ACLs that all match the entry's destination and port, the SNI ACL or None)."""
        self.count += 1
        base = f"e{self.count}"
        names: list[str] = []
        sni: str | None = None
        if entry.kind == "name":
            self.lines.append(f"acl {base}d dstdomain -n {entry.host}")
            self.lines.append(f"acl {base}s ssl::server_name {entry.host}")
            names.append(f"{base}d")
            sni = f"{base}s"
        elif entry.kind == "wildcard":  # names under it, not itself (docs/egress.md)
            pattern = r"\." + re.escape(entry.host) + "$"
            self.lines.append(f"acl {base}d dstdom_regex -n -i {pattern}")
            self.lines.append(f"acl {base}s ssl::server_name_regex -i {pattern}")
            names.append(f"{base}d")
            sni = f"{base}s"
        else:
            self.lines.append(f"acl {base}a dst {entry.network}")
            names.append(f"{base}a")
        if entry.port is not None:
            self.lines.append(f"acl {base}p port {entry.port}")
            names.append(f"{base}p")
            if sni:
                self.lines.append(f"acl {base}sp port {entry.port}")
                sni = f"{sni} {base}sp"
        return names, sni


def _broker_rules(config: GatewayConfig, logged: Callable[[str, str], str]) -> list[str]:
    """The broker's own connections (it shares the gateway's network namespace) get
    squid's last word: whatever DNS said when it resolved a secret's host."""
    if not config.policy.brokered:
        return []
    broker = f"meta skuid {config.broker_uid} ip daddr"
    return [
        f"    {broker} . tcp dport @deny4 {logged('reject', 'refused deny')}",
        f"    {broker} . tcp dport @unlock4 accept",
        f"    {broker} @refused4 {logged('reject', 'refused refused-address')}",
    ]


def _broker_routes(policy: egress.EgressPolicy, acls: _SquidAcls) -> list[str]:
    """Connections to a secret's destinations (CONNECT or intercepted TLS, by name or
    SNI) go to the broker, never straight out; squid's access rules decided first."""
    if not policy.brokered:
        return []
    peer = (
        f"cache_peer 127.0.0.1 parent {BROKER_PORT} 0 no-query no-digest "
        f"no-netdb-exchange name={BROKER_PEER}"
    )
    lines = [peer]
    for entry in policy.brokered:
        match, sni = acls.entry(entry)
        for chosen in filter(None, (" ".join(match), sni)):
            lines += [
                f"cache_peer_access {BROKER_PEER} allow {chosen}",
                f"never_direct allow {chosen}",
            ]
    return [*lines, f"cache_peer_access {BROKER_PEER} deny all"]


def render_squid(config: GatewayConfig) -> str:
    """Squid: the explicit proxy, intercepted HTTP, intercepted TLS (SNI peek, splice).
    Order: deny entries, allows that open refused addresses, refused addresses (by the
    resolved address: rebinding), other allows, then the mode."""
    policy = config.policy
    refused = refused_networks(config.host_addresses)
    unlock, addresses, names = split_allow(policy, refused)
    acls = _SquidAcls()
    access = [f"http_access deny !sb {acls.annotate('not-this-sandbox')}"]
    bump = ["ssl_bump peek step1"]
    for entry in policy.deny:
        match, sni = acls.entry(entry)
        rule = acls.annotate(f"deny:{entry}")
        access.append(f"http_access deny {' '.join(match)} {rule}")
        if sni:
            bump.append(f"ssl_bump terminate {sni} {rule}")
    splice: list[str] = []
    for entry in unlock:
        match, _ = acls.entry(entry)
        access.append(f"http_access allow {' '.join(match)} {acls.annotate(f'allow:{entry}')}")
        splice.append(" ".join(match))
    refused_rule = acls.annotate("refused-address")
    access.append(f"http_access deny refused_dst {refused_rule}")
    for entry in [*addresses, *names]:
        match, sni = acls.entry(entry)
        access.append(f"http_access allow {' '.join(match)} {acls.annotate(f'allow:{entry}')}")
        splice.append(sni or " ".join(match))
    if policy.mode == "public":
        access.append(f"http_access allow {acls.annotate('public')}")
        bump.append("ssl_bump splice all")
        settings = []
    else:
        # An intercepted request whose Host does not resolve to the address it was sent
        # to is refused (409): an allowed name must not front for another address.
        settings = ["host_verify_strict on"]
        # Intercepted TLS: the address was judged above; the name (SNI) is judged here.
        access.append(f"http_access allow tls_in {acls.annotate('sni-check')}")
        bump += [f"ssl_bump splice {match}" for match in splice]
        bump.append(f"ssl_bump terminate {acls.annotate('not-in-allowlist')}")
    access.append(f"http_access deny all {acls.annotate('not-in-allowlist')}")
    routes = _broker_routes(policy, acls)
    refused_text = " ".join(str(n) for n in refused)
    head = [
        f"http_port {PROXY_PORT}",
        f"http_port {HTTP_INTERCEPT_PORT} intercept",
        f"https_port {TLS_INTERCEPT_PORT} intercept ssl-bump tls-cert={BUMP_CERT} name=tls_in",
        "dns_nameservers 127.0.0.1",
        "cache deny all",
        "pinger_enable off",
        "sslcrtd_children 1 startup=0 idle=1",
        "cache_mem 8 MB",
        "shutdown_lifetime 1 seconds",
        "forwarded_for delete",
        "via off",
        "umask 022",
        "pid_filename /run/squid/squid.pid",
        f"cache_log {LOG_DIR}/cache.log",
        "logfile_rotate 0",
        "logformat egress %ts.%03tu %>a %rm %ru sni=%ssl::>sni dst=%<a:%<p "
        "orig=%>la:%>lp %Ss/%03>Hs rule=%{rule}note",
        f"access_log stdio:{LOG_DIR}/access.log egress",
        f"acl sb src {config.subnet}",
        "acl tls_in myportname tls_in",
        "acl step1 at_step SslBump1",
        f"acl refused_dst dst {refused_text}",
        *settings,
        *acls.lines,
    ]
    return "\n".join(head + access + bump + routes) + "\n"


def _under(name: str, domain: str) -> bool:
    return name == domain or name.endswith("." + domain)


def render_dnsmasq(config: GatewayConfig) -> str:
    """dnsmasq, the sandbox's only resolver: in `public` it forwards every name, in
    `allowlist` only names an allow entry covers (others are refused). Deny entries are
    judged by squid, which knows the port; a refused name still fails there."""
    lines = [
        "no-resolv",
        "no-hosts",
        "user=dnsmasq",
        "port=53",
        "bind-dynamic",
        "filter-AAAA",  # IPv6 is off in the sandbox; AAAA answers would only mislead
        "cache-size=1000",
        "log-queries=extra",
        f"log-facility={LOG_DIR}/dns.log",
    ]
    routes = dict(config.test_dns_routes)
    for domain, server in routes.items():
        lines.append(f"server=/{domain}/{server}" if server else f"address=/{domain}/")
    if config.policy.mode == "public":
        lines += [f"server={server}" for server in config.upstream_dns]
    else:
        domains = sorted({e.host for e in config.policy.allow if e.network is None})
        for domain in domains:
            if any(_under(domain, routed) for routed in routes):
                continue  # the test's stand-in resolver answers it
            lines += [f"server=/{domain}/{server}" for server in config.upstream_dns]
    return "\n".join(lines) + "\n"


ULOGD_CONF = f"""[global]
logfile="{LOG_DIR}/ulogd.log"
loglevel=5
plugin="/usr/local/lib/ulogd/ulogd_inppkt_NFLOG.so"
plugin="/usr/local/lib/ulogd/ulogd_raw2packet_BASE.so"
plugin="/usr/local/lib/ulogd/ulogd_filter_IP2STR.so"
plugin="/usr/local/lib/ulogd/ulogd_output_JSON.so"
stack=log1:NFLOG,base1:BASE,ip2str1:IP2STR,json1:JSON

[log1]
group=1
# Each packet written at once (the kernel would batch up to a second of them).
netlink_qthreshold=1
netlink_qtimeout=1

[json1]
file="{LOG_DIR}/packets.json"
sync=1
"""


def render(config: GatewayConfig) -> dict[str, str]:
    """Every file of the gateway's /etc/egress, by name."""
    if config.policy.mode not in GATEWAY_MODES:
        raise UsageError(f"egress mode {config.policy.mode!r} has no gateway")
    env = {
        "GW_INT_IP": config.gateway_ip,
        "VGW": config.claimed,
        "EGRESS_ROUTER": config.egress_router,
        "GENERATION": config.generation,
        "BROKER_PORT": str(BROKER_PORT) if config.policy.brokered else "",
    }
    for value in env.values():
        if not re.fullmatch(r"[A-Za-z0-9.:_-]*", value):
            raise UsageError(f"bad gateway setting {value!r}")
    return {
        "gw.nft": render_nft(config),
        "squid.conf": render_squid(config),
        "dnsmasq.conf": render_dnsmasq(config),
        "ulogd.conf": ULOGD_CONF,
        "env": "".join(f"{key}={value}\n" for key, value in env.items()),
    }


# --------------------------------------------------------------------------- the host


def host_addresses() -> tuple[str, ...]:
    """This host's own addresses (`ip -j addr`) and the gateway of every Docker network:
    refused in both gateway modes even where they look public (the prototype's host had
    192.0.2.2, a stand-in network 198.51.100.1)."""
    found: set[str] = set()
    ip = shutil.which("ip")
    if ip:
        try:
            done = subprocess.run(
                [ip, "-j", "addr"], capture_output=True, text=True, timeout=5, check=False
            )
            for link in json.loads(done.stdout or "[]"):
                found.update(str(a["local"]) for a in link.get("addr_info", []) if a.get("local"))
        except (OSError, subprocess.TimeoutExpired, ValueError):
            pass
    with engine.engine_errors():
        for network in engine.client().networks.list():
            for pool in (network.attrs.get("IPAM") or {}).get("Config") or []:
                if pool.get("Gateway"):
                    found.add(str(pool["Gateway"]).split("/")[0])
    return tuple(sorted(found))


def upstream_resolvers(files: Sequence[str] = RESOLV_FILES) -> tuple[str, ...]:
    """The host's resolvers (what the gateway's dnsmasq forwards to): the first of `files`
    that names one the gateway can reach (loopback ones are the host's own, not ours)."""
    for path in files:
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        servers = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                try:
                    address = ipaddress.ip_address(parts[1].split("%")[0])
                except ValueError:
                    continue
                if address.version == 4 and not address.is_loopback:
                    servers.append(str(address))
        if servers:
            return tuple(dict.fromkeys(servers))
    raise SandboxError(
        "no resolver for the egress gateway: the host's resolv.conf names none it can reach",
        "name a resolver in /etc/resolv.conf (a loopback one such as 127.0.0.53 cannot serve "
        "containers)",
    )


def bridge_gateway() -> str:
    """The default bridge's gateway address: the gateway's route out. An engine started
    while its bridge interface already existed names no gateway in the network's IPAM
    (only the subnet): the address is then read from that interface."""
    with engine.engine_errors():
        bridge = engine.client().networks.get("bridge")
    pools = (bridge.attrs.get("IPAM") or {}).get("Config") or []
    for pool in pools:
        if pool.get("Gateway"):
            return str(pool["Gateway"]).split("/")[0]
    interface = (bridge.attrs.get("Options") or {}).get(BRIDGE_NAME_OPTION, "docker0")
    subnets = [ipaddress.ip_network(p["Subnet"]) for p in pools if p.get("Subnet")]
    return _interface_address(str(interface), subnets)


def _interface_address(interface: str, subnets: Sequence[egress.IPNetwork]) -> str:
    """The host's IPv4 address on `interface` within one of `subnets` (`ip -j addr`), or ""."""
    ip = shutil.which("ip")
    if not ip:
        return ""
    try:
        done = subprocess.run(
            [ip, "-j", "-4", "addr", "show", "dev", interface],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        links = json.loads(done.stdout or "[]")
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return ""
    for link in links:
        for info in link.get("addr_info", []):
            local = info.get("local")
            if local and any(ipaddress.ip_address(local) in net for net in subnets):
                return str(local)
    return ""


def subnet_candidates(name: str, pool: str = DEFAULT_SUBNETS) -> Iterator[str]:
    """/29s of `pool`, starting at one chosen by the sandbox's name (concurrent sandboxes
    rarely try the same one first), then in order."""
    network = ipaddress.IPv4Network(pool)
    if network.prefixlen > SUBNET_PREFIX:
        raise UsageError(f"egress subnet pool {pool} is smaller than a /{SUBNET_PREFIX}")
    count = 2 ** (SUBNET_PREFIX - network.prefixlen)
    start = int(hashlib.sha256(name.encode()).hexdigest(), 16) % count
    size = 2 ** (32 - SUBNET_PREFIX)
    for offset in range(count):
        index = (start + offset) % count
        yield f"{network.network_address + index * size}/{SUBNET_PREFIX}"


# --------------------------------------------------------------------------- the gateway


@dataclass(frozen=True)
class GatewayPlacement:
    """A sandbox's place behind its gateway: network, fixed address, resolver (the address
    the gateway claims, which is also its proxy)."""

    network: str
    address: str
    resolver: str

    def environment(self, no_proxy: Sequence[str] = ()) -> dict[str, str]:
        """The proxy variables, both spellings (tools read one or the other)."""
        proxy = f"http://{self.resolver}:{PROXY_PORT}"
        bypass = ",".join([NO_PROXY, *no_proxy])
        found: dict[str, str] = {}
        for name, value in (("HTTP_PROXY", proxy), ("HTTPS_PROXY", proxy), ("NO_PROXY", bypass)):
            found[name] = found[name.lower()] = value
        return found


class EgressGateway:
    """The egress gateway of one sandbox: its network, its container, its audit."""

    def __init__(
        self,
        settings: Settings,
        sandbox_name: str,
        policy: egress.EgressPolicy,
        *,
        extra_labels: Mapping[str, str] | None = None,
        backend: Backend = DOCKER,
        subnets: str | None = None,
        upstream_dns: Sequence[str] | None = None,
        test_dns_routes: Mapping[str, str | None] | None = None,
        test_networks: Sequence[str] = (),
    ) -> None:
        """`test_dns_routes` (domain -> stand-in resolver, None: NXDOMAIN) and
        `test_networks` (more networks for the gateway: a stand-in internet) exist for
        tests only, so they can point the gateway at servers they run themselves."""
        if policy.mode not in GATEWAY_MODES:
            raise UsageError(
                f"egress mode {policy.mode!r} needs no gateway",
                "only public and allowlist have one",
            )
        self.settings = settings
        self.sandbox_name = sandbox_name
        self.policy = policy
        self.extra_labels = dict(extra_labels or {})
        self.backend = backend
        self.subnets = subnets or settings.egress_subnets
        self._upstream = tuple(upstream_dns) if upstream_dns else None
        self.test_dns_routes = tuple((test_dns_routes or {}).items())
        self.test_networks = tuple(test_networks)
        self.network_name = f"{sandbox_name}-egress"
        self.container_name = f"{sandbox_name}-egress-gw"
        self.folder = settings.path("state_dir") / STATE_FOLDER / sandbox_name
        self._network: Any = None  # made or found by `_ensure_network`
        self._predicted: str | None = None  # the subnet tried first (`begin_all`)
        self.broker = broker.Broker(
            settings, sandbox_name, self.folder, self.log_dir, self.extra_labels
        )

    # ----------------------------------------------------------------- paths and labels

    @property
    def config_dir(self) -> Path:
        return self.folder / "config"

    @property
    def log_dir(self) -> Path:
        return self.folder / "logs"

    def _labels(self, kind: str, **extra: str) -> dict[str, str]:
        found = labels.project_labels(kind, **extra)
        found[labels.OWNER] = self.sandbox_name
        found.update(self.extra_labels)
        return found

    # ----------------------------------------------------------------- lifecycle

    def up(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Make the network and start the gateway, or find them up already: a running,
        ready gateway with this policy is left alone; one made from another image or
        network is replaced."""
        self._converge(timeout)

    def begin(self, timeout: float = DEFAULT_TIMEOUT) -> GatewayStart:
        """Make the network now, and the gateway container and its start in a thread, so
        the sandbox can be created and started meanwhile (until the gateway has loaded its
        rules and claimed the network's route, the sandbox's network has no route anywhere:
        it fails closed). `sandbox_options` works at once; `GatewayStart.result` waits for
        the gateway."""
        image = ensure_gateway_image(self.settings)
        network, made = self._ensure_network()
        return GatewayStart(self, lambda _: self._prepared(image, network, made).bring_up(timeout))

    def begin_all(self, timeout: float = DEFAULT_TIMEOUT) -> GatewayStart:
        """`begin`, with a network that does not exist yet made in the thread too, so the
        sandbox's container is created meanwhile (the engine resolves a network by name at
        the container's start, not at its creation). `sandbox_options` then names the
        first subnet the network is tried on; `GatewayStart.network_ready` waits for the
        network and says whether it got that subnet (another network may hold it)."""
        image = ensure_gateway_image(self.settings)
        found = self._find_network()
        if found is not None:  # checked and placed now, as `begin` does
            network = self._adopted(found)
            return GatewayStart(
                self, lambda _: self._prepared(image, network, False).bring_up(timeout)
            )
        self._predicted = next(subnet_candidates(self.sandbox_name, self.subnets))

        def work(start: GatewayStart) -> str:
            network, made = self._ensure_network()
            start.network_made(network)
            return self._prepared(image, network, made).bring_up(timeout)

        return GatewayStart(self, work, makes_network=True)

    def _await_start_in_flight(self) -> None:
        """Wait for this gateway's start begun by this process (`begin`), if one runs: its
        container may not exist yet, and would stay behind a removal made meanwhile (a
        sandbox whose own container could not be made is released at once)."""
        with _in_flight_lock:
            pending = _in_flight.get(str(self.folder))
        if pending is not None:
            pending.wait()

    def placement(self) -> GatewayPlacement | None:
        """Where a sandbox behind this gateway goes (None while the network does not exist):
        compose's override and `sandbox_options` are both made from it."""
        network = self._find_network()
        return None if network is None else self._placed_on(network)

    def _placed_on(self, network: Any) -> GatewayPlacement:
        return self._placed_in(_subnet_of(network))

    def _placed_in(self, subnet_text: str) -> GatewayPlacement:
        subnet = ipaddress.IPv4Network(subnet_text)
        return GatewayPlacement(
            self.network_name,
            str(subnet.network_address + SANDBOX_HOST),
            str(subnet.network_address + 1),
        )

    def sandbox_options(self) -> dict[str, Any]:
        """What the sandbox's `containers.create` spec takes from the gateway: its
        network and fixed address (they replace `network_mode`: an address left to the
        engine could be the one the gateway takes when it starts), its resolver and the
        proxy variables (merged into `environment`). Call after `up` or `begin`."""
        if self._network is not None:
            placed: GatewayPlacement | None = self._placed_on(self._network)
        elif self._predicted is not None:  # being made (`begin_all`)
            placed = self._placed_in(self._predicted)
        else:
            placed = self.placement()
        if placed is None:
            raise SandboxError(f"the egress gateway of {self.sandbox_name} is not up")
        with engine.engine_errors():
            endpoint = engine.client().api.create_endpoint_config(ipv4_address=placed.address)
        return {
            "network": placed.network,
            "networking_config": {placed.network: endpoint},
            "dns": [placed.resolver],
            "environment": placed.environment(),
        }

    def apply(self, policy: egress.EgressPolicy, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Apply a changed policy to the gateway: new configuration, gateway restarted
        (the sandbox reaches nothing meanwhile, and its open connections are cut). Returns
        one line saying what happened."""
        if policy.mode not in GATEWAY_MODES:
            raise UsageError(
                f"egress mode {policy.mode!r} has no gateway: recreate the sandbox for it"
            )
        old, self.policy = self.policy, policy
        started = time.monotonic()
        outcome = self._converge(timeout)
        took = time.monotonic() - started
        if outcome == "unchanged":
            return f"egress policy unchanged ({policy.mode}): gateway left running"
        change = f"{old.mode} -> {policy.mode}, {len(policy.allow)} allow, {len(policy.deny)} deny"
        if outcome == "restarted":
            return (
                f"egress policy applied live ({change}): gateway restarted in {took:.2f} s, "
                "open connections were cut"
            )
        return f"egress policy applied ({change}): gateway {outcome} in {took:.2f} s"

    def down(self, purge_logs: bool = False) -> None:
        """Remove the gateway and the network (only ones labelled as this sandbox's). The
        logs and configuration stay (the egress audit) unless `purge_logs`."""
        self.remove_container()
        network = self._find_network()
        if network is not None and self._ours(network.attrs.get("Labels")):
            _remove_network(network)
        if purge_logs:
            shutil.rmtree(self.folder, ignore_errors=True)

    def remove_container(self) -> None:
        """Remove the gateway container only (its sandbox may still be on the network),
        and its credentials broker with the values it held."""
        self._await_start_in_flight()
        if self.broker.folder.exists():
            self.broker.remove()
        container = engine.find_container(self.container_name)
        if container is not None and self._ours(container.labels):
            _remove_container(container)

    def records(self, denied_only: bool = False) -> list[dict[str, Any]]:
        """The egress audit of this sandbox, oldest first (see `read_records`)."""
        return read_records(self.log_dir, self.sandbox_name, denied_only)

    # ----------------------------------------------------------------- internals

    def _converge(self, timeout: float) -> str:
        """Bring network and gateway to this policy: "unchanged", "created", "started"
        or "restarted"."""
        image = ensure_gateway_image(self.settings)
        return self._prepared(image, *self._ensure_network()).bring_up(timeout)

    def _prepared(self, image: str, network: Any, made: bool) -> PreparedGateway:
        """A gateway container made from `image` on `network` (one made from another image
        or network is replaced), not yet started. On a network `made` just now it joins
        that network at once (see `PreparedGateway.joined`); otherwise only after its rules
        are loaded, at each start."""
        wanted = self._container_hash(image, network)
        container = engine.find_container(self.container_name)
        if container is not None and container.labels.get(CONFIG_LABEL) != wanted:
            if not self._ours(container.labels):
                raise SandboxError(f"container {self.container_name} exists and is not ours")
            _remove_container(container)
            container = None
        created = container is None
        config = None
        if created:  # read the host's addresses and resolvers meanwhile
            config = _InThread(lambda: self._config(network))
            container = self._create_container(network, image, wanted)
        joined = made and created
        if joined:
            with engine.engine_errors():
                network.connect(container, ipv4_address=self._gateway_ip(network))
        return PreparedGateway(self, network, container, created, joined, config)

    def _ours(self, found: Mapping[str, str] | None) -> bool:
        found = found or {}
        return found.get(labels.MANAGED) == "true" and found.get(labels.OWNER) == self.sandbox_name

    def _find_network(self) -> Any | None:
        """The network by its exact name (the engine's list holds what we read of it: its
        labels and subnet), or None."""
        with engine.engine_errors():
            for network in engine.client().networks.list(names=[self.network_name]):
                if network.name == self.network_name:
                    return network
        return None

    def _ensure_network(self) -> tuple[Any, bool]:
        """The sandbox's network, found or made now; whether it was made now."""
        import docker.types

        network = self._find_network()
        if network is not None:
            return self._adopted(network), False
        last = ""
        marks = self._labels(labels.EGRESS_NETWORK)
        candidates = subnet_candidates(self.sandbox_name, self.subnets)
        for _attempt, subnet in zip(range(MAX_SUBNET_TRIES), candidates, strict=False):
            first = str(ipaddress.IPv4Network(subnet).network_address + 1)
            ipam = docker.types.IPAMConfig(
                pool_configs=[docker.types.IPAMPool(subnet=subnet, gateway=first)]
            )
            try:
                with engine.engine_errors():
                    made = engine.client().api.create_network(
                        self.network_name,
                        driver="bridge",
                        options={INHIBIT_IPV4: "true", MASQUERADE: "false"},
                        ipam=ipam,
                        check_duplicate=True,
                        labels=marks,
                    )
            except SandboxError as exc:
                last = exc.message
                if "overlap" in last.lower():
                    continue  # another network holds it: try the next /29
                if "already exists" in last.lower():
                    return self._ensure_network()[0], False  # a concurrent `up` made it
                raise
            # What the engine was asked for is what it made: no second call to read it.
            self._network = engine.client().networks.prepare_model(
                {
                    "Id": made["Id"],
                    "Name": self.network_name,
                    "Labels": marks,
                    "IPAM": {"Config": [{"Subnet": subnet, "Gateway": first}]},
                }
            )
            return self._network, True
        raise SandboxError(
            f"no free /{SUBNET_PREFIX} for the egress network of {self.sandbox_name} in "
            f"{self.subnets}: {last}",
            "remove unused sandboxes (`inv clean`) or set another egress subnet pool",
        )

    def _adopted(self, network: Any) -> Any:
        """`network`, found by its name, as this sandbox's (refused when it is not)."""
        if not self._ours(network.attrs.get("Labels")):
            raise SandboxError(
                f"network {self.network_name} exists and is not this sandbox's",
                "remove it or choose another sandbox name",
            )
        self._network = network
        return network

    @staticmethod
    def _gateway_ip(network: Any) -> str:
        """The gateway's own address on the sandbox's network."""
        return str(ipaddress.IPv4Network(_subnet_of(network)).network_address + GATEWAY_HOST)

    def _config(self, network: Any) -> GatewayConfig:
        if self._upstream is None:
            self._upstream = upstream_resolvers()
        return GatewayConfig(
            policy=self.policy,
            subnet=_subnet_of(network),
            host_addresses=host_addresses(),
            upstream_dns=self._upstream,
            egress_router=bridge_gateway(),
            test_dns_routes=self.test_dns_routes,
            generation=secrets.token_hex(6),
            broker_uid=os.getuid(),
        )

    def _container_hash(self, image: str, network: Any) -> str:
        """What a gateway container is made from (image, networks, the host folder its
        configuration and logs are in): another one is replaced by `up`. The policy is not
        in it: a new policy only restarts it."""
        parts = [image, network.id, _subnet_of(network), self.test_networks, str(self.folder)]
        text = json.dumps(parts)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _write_config(self, config: GatewayConfig) -> None:
        files = render(config)
        files["policy.json"] = json.dumps(
            {"fingerprint": self.policy.fingerprint(), **self.policy.to_dict()}, indent=1
        )
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            temporary = self.config_dir / f".{name}.tmp"
            temporary.write_text(text, encoding="utf-8")
            os.chmod(temporary, 0o644)
            temporary.replace(self.config_dir / name)

    def _written_policy(self) -> str:
        try:
            text = (self.config_dir / "policy.json").read_text(encoding="utf-8")
            return str(json.loads(text).get("fingerprint", ""))
        except (OSError, ValueError, AttributeError):
            return ""

    def _written_generation(self) -> str:
        try:
            text = (self.config_dir / "env").read_text(encoding="utf-8")
        except OSError:
            return ""
        found = re.search(r"^GENERATION=(\S*)$", text, re.M)
        return found.group(1) if found else ""

    def _log_file(self, name: str) -> str:
        """What the gateway wrote to its file `name` (a generation), or ""."""
        try:
            return (self.log_dir / name).read_text(encoding="utf-8").strip()
        except OSError:
            return ""

    def _is_ready(self) -> bool:
        """Whether the gateway announced readiness for the configuration written now."""
        ready = self._log_file(READY_FILE)
        return bool(ready) and ready == self._written_generation()

    def _create_container(self, network: Any, image: str, config_hash: str) -> Any:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        spec = {
            "image": image,
            "name": self.container_name,
            "detach": True,
            "labels": self._labels(labels.EGRESS_GATEWAY, config=config_hash),
            "network_mode": "bridge",
            "cap_drop": ["ALL"],
            "cap_add": list(GATEWAY_CAPABILITIES),
            "security_opt": ["no-new-privileges:true"],
            "sysctls": {"net.ipv4.ip_forward": "1"},
            "mem_limit": GATEWAY_MEMORY,
            "memswap_limit": GATEWAY_MEMORY,
            "pids_limit": GATEWAY_PIDS,
            "restart_policy": {"Name": "no"},
            "mounts": [
                _bind(self.config_dir, CONFIG_DIR, read_only=True),
                _bind(self.log_dir, LOG_DIR, read_only=False),
            ],
        }
        container = self.backend.create(spec)
        with engine.engine_errors():  # the sandbox's network only once the rules hold
            for name in self.test_networks:
                engine.client().networks.get(name).connect(container)
        return container

    def _start_and_wait(
        self,
        container: Any,
        network: Any,
        timeout: float,
        started: Callable[[], None] | None = None,
        joined: bool = False,
    ) -> None:
        """Start the gateway (then call `started`), connect it to the sandbox's network once
        its rules are loaded, and wait for its ready file to name this configuration. The
        network is disconnected first: a gateway restarted under a running sandbox must not
        forward one packet before its rules are back. A gateway `joined` to a network made
        just now, never started, starts on it (see `PreparedGateway.joined`)."""
        generation = self._written_generation()
        if joined:  # the gateway claims the route only once it reads this, after its rules
            self._write_connected(generation)
        with engine.engine_errors():
            if not joined:
                container.reload()
                if network.name in container.attrs["NetworkSettings"]["Networks"]:
                    network.disconnect(container, force=True)
            container.start()
        if started is not None:
            started()
        deadline = time.monotonic() + timeout
        if not joined:
            self._await(container, FILTERING_FILE, generation, deadline, timeout)
            with engine.engine_errors():
                network.connect(container, ipv4_address=self._gateway_ip(network))
            self._write_connected(generation)
        self._await(container, READY_FILE, generation, deadline, timeout)

    def _write_connected(self, generation: str) -> None:
        """Tell the gateway of `generation` that the sandbox's network is connected."""
        marker = self.log_dir / CONNECTED_FILE
        marker.with_suffix(".tmp").write_text(generation, encoding="utf-8")
        marker.with_suffix(".tmp").replace(marker)

    def _await(
        self, container: Any, name: str, generation: str, deadline: float, timeout: float
    ) -> None:
        """Wait for the gateway's file `name` to hold `generation`; an error with its log's
        last lines when it exits or the deadline passes. The file is read every 5 ms (a
        stat); the engine is asked whether the gateway still runs every 100 ms."""
        asked = 0.0
        while time.monotonic() < deadline:
            if self._log_file(name) == generation:
                return
            if time.monotonic() - asked >= 0.1:
                asked = time.monotonic()
                with engine.engine_errors():
                    container.reload()
                if container.status in ("exited", "dead"):
                    break
            time.sleep(0.005)
        with engine.engine_errors():
            tail = container.logs(tail=15).decode("utf-8", "replace").strip().splitlines()
        why = "exited" if container.status in ("exited", "dead") else f"not ready in {timeout} s"
        raise SandboxError(
            f"egress gateway {self.container_name} {why}",
            tail[-1] if tail else f"see `docker logs {self.container_name}`",
            details=tuple(tail),
        )


@dataclass
class PreparedGateway:
    """A gateway container on its network, to be brought to its gateway's policy.

    `joined`: the container was made on a network made just now, and joined it at once
    (one engine call fewer on the start's path, and no network change while the sandbox
    starts). No packet can be forwarded before its rules are loaded: on a new network
    nothing holds the route's address (`.1`, claimed by the gateway only after its rules,
    and the bridge has no host address), so no neighbour entry anywhere points into the
    gateway, and a sandbox (no capabilities) can set none. A gateway started again, or made
    anew on an existing network (a sandbox there may still hold `.1`'s old neighbour entry:
    the gateway's MAC follows its address), joins only after its rules, as always."""

    gateway: EgressGateway
    network: Any
    container: Any
    created: bool
    joined: bool = False
    config: _InThread[GatewayConfig] | None = None  # being read while the container was made

    def bring_up(self, timeout: float) -> str:
        """Configure and (re)start it unless it already runs this policy: "unchanged",
        "created", "started" or "restarted"."""
        gateway, container = self.gateway, self.container
        with engine.engine_errors():
            container.reload()
        running = container.status in ("running", "restarting", "paused")
        current = gateway._written_policy() == gateway.policy.fingerprint()
        held, brokered = gateway.broker, bool(gateway.policy.brokered)
        if not brokered and held.folder.exists():
            held.remove()
        elif brokered and not held.values_written:  # today's values: a revoked or
            held.write_secrets()  # rotated secret holds from the next request
        serving = not brokered or held.serving(container)
        if running and gateway._is_ready() and current and serving:
            return "unchanged"
        config = self.config.result() if self.config else gateway._config(self.network)
        gateway._write_config(config)
        if running:
            with engine.engine_errors():
                container.kill()
        # The broker joins the gateway's network namespace once it runs; the gateway
        # announces readiness only once the broker listens.
        start_broker = (lambda: held.start(container)) if brokered else None
        joined = self.joined and not running
        try:
            gateway._start_and_wait(container, self.network, timeout, start_broker, joined)
        except SandboxError:
            if brokered:
                held.raise_if_failed()
            raise
        return "created" if self.created else "restarted" if running else "started"


class _InThread(Generic[T]):
    """A call run in a thread; `result` waits for it and returns or raises what it did."""

    def __init__(self, call: Callable[[], T]) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], T]) -> None:
        try:
            self._value = call()
        except BaseException as exc:  # handed to the caller of `result`
            self._error = exc

    def wait(self) -> None:
        """Wait until the call ended (whatever it did); at once from the call's own thread."""
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def result(self) -> T:
        self.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


# Gateway starts running in this process (`begin`), by gateway folder: a removal waits
# for them (`EgressGateway.remove_container`).
_in_flight: dict[str, GatewayStart] = {}
_in_flight_lock = threading.Lock()


class GatewayStart(_InThread[str]):
    """A gateway being brought to its policy in a thread (see `EgressGateway.begin`);
    `result` says how it got there: "unchanged", "created", "started" or "restarted", or
    raises what its start raised."""

    def __init__(
        self,
        gateway: EgressGateway,
        work: Callable[[GatewayStart], str],
        makes_network: bool = False,
    ) -> None:
        """`work` is given this object; one that `makes_network` calls `network_made`."""
        self.gateway = gateway
        key = str(gateway.folder)
        # Set once the network exists (at once unless the work makes it), or when the work
        # ended without it.
        self._network_known = threading.Event()
        self._network: Any = None
        self._makes_network = makes_network
        if not makes_network:
            self._network_known.set()

        def tracked() -> str:
            try:
                return work(self)
            finally:
                self._network_known.set()
                with _in_flight_lock:
                    if _in_flight.get(key) is self:
                        del _in_flight[key]

        with _in_flight_lock:  # registered before the work can end and unregister it
            super().__init__(tracked)
            _in_flight[key] = self

    def network_made(self, network: Any) -> None:
        """Called by the work once the sandbox's network exists."""
        self._network = network
        self._network_known.set()

    def network_ready(self) -> bool:
        """Wait until the sandbox's network exists (raise what stopped it being made);
        whether it is where `sandbox_options` said it would be (False: ask again)."""
        self._network_known.wait()
        if not self._makes_network:
            return True
        if self._network is None:
            self.result()  # the work ended before the network existed: raises what it raised
            raise SandboxError(f"the egress network of {self.gateway.sandbox_name} was not made")
        return _subnet_of(self._network) == self.gateway._predicted


def _subnet_of(network: Any) -> str:
    pools = (network.attrs.get("IPAM") or {}).get("Config") or []
    if not pools or not pools[0].get("Subnet"):
        raise SandboxError(f"network {network.name} has no subnet")
    return str(pools[0]["Subnet"])


def _remove_container(container: Any) -> None:
    import docker.errors

    try:
        with engine.engine_errors():
            container.remove(force=True)
    except docker.errors.NotFound:
        pass


def _remove_network(network: Any) -> None:
    import docker.errors

    try:
        with engine.engine_errors():
            network.remove()
    except docker.errors.NotFound:
        pass


def _bind(source: Path, target: str, read_only: bool) -> Any:
    import docker.types

    return docker.types.Mount(target, str(source), type="bind", read_only=read_only)


# --------------------------------------------------------------------------- the audit

SQUID_LINE = re.compile(
    r"^(?P<t>\d+\.\d+) (?P<src>\S+) (?P<method>\S+) (?P<url>\S+) sni=(?P<sni>\S+) "
    r"dst=(?P<dst>\S+) orig=(?P<orig>\S+) (?P<status>\S+) rule=(?P<rule>\S+)"
)
DNS_LINE = re.compile(
    r"^(?P<ts>\w{3} +\d+ [\d:]{8}) dnsmasq\[\d+\]: (?P<id>\d+) (?P<src>[\d.]+)/\d+ (?P<what>.*)$"
)
PROTOCOLS = {6: "tcp", 17: "udp", 1: "icmp"}


def _tail_lines(path: Path) -> list[str]:
    """The newest AUDIT_TAIL_BYTES of a log, as whole lines (the first, cut one dropped)."""
    limit = AUDIT_TAIL_BYTES
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - limit))
            data = handle.read(limit)
    except OSError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    return lines[1:] if size > limit else lines


def _split_port(text: str) -> tuple[str | None, int | None]:
    host, _, port = text.rpartition(":")
    if not host or host == "-":
        return None, None
    return host.strip("[]"), int(port) if port.isdigit() else None


def _url_target(url: str, method: str) -> tuple[str | None, int | None]:
    if method == "CONNECT":
        return _split_port(url)
    found = re.match(r"^(\w+)://(\[[^\]]+\]|[^/:]+)(?::(\d+))?", url)
    if not found:
        return None, None
    default = 443 if found.group(1) == "https" else 80
    return found.group(2).strip("[]"), int(found.group(3) or default)


def _is_ip(text: str | None) -> bool:
    try:
        ipaddress.ip_address(text or "")
    except ValueError:
        return False
    return True


def _squid_records(path: Path, claimed: set[str]) -> Iterator[dict[str, Any]]:
    for line in _tail_lines(path):
        found = SQUID_LINE.match(line)
        if not found or found["src"].startswith("127."):
            continue
        status, rule = found["status"], found["rule"].split(",")[-1]
        code = status.rpartition("/")[2]
        peek = found["url"].startswith("error:") or (status.startswith("NONE") and code == "000")
        # The peek before an intercepted TLS connection is decided: the decision follows
        # on a line of its own, unless the peek refused it (its SNI is not allowed).
        if peek and rule != "not-in-allowlist" and not rule.startswith("deny:"):
            continue
        if rule == "-" and code not in ("409",):
            continue  # the second line squid writes for one refused request
        name, port = _url_target(found["url"], found["method"])
        if found["sni"] != "-":
            name = found["sni"]
        address, dst_port = _split_port(found["dst"])
        orig, orig_port = _split_port(found["orig"])
        intercepted = orig not in claimed and orig is not None
        if address is None and intercepted:
            address = orig
        if _is_ip(name):
            address, name = address or name, None
        refused = status.startswith(("TCP_DENIED", "NONE")) or code in ("403", "409")
        yield {
            "time": float(found["t"]),
            "source": found["src"],
            "via": "intercepted" if intercepted else "proxy",
            "name": name,
            "address": address,
            "port": dst_port or (orig_port if intercepted else port) or port,
            "decision": "refused" if refused else "allowed",
            "rule": "host-mismatch" if code == "409" and rule == "-" else rule,
        }


def _packet_records(path: Path) -> Iterator[dict[str, Any]]:
    seen: set[tuple[Any, ...]] = set()
    for line in _tail_lines(path):
        try:
            packet = json.loads(line)
        except ValueError:
            continue
        prefix = str(packet.get("oob.prefix", "")).strip()
        key = (
            packet.get("src_ip"),
            packet.get("src_port"),
            packet.get("dest_ip"),
            packet.get("dest_port"),
            packet.get("ip.protocol"),
            prefix,
        )
        if key in seen or not prefix:
            continue  # a retransmitted SYN
        seen.add(key)
        decision, _, rule = prefix.partition(" ")
        protocol = packet.get("ip.protocol")
        yield {
            "time": packet.get("oob.time.sec", 0) + packet.get("oob.time.usec", 0) / 1e6,
            "source": packet.get("src_ip"),
            "via": f"packet/{PROTOCOLS.get(protocol, str(protocol))}",
            "name": None,
            "address": packet.get("dest_ip"),
            "port": packet.get("dest_port"),
            "decision": decision,
            "rule": rule,
        }


Answer = tuple[float, str, str, str]  # time, source, name, address


def _dns_events(path: Path, year: int) -> tuple[list[dict[str, Any]], list[Answer]]:
    """(refused lookups as records, answers as (time, source, name, address))."""
    records: list[dict[str, Any]] = []
    answers: list[Answer] = []
    asked: dict[str, tuple[str, str]] = {}  # query id -> (source, name)
    for line in _tail_lines(path):
        found = DNS_LINE.match(line)
        if not found:
            continue
        try:
            stamp = datetime.strptime(f"{year} {found['ts']}", "%Y %b %d %H:%M:%S")
        except ValueError:
            continue
        when = stamp.replace(tzinfo=UTC).timestamp()
        what, source = found["what"], found["src"]
        if what.startswith("query["):
            asked[found["id"]] = (source, what.partition("] ")[2].split(" ")[0])
        elif what.startswith("reply ") and " is " in what:
            name, _, address = what[6:].partition(" is ")
            if _is_ip(address):
                answers.append((when, source, name, address))
        elif what.startswith("config ") and "REFUSED" in what and found["id"] in asked:
            who, name = asked[found["id"]]
            if not who.startswith("127."):
                records.append(
                    {
                        "time": when,
                        "source": who,
                        "via": "dns",
                        "name": name,
                        "address": None,
                        "port": 53,
                        "decision": "refused",
                        "rule": "not-in-allowlist",
                    }
                )
    return records, answers


def read_records(
    log_dir: Path, sandbox: str, denied_only: bool = False, year: int | None = None
) -> list[dict[str, Any]]:
    """One record per connection attempt (allowed and refused) from a gateway's logs:
    time (ISO, UTC), sandbox, source, via (proxy, intercepted, packet/PROTO, dns), name
    (a packet's joined from the last DNS answer its source got for that address), address,
    port, decision and the rule that decided. Reads at most the newest 8 MiB of each log."""
    year = year or datetime.now(UTC).year
    claimed = {_claimed_address(log_dir)} - {""}
    dns_records, answers = _dns_events(log_dir / "dns.log", year)
    found = [
        *_squid_records(log_dir / "access.log", claimed),
        *_packet_records(log_dir / "packets.json"),
        *dns_records,
        *broker.records(_tail_lines(log_dir / broker.LOG_FILE)),
    ]
    names: dict[tuple[str, str], str] = {}
    answers.sort()
    found.sort(key=lambda r: r["time"])
    index = 0
    for record in found:
        while index < len(answers) and answers[index][0] <= record["time"] + 1:
            _when, source, name, address = answers[index]
            names[(source, address)] = name
            index += 1
        if record["name"] is None and record["address"]:
            record["name"] = names.get((str(record["source"]), str(record["address"])))
    out = []
    for record in found:
        if denied_only and record["decision"] != "refused":
            continue
        stamp = datetime.fromtimestamp(record["time"], UTC)
        out.append(
            {
                "time": stamp.isoformat(timespec="milliseconds"),
                "sandbox": sandbox,
                **{k: v for k, v in record.items() if k != "time"},
            }
        )
    return out


def _claimed_address(log_dir: Path) -> str:
    """The address the gateway claims (the proxy's), from the configuration beside logs."""
    try:
        text = (log_dir.parent / "config" / "env").read_text(encoding="utf-8")
    except OSError:
        return ""
    found = re.search(r"^VGW=(\S*)$", text, re.M)
    return found.group(1) if found else ""
