"""The egress policy model: what a sandbox may connect to (issue 22).

Pure logic, no Docker and no enforcement: entries are parsed and normalised here, a
policy is a frozen value with a stable fingerprint, and `decide` answers one question,
"may this destination be reached, and which rule says so?", for whatever enforces the
policy (a filter, a proxy, the audit). docs/egress.md is the reference for the grammar,
the modes, the presets and the order in which rules decide.

Foundation layer: the standard library and `errors` only (config.py imports this module to
check its keys, so the settings are read through the `EgressSettings` protocol).
"""

from __future__ import annotations

import configparser
import dataclasses
import functools
import hashlib
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from .errors import UsageError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MODES = ("public", "allowlist", "open", "none")
DEFAULT_MODE = "public"
# Bumped when the meaning of a policy changes, so old fingerprints stop matching.
FINGERPRINT_VERSION = "egress-v1"
MAX_ENTRY = 300  # longer than any name (253) with a port: refused before parsing
SHOWN_ENTRY = 80  # entries longer than this are cut in error lines
MAX_NAME = 253
MAX_LABEL = 63
# Host names as resolvers and proxies see them: letters, digits, hyphens and (for
# container and service names) underscores; a hyphen neither starts nor ends a label.
LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?\Z")
PORT_RE = re.compile(r"[0-9]{1,5}\Z")
PREFIX_RE = re.compile(r"(?:0|[1-9][0-9]{0,2})\Z")


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Entry:
    """One allow or deny entry: a name, a `*.` wildcard, or an address/CIDR, with a port.

    `host` is the normalised name (a wildcard's without its `*.`), or the network's
    text; `network` is set for addresses and CIDRs (one address is a /32 or /128)."""

    kind: str  # "name", "wildcard" or "network"
    host: str
    port: int | None = None
    network: IPNetwork | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        shown = f"*.{self.host}" if self.kind == "wildcard" else self.host
        if self.port is None:
            return shown
        if self.network is not None and self.network.version == 6:
            return f"[{shown}]:{self.port}"
        return f"{shown}:{self.port}"

    def matches_name(self, name: str, port: int | None) -> bool:
        """Whether this name or wildcard entry covers the normalised host `name`."""
        if not self._port_matches(port):
            return False
        if self.kind == "name":
            return name == self.host
        return self.kind == "wildcard" and name.endswith("." + self.host)

    def matches_address(self, address: IPAddress, port: int | None) -> bool:
        """Whether this address or CIDR entry covers `address`."""
        return (
            self.network is not None
            and address.version == self.network.version
            and address in self.network
            and self._port_matches(port)
        )

    def _port_matches(self, port: int | None) -> bool:
        return self.port is None or self.port == port


def _bad(text: str, why: str) -> UsageError:
    """The one-line error for a bad entry, naming it."""
    shown = repr(text) if len(text) <= SHOWN_ENTRY else repr(text[: SHOWN_ENTRY - 1] + "…")
    return UsageError(f"bad egress entry {shown}: {why}")


def parse_entry(text: str) -> Entry:
    """`example.org`, `*.example.org:443`, `10.0.0.5:5432`, `[::1]:443`, `fc00::/7` → an Entry;
    anything else raises UsageError naming the entry."""
    if not isinstance(text, str):
        raise UsageError(f"bad egress entry {text!r}: must be text")
    _check_characters(text)
    if text.startswith("["):
        host, port = _split_bracketed(text)
        if ":" not in host:
            raise _bad(text, "brackets are for IPv6 addresses only ([::1]:443)")
        return _network_entry(text, host, port)
    if text.count(":") >= 2:  # a bare IPv6 address or CIDR: no port without brackets
        return _network_entry(text, text, None)
    host, sep, port_text = text.partition(":")
    port = _parse_port(text, port_text) if sep else None
    if "/" in host and not re.fullmatch(r"[0-9.]*", host.partition("/")[0]):
        raise _bad(text, "a path is not a host: write a host name alone, or a CIDR (10.0.0.0/8)")
    if "/" in host or _is_ip(host):
        return _network_entry(text, host, port)
    kind, name = _parse_name(text, host)
    return Entry(kind, name, port=port)


def _check_characters(text: str) -> None:
    if not text:
        raise _bad(text, "empty")
    if len(text) > MAX_ENTRY:
        raise _bad(text, f"longer than {MAX_ENTRY} characters")
    if any(ch.isspace() for ch in text):
        raise _bad(text, "contains whitespace")
    if not text.isprintable():
        raise _bad(text, "contains control characters")
    if "://" in text or text.lower().startswith(("http:", "https:")):
        raise _bad(text, "a URL, not a host: write the host name alone (example.org)")
    if "@" in text:
        raise _bad(text, "has a user part: write the host name alone (example.org)")


def _split_bracketed(text: str) -> tuple[str, int | None]:
    host, close, rest = text[1:].partition("]")
    if not close:
        raise _bad(text, "missing ']' after the IPv6 address")
    if not rest:
        return host, None
    if not rest.startswith(":"):
        raise _bad(text, "after ']' only ':PORT' may follow")
    return host, _parse_port(text, rest[1:])


def _parse_port(text: str, port_text: str) -> int:
    if not PORT_RE.match(port_text):
        raise _bad(text, "the port must be a number from 1 to 65535")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise _bad(text, f"port {port} is out of range (1 to 65535)")
    return port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _network_entry(text: str, host: str, port: int | None) -> Entry:
    """An address or CIDR entry; IPv4-mapped IPv6 becomes the IPv4 it stands for, so the
    two spellings of one host are one entry."""
    network = _parse_network(text, host)
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(MAPPED):
        low = int(network.network_address) & 0xFFFFFFFF
        network = ipaddress.IPv4Network((low, network.prefixlen - 96))
    return Entry("network", _shown_network(network), port=port, network=network)


def _parse_network(text: str, host: str) -> IPNetwork:
    if "%" in host:
        raise _bad(text, "an IPv6 zone (%...) belongs to one host's interface, not a policy")
    address, slash, prefix = host.partition("/")
    if slash and not PREFIX_RE.match(prefix):
        raise _bad(text, "the CIDR prefix must be a number of bits (10.0.0.0/8)")
    try:
        return ipaddress.ip_network(host, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            loose = ipaddress.ip_network(host, strict=False)
            raise _bad(text, f"has host bits set (did you mean {loose}?)") from None
        what = "CIDR" if slash else "address"
        raise _bad(text, f"not a valid IP {what} ({address or 'nothing'}{slash}{prefix})") from None


def _parse_name(text: str, host: str) -> tuple[str, str]:
    """(kind, normalised name) of a host name or `*.` wildcard."""
    name = host.lower()
    if not name.isascii():
        raise _bad(text, "non-ASCII name: write its IDNA form (xn--...)")
    if name == "*":
        raise _bad(text, "'*' alone would allow everything: use egress mode open")
    wildcard = name.startswith("*.")
    body = name[2:] if wildcard else name
    if "*" in body:
        raise _bad(text, "a '*' may only be the whole first label (*.example.org)")
    body = body.removesuffix(".")  # the absolute form names the same host
    problem = name_problem(body)
    if problem:
        raise _bad(text, problem)
    if wildcard and "." not in body:
        raise _bad(text, f"'*.{body}' would cover a whole top-level domain")
    return ("wildcard" if wildcard else "name"), body


def name_problem(name: str) -> str | None:
    """Why `name` (lowercase, no trailing dot) is not a host name, or None."""
    if not name:
        return "empty name"
    if len(name) > MAX_NAME:
        return f"a name is at most {MAX_NAME} characters"
    labels = name.split(".")
    for label in labels:
        if not label:
            return "empty label (two dots, or a dot at the start)"
        if len(label) > MAX_LABEL:
            return f"a label is at most {MAX_LABEL} characters"
        if not LABEL_RE.match(label):
            return f"label {label!r} has characters a host name cannot have"
    if labels[-1].isdigit() or _inet_aton(name):
        # The C library reads `127.1`, `2130706433` and `0x7f.1` as addresses.
        return "not a valid IPv4 address, and a name's last label cannot be a number"
    return None


def _inet_aton(name: str) -> bool:
    try:
        socket.inet_aton(name)
    except OSError:
        return False
    return True


def split_entries(text: str) -> list[str]:
    """`a, b,,a` → `['a', 'b']`: a comma-separated list, blanks and repeats dropped."""
    return list(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))


def entry_problem(text: str) -> str | None:
    """The one-line error for the first bad entry of a comma-separated list, or None."""
    for item in split_entries(text):
        try:
            parse_entry(item)
        except UsageError as exc:
            return exc.message
    return None


# --------------------------------------------------------------------------- refused ranges


@dataclass(frozen=True)
class Refused:
    """A built-in refused range (or a host address passed in), with why it is refused."""

    network: IPNetwork
    why: str

    def __str__(self) -> str:
        return f"{self.network} ({self.why})"


def _refused(table: Iterable[tuple[str, str]]) -> tuple[Refused, ...]:
    return tuple(Refused(ipaddress.ip_network(net), why) for net, why in table)


# Most specific first: the first range that holds an address names the rule.
REFUSED_V4 = _refused(
    [
        ("255.255.255.255/32", "limited broadcast"),
        ("0.0.0.0/8", "this network: reaches the host itself"),
        ("10.0.0.0/8", "private network, RFC 1918"),
        ("100.64.0.0/10", "shared address space (carrier-grade NAT), RFC 6598"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local: cloud instance metadata"),
        ("172.16.0.0/12", "private network, RFC 1918 (Docker's bridges)"),
        ("192.168.0.0/16", "private network, RFC 1918"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
    ]
)
REFUSED_V6 = _refused(
    [
        ("::/128", "unspecified address: reaches the host itself"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "local-use NAT64, RFC 8215: translates to unknown IPv4"),
        ("fc00::/7", "unique local addresses"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated)"),
        ("ff00::/8", "multicast"),
    ]
)
# IPv6 forms that carry an IPv4 address: each is refused when the IPv4 one is.
MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_LOW32 = (
    (MAPPED, "IPv4-mapped"),
    (ipaddress.IPv6Network("::ffff:0:0:0/96"), "IPv4-translated"),
    (ipaddress.IPv6Network("::/96"), "IPv4-compatible"),
    (ipaddress.IPv6Network("64:ff9b::/96"), "NAT64"),
)
SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
TEREDO = ipaddress.IPv6Network("2001::/32")


def embedded_ipv4(address: IPAddress) -> list[tuple[ipaddress.IPv4Address, str]]:
    """The IPv4 addresses an IPv6 address carries (mapped, translated, compatible, NAT64,
    6to4, Teredo), each with the name of its form."""
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    found = [
        (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), form)
        for network, form in _LOW32
        if address in network and not (form == "IPv4-compatible" and int(address) <= 1)
    ]  # :: and ::1 are themselves, not IPv4-compatible forms (RFC 4291 2.5.5.1)
    if address in SIX_TO_FOUR:
        found.append((ipaddress.IPv4Address((int(address) >> 80) & 0xFFFFFFFF), "6to4"))
    if address in TEREDO and address.teredo:
        server, client = address.teredo
        found += [(server, "Teredo server"), (client, "Teredo client")]
    return found


@functools.lru_cache(maxsize=64)
def host_refusals(host_addresses: tuple[str, ...]) -> tuple[Refused, ...]:
    """The host's own addresses and bridge gateways (addresses or CIDRs), as refused
    ranges. Finding them is the caller's job; a bad one raises UsageError."""
    found = []
    for text in host_addresses:
        try:
            network = ipaddress.ip_network(text.split("%")[0], strict=False)
        except ValueError:
            raise UsageError(f"bad host address {text!r}: not an IP address or CIDR") from None
        found.append(Refused(network, "this host's own address or a bridge gateway"))
    return tuple(found)


def refusal(
    address: IPAddress, extra: Sequence[Refused] = ()
) -> tuple[Refused, IPAddress, str] | None:
    """The refused range that holds `address`, or an IPv4 address it carries: (range, the
    address in it, the IPv6 form that carried it or ""); None for a public address."""
    direct = _direct_refusal(address, extra)
    if direct is not None:
        return direct, address, ""
    for inner, form in embedded_ipv4(address):
        found = _direct_refusal(inner, extra)
        if found is not None:
            return found, inner, form
    return None


def _direct_refusal(address: IPAddress, extra: Sequence[Refused]) -> Refused | None:
    for refused in (*extra, *(REFUSED_V4 if address.version == 4 else REFUSED_V6)):
        if address.version == refused.network.version and address in refused.network:
            return refused
    return None


def _in_refused_space(network: IPNetwork, extra: Sequence[Refused]) -> bool:
    """Whether the whole of `network` lies in one refused range: an allow entry unlocks a
    refused address only then (`10.0.0.5` does, `0.0.0.0/0` does not)."""
    for refused in (*extra, *REFUSED_V4, *REFUSED_V6):
        if network.version == refused.network.version and network.subnet_of(refused.network):  # type: ignore[arg-type]
            return True
    return False


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Decision:
    """The answer for one destination: allowed or not, the rule that decided, and why."""

    allowed: bool
    rule: str
    reason: str


def normalise_name(name: str | None) -> str | None:
    """A destination name as entries are written (lowercase, no trailing dot), or None
    when it is absent, an IP literal, or not a valid host name (then only address rules
    can match it)."""
    if not name or not isinstance(name, str):
        return None
    lowered = name.lower().removesuffix(".")
    if not lowered.isascii() or name_problem(lowered) is not None:
        return None
    return lowered


def _address(address: str | IPAddress) -> IPAddress | None:
    if isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
        address = str(address)
    try:
        return ipaddress.ip_address(str(address).split("%")[0])
    except ValueError:
        return None


def _forms(address: IPAddress) -> list[IPAddress]:
    return [address, *(inner for inner, _form in embedded_ipv4(address))]


def decide(
    policy: EgressPolicy,
    name: str | None,
    address: str | IPAddress,
    port: int | None,
    host_addresses: Iterable[str | IPAddress | IPNetwork] = (),
) -> Decision:
    """May a connection to `address`:`port` (resolved from `name`, if one was asked for)
    go out? The order, first match wins: mode none; deny entries; mode open; the
    address's refused range unless an allow entry inside refused space unlocks it; allow
    entries (address, then name); mode public allows the rest, allowlist refuses it."""
    ip = _address(address)
    if policy.mode == "none":
        return Decision(False, "mode none", "egress mode none: no network")
    if ip is None:
        return Decision(False, "invalid destination", f"{address!r} is not an IP address")
    host = normalise_name(name)
    forms = _forms(ip)
    denied = _first_match(policy.deny, host, forms, port)
    if denied is not None:
        return Decision(False, f"deny {denied}", f"{_where(name, ip, port)} matches deny {denied}")
    if policy.mode == "open":
        return Decision(True, "mode open", "egress mode open: everything but deny entries")
    extra = host_refusals(tuple(str(item) for item in host_addresses))
    return _decide_allowed(policy, host, ip, port, extra) or _by_mode(policy, name, ip, port)


def _decide_allowed(
    policy: EgressPolicy,
    host: str | None,
    ip: IPAddress,
    port: int | None,
    extra: Sequence[Refused],
) -> Decision | None:
    """The decision of a refused range or an allow entry, or None when neither applies."""
    forms = _forms(ip)
    where = _where(host, ip, port)
    refused = refusal(ip, extra)
    if refused is not None:
        unlock = _unlocking_entry(policy.allow, ip, port, extra)
        if unlock is None:
            range_, inner, form = refused
            subject = f"{inner}, carried by {ip} ({form})," if form else str(inner)
            single = range_.network.num_addresses == 1
            place = range_.why if single else f"in {range_.network} ({range_.why})"
            lead = "" if where == subject else f"{where}: "
            reason = f"{lead}{subject} is {place}, refused unless an allow entry names it"
            return Decision(False, f"refused {_shown_network(range_.network)}", reason)
        return Decision(True, f"allow {unlock}", f"{where} matches allow {unlock}")
    allowed = _first_match(policy.allow, host, forms, port)
    if allowed is not None:
        return Decision(True, f"allow {allowed}", f"{where} matches allow {allowed}")
    return None


def _unlocking_entry(
    allow: Sequence[Entry], ip: IPAddress, port: int | None, extra: Sequence[Refused]
) -> Entry | None:
    """The allow entry that explicitly opens a refused address: it covers each refused
    form of the address and lies wholly in refused space."""
    refused_forms = [form for form in _forms(ip) if _direct_refusal(form, extra) is not None]
    unlocking = [
        entry
        for entry in allow
        if entry.network is not None and _in_refused_space(entry.network, extra)
    ]
    chosen = None
    for form in refused_forms:
        covering = next((e for e in unlocking if e.matches_address(form, port)), None)
        if covering is None:
            return None
        chosen = chosen or covering
    return chosen


def _first_match(
    entries: Sequence[Entry], host: str | None, forms: Sequence[IPAddress], port: int | None
) -> Entry | None:
    for entry in entries:
        if entry.network is not None:
            if any(entry.matches_address(form, port) for form in forms):
                return entry
        elif host is not None and entry.matches_name(host, port):
            return entry
    return None


def _by_mode(policy: EgressPolicy, name: str | None, ip: IPAddress, port: int | None) -> Decision:
    where = _where(name, ip, port)
    if policy.mode == "public":
        return Decision(True, "mode public", f"{where} is a public address")
    return Decision(False, "not in allowlist", f"{where} matches no allow entry")


def _shown_network(network: IPNetwork) -> str:
    """`10.0.0.0/8`, and one address without its /32."""
    single = network.prefixlen == network.max_prefixlen
    return str(network.network_address) if single else str(network)


def _where(name: str | None, ip: IPAddress, port: int | None) -> str:
    target = f"[{ip}]" if ip.version == 6 and port is not None else str(ip)
    target = f"{target}:{port}" if port is not None else target
    return f"{name} ({target})" if name else target


# --------------------------------------------------------------------------- presets

Runner = Callable[[Sequence[str], Path], "str | None"]


@dataclass(frozen=True)
class PresetContext:
    """Where presets read the tools' configuration; every field defaults to this host
    (tests pass their own). `run` runs a tool and returns its stdout, or None."""

    environ: Mapping[str, str] | None = None
    project_dir: Path | None = None
    home: Path | None = None
    site_prefix: Path | None = None
    debian_mirror: str = ""
    run: Runner | None = None
    # (index URL, files host) pip uses when nothing is configured; None: ask pip.
    pip_defaults: tuple[str, str] | None = None

    @property
    def env(self) -> Mapping[str, str]:
        return os.environ if self.environ is None else self.environ

    @property
    def cwd(self) -> Path:
        return self.project_dir or Path.cwd()

    @property
    def user_home(self) -> Path:
        return self.home or Path(self.env.get("HOME") or Path.home())

    def tool(self, argv: Sequence[str]) -> str | None:
        return (self.run or _run_tool)(argv, self.cwd)


def _run_tool(argv: Sequence[str], cwd: Path) -> str | None:
    """A tool's stdout, or None when it is missing or fails (then presets fall back)."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def url_entry(url: str, source: str) -> str | None:
    """`https://host:8443/simple` → `host:8443` (the scheme's port when none is written);
    None for local paths and file: URLs. A URL without a host raises UsageError."""
    if "://" not in url:
        return None  # a local path (pip's find-links, a file index)
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    except ValueError as exc:
        raise UsageError(f"{source}: cannot read {_cut(url)}: {exc}") from None
    if parts.scheme.lower() == "file":
        return None
    if not parts.hostname or port is None:
        raise UsageError(f"{source}: {_cut(url)} is not an http(s) URL with a host")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    entry = f"{host}:{port}"
    try:
        parse_entry(entry)
    except UsageError as exc:
        raise UsageError(f"{source}: {exc.message}") from None
    return entry


def _cut(text: str) -> str:
    # Credentials in an index URL stay out of error lines.
    try:
        parts = urlsplit(text)
        if parts.password or parts.username:
            text = text.replace(parts.netloc, parts.netloc.rpartition("@")[2], 1)
    except ValueError:
        pass
    return repr(text if len(text) <= SHOWN_ENTRY else text[: SHOWN_ENTRY - 1] + "…")


# pip: options that name where packages come from, as pip normalises their keys.
PIP_KEYS = ("index-url", "extra-index-url", "find-links", "no-index")


def pip_config_files(context: PresetContext) -> list[Path]:
    """pip's configuration files, lowest precedence first, as pip finds them on Linux:
    global (XDG_CONFIG_DIRS, /etc), user (~/.pip, XDG_CONFIG_HOME; skipped when
    PIP_CONFIG_FILE names a file that exists), site (the interpreter's prefix), then
    PIP_CONFIG_FILE."""
    env = context.env
    xdg_dirs = (env.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(os.pathsep)
    files = [Path(d) / "pip" / "pip.conf" for d in xdg_dirs if d] + [Path("/etc/pip.conf")]
    chosen = env.get("PIP_CONFIG_FILE")
    if not (chosen and Path(chosen).exists()):
        xdg_home = env.get("XDG_CONFIG_HOME") or str(context.user_home / ".config")
        files += [context.user_home / ".pip" / "pip.conf", Path(xdg_home) / "pip" / "pip.conf"]
    files.append((context.site_prefix or Path(sys.prefix)) / "pip.conf")
    if chosen:
        files.append(Path(chosen))
    return files


def pip_settings(context: PresetContext) -> dict[str, str]:
    """pip's index options as pip merges them: `[global]` of every file, then `[install]`
    of every file, then `PIP_*` variables (later wins)."""
    merged: dict[tuple[str, str], str] = {}
    for path in pip_config_files(context):
        for section, key, value in _read_ini(path):
            merged[(section, key)] = value
    found: dict[str, str] = {}
    for wanted in ("global", "install"):
        found.update({k: v for (s, k), v in merged.items() if s == wanted and k in PIP_KEYS})
    for var, value in context.env.items():
        if var.startswith("PIP_"):
            key = var[4:].lower().replace("_", "-")
            if key in PIP_KEYS:
                found[key] = value
    return found


def _read_ini(path: Path) -> list[tuple[str, str, str]]:
    if not path.is_file():
        return []
    parser = configparser.RawConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"preset python: cannot read {path}: {str(exc).splitlines()[0]}") from None
    return [
        (section, key.lower().replace("_", "-").removeprefix("--"), value)
        for section in parser.sections()
        for key, value in parser.items(section)
    ]


def _true(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on", "y", "t"}


def pip_defaults(context: PresetContext) -> tuple[str, str]:
    """(index URL, files host) pip uses when nothing is configured, from pip's own
    constants (this interpreter's pip, else `python3`'s); UsageError when no pip is
    installed, since this project names no registry host itself."""
    if context.pip_defaults is not None:
        return context.pip_defaults
    try:
        from pip._internal.models.index import PyPI  # pip's internals: guarded

        return str(PyPI.url), str(PyPI.file_storage_domain)
    except (ImportError, AttributeError):
        pass
    code = "from pip._internal.models.index import PyPI as P; print(P.url, P.file_storage_domain)"
    out = context.tool(["python3", "-c", code])
    parts = (out or "").split()
    if len(parts) == 2:
        return parts[0], parts[1]
    raise UsageError(
        "preset python: pip is not installed here, so its default index is unknown",
        "set PIP_INDEX_URL, or allow the index hosts with --allow",
    )


def python_preset(context: PresetContext) -> list[str]:
    """The hosts pip (and uv, through its variables) is configured to install from."""
    options = pip_settings(context)
    urls: list[tuple[str, str]] = []
    if not _true(options.get("no-index", "")):
        default_url, files_host = ("", "")
        index = options.get("index-url")
        if index is None:
            default_url, files_host = pip_defaults(context)
            index = default_url
        urls.append((index, "pip index-url"))
        if files_host:
            urls.append((f"https://{files_host}/", "pip's files host"))
        urls += [(u, "pip extra-index-url") for u in options.get("extra-index-url", "").split()]
    urls += [(u, "pip find-links") for u in options.get("find-links", "").split()]
    env = context.env
    for var in ("UV_DEFAULT_INDEX", "UV_INDEX_URL", "UV_INDEX", "UV_EXTRA_INDEX_URL"):
        # UV_INDEX items may be `name=url`.
        urls += [(u.rpartition("=")[2], var) for u in env.get(var, "").split()]
    return _entries_of(urls)


def _entries_of(urls: Iterable[tuple[str, str]]) -> list[str]:
    entries = (url_entry(url, source) for url, source in urls)
    return list(dict.fromkeys(entry for entry in entries if entry))


def node_preset(context: PresetContext) -> list[str]:
    """npm's registry and scoped registries: what `npm config list --json` says (npm
    merges its variables and .npmrc files itself), else the variables and .npmrc files
    read here; UsageError when neither names one (npm's default is npm's to know)."""
    out = context.tool(["npm", "config", "list", "--json"])
    registries = _npm_json_registries(out) if out else []
    if not registries:
        registries = _npm_env_registries(context) or _npmrc_registries(context)
    if not registries:
        raise UsageError(
            "preset node: npm is not installed here and no registry is configured",
            "set NPM_CONFIG_REGISTRY, or allow the registry host with --allow",
        )
    return _entries_of(registries)


def _npm_json_registries(out: str) -> list[tuple[str, str]]:
    try:
        data = json.loads(out)
    except ValueError:
        return []
    if not isinstance(data, dict):
        return []
    return [
        (value, f"npm config {key}")
        for key, value in data.items()
        if _is_registry_key(key) and isinstance(value, str) and value
    ]


def _is_registry_key(key: str) -> bool:
    return key == "registry" or (key.startswith("@") and key.endswith(":registry"))


def _npm_env_registries(context: PresetContext) -> list[tuple[str, str]]:
    found = []
    for var, value in context.env.items():
        key = var.lower()
        if key.startswith("npm_config_") and _is_registry_key(key[11:]) and value:
            found.append((value, var))
    return found


def _npmrc_registries(context: PresetContext) -> list[tuple[str, str]]:
    env = context.env
    files = [
        context.cwd / ".npmrc",
        Path(env.get("NPM_CONFIG_USERCONFIG") or context.user_home / ".npmrc"),
        Path(env.get("NPM_CONFIG_GLOBALCONFIG") or "/etc/npmrc"),
    ]
    found = []
    for path in files:
        for key, value in _npmrc_items(path):
            if _is_registry_key(key):
                found.append((_expand(value, env), str(path)))
    return found


def _npmrc_items(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    except (OSError, UnicodeDecodeError):
        return []
    items = []
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith(("#", ";")):
            items.append((key.strip(), value.strip().strip("\"'")))
    return items


def _expand(value: str, env: Mapping[str, str]) -> str:
    """npm's `${VAR}` in .npmrc values."""
    return re.sub(r"\$\{([^}]*)\}", lambda m: env.get(m.group(1), ""), value)


def debian_preset(context: PresetContext) -> list[str]:
    """The Debian mirror the project's base image installs from (apt there uses this one
    host, its -security suite included): the `debian_mirror` setting, else the default
    of the debootstrap installed here."""
    mirror = context.debian_mirror or _debootstrap_default()
    if not mirror:
        raise UsageError(
            "preset debian: no debian_mirror is set and debootstrap is not installed here",
            "set debian_mirror, or allow the mirror host with --allow",
        )
    return _entries_of([(mirror, "debian mirror")])


def _debootstrap_default() -> str:
    script = shutil.which("debootstrap")
    try:
        text = Path(script).read_text(encoding="utf-8", errors="replace") if script else ""
    except OSError:
        return ""
    found = re.search(r'^DEF_MIRROR="([^"]+)"', text, re.MULTILINE)
    return found.group(1) if found else ""


PRESETS: dict[str, tuple[Callable[[PresetContext], list[str]], str]] = {
    "python": (
        python_preset,
        "the package index hosts pip is configured with (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, "
        "PIP_FIND_LINKS, pip.conf; UV_* index variables); by default pip's own index and "
        "files host",
    ),
    "node": (
        node_preset,
        "npm's registry and scoped registries (npm config: NPM_CONFIG_REGISTRY, .npmrc); by "
        "default npm's own",
    ),
    "debian": (
        debian_preset,
        "the Debian mirror images are built from (debian_mirror; by default debootstrap's)",
    ),
}


def describe_presets() -> str:
    """One line per preset, for `inv --help`."""
    return "\n".join(f"{name}: {text}" for name, (_fn, text) in PRESETS.items())


def expand_preset(name: str, context: PresetContext | None = None) -> list[str]:
    """The entries preset `name` stands for on this host."""
    if name not in PRESETS:
        raise UsageError(f"unknown egress preset {name!r}", f"one of {', '.join(PRESETS)}")
    return PRESETS[name][0](context or PresetContext())


def preset_problem(text: str) -> str | None:
    """The one-line error for the first unknown preset of a comma-separated list, or None."""
    for name in split_entries(text):
        if name not in PRESETS:
            return f"unknown egress preset {name!r} (one of {', '.join(PRESETS)})"
    return None


# --------------------------------------------------------------------------- the policy


def _entries(items: Iterable[Entry | str]) -> tuple[Entry, ...]:
    """Parsed, without repeats, in a stable order (order never changes a decision)."""
    parsed = {str(e): e for e in (i if isinstance(i, Entry) else parse_entry(i) for i in items)}
    return tuple(parsed[key] for key in sorted(parsed))


def _strings(values: str | Iterable[str] | None) -> list[str]:
    """Flag or setting values: one string or several, each possibly comma-separated."""
    if values is None:
        return []
    items = [values] if isinstance(values, str) else list(values)
    return [entry for item in items for entry in split_entries(item)]


class EgressSettings(Protocol):
    """What `EgressPolicy.from_settings` reads of `config.Settings`."""

    @property
    def network(self) -> str: ...
    @property
    def egress(self) -> str: ...
    @property
    def allow(self) -> str: ...
    @property
    def deny(self) -> str: ...
    @property
    def allow_presets(self) -> str: ...
    @property
    def debian_mirror(self) -> str: ...
    @property
    def secret_hosts(self) -> list[str]: ...
    @property
    def root(self) -> Path: ...


def mode_of(settings: EgressSettings) -> str:
    """The egress mode the settings choose (`network: none` is mode none)."""
    return "none" if settings.network == "none" else settings.egress


@dataclass(frozen=True)
class EgressPolicy:
    """A sandbox's egress policy: its mode and its allow and deny entries (strings are
    parsed on construction; presets already expanded into `allow`, named in `presets`)."""

    mode: str = DEFAULT_MODE
    allow: tuple[Entry, ...] = ()
    deny: tuple[Entry, ...] = ()
    presets: tuple[str, ...] = ()
    # The destinations of the secrets in use (also in `allow`): their connections go
    # through the credentials broker (stigmer_sandbox/credentials.py).
    brokered: tuple[Entry, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"unknown egress mode {self.mode!r}", f"one of {', '.join(MODES)}")
        object.__setattr__(self, "allow", _entries(self.allow))
        object.__setattr__(self, "deny", _entries(self.deny))
        object.__setattr__(self, "brokered", _entries(self.brokered))
        object.__setattr__(self, "presets", tuple(sorted(set(self.presets))))

    @classmethod
    def from_options(
        cls,
        mode: str | None = None,
        allow: str | Iterable[str] | None = None,
        deny: str | Iterable[str] | None = None,
        presets: str | Iterable[str] | None = None,
        context: PresetContext | None = None,
    ) -> EgressPolicy:
        """A policy from flag-like strings (each may be comma-separated); presets are
        expanded into allow entries here."""
        names = _strings(presets)
        expanded = [entry for name in names for entry in expand_preset(name, context)]
        return cls(
            mode or DEFAULT_MODE,
            _entries(_strings(allow) + expanded),
            _entries(_strings(deny)),
            tuple(names),
        )

    @classmethod
    def from_settings(
        cls, settings: EgressSettings, context: PresetContext | None = None
    ) -> EgressPolicy:
        """The policy the settings describe; `network: none` means mode none."""
        context = context or PresetContext(
            project_dir=settings.root, debian_mirror=settings.debian_mirror
        )
        mode = mode_of(settings)
        allow = [*_strings(settings.allow), *settings.secret_hosts]  # a secret's hosts too
        chosen = cls.from_options(mode, allow, settings.deny, settings.allow_presets, context)
        return dataclasses.replace(chosen, brokered=_entries(settings.secret_hosts))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EgressPolicy:
        """The policy `to_dict` described (e.g. read back from an audit or labels)."""
        return cls(
            str(data.get("mode", DEFAULT_MODE)),
            _entries(_strings(data.get("allow", ()))),
            _entries(_strings(data.get("deny", ()))),
            tuple(_strings(data.get("presets", ()))),
            _entries(_strings(data.get("brokered", ()))),
        )

    def to_dict(self) -> dict[str, Any]:
        """Mode, entries (canonical text) and preset names, for JSON, audit and labels."""
        found = {
            "mode": self.mode,
            "allow": [str(e) for e in self.allow],
            "deny": [str(e) for e in self.deny],
            "presets": list(self.presets),
        }
        if self.brokered:  # absent without secrets: earlier records read the same
            found["brokered"] = [str(e) for e in self.brokered]
        return found

    def effective(self) -> dict[str, Any]:
        """What decides connections: mode none ignores every entry, open ignores allow."""
        allow = [str(e) for e in self.allow] if self.mode in ("public", "allowlist") else []
        deny = [str(e) for e in self.deny] if self.mode != "none" else []
        found: dict[str, Any] = {"mode": self.mode, "allow": allow, "deny": deny}
        if self.brokered and self.mode in ("public", "allowlist"):
            found["brokered"] = [str(e) for e in self.brokered]
        return found

    def fingerprint(self) -> str:
        """A short stable hash of the effective policy: equal policies, equal prints,
        whatever the order or spelling of their entries."""
        text = json.dumps([FINGERPRINT_VERSION, self.effective()], sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def decide(
        self,
        name: str | None,
        address: str | IPAddress,
        port: int | None,
        host_addresses: Iterable[str | IPAddress | IPNetwork] = (),
    ) -> Decision:
        """`decide(self, ...)`."""
        return decide(self, name, address, port, host_addresses)
