"""The credentials broker: a mitmproxy addon that puts secrets into requests (issue 26).

Squid (the sandbox's egress gateway) sends only connections to a secret's destinations
here, after its policy allowed them; mitmproxy terminates their TLS with the
installation's broker CA and verifies the upstream certificate itself. For each request:

- a placeholder (`stigmer-secret-` and 32 hex digits) anywhere in the URL, a header, the
  credentials of `Authorization: Basic`, or a body that is not streamed, must belong to a
  secret whose destinations include this connection's target; otherwise the request is
  answered 403 here, never forwarded, and one JSON line records the attempt (destination,
  secret name, where; never a value);
- the placeholders of the secrets for this destination are replaced by their values, and
  a secret's header template (`Authorization: Bearer {value}`) is set;
- an AWS secret (`sign: aws-sigv4`) is never substituted: its placeholder is the key id
  the sandbox signs with, allowed only in a SigV4 Authorization header, and the request
  is signed again with the real key (stigmer_broker_aws.py, beside this file). A request
  whose payload hash is in a header (every S3 request) is re-signed as soon as its
  headers arrive, and its body streams through unread.

The URL and headers are checked when the headers arrive (`requestheaders`), before any
part of a request is forwarded, even one whose body streams; a body that is read (up to
`stream_large_bodies`) is checked and substituted once it is complete (`request`).

The host writes SECRETS_FILE (JSON, replaced by rename) and may rewrite it at any time:
it is re-read when its inode, size or mtime change, so a revoked or rotated secret holds
from the next request. A missing or unreadable file means no secrets: every placeholder
is refused (fail closed). The host's side: stigmer_sandbox/runtime/broker.py.

Stdlib only at import, besides the AWS signer (botocore), which is left out when missing
(unit tests on the host); mitmproxy is imported when it runs.
"""

import asyncio
import base64
import binascii
import ipaddress
import json
import os
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

try:  # the image has it; a host without botocore tests the rest
    import stigmer_broker_aws as aws
except ImportError:  # pragma: no cover - depends on the environment
    aws = None  # type: ignore[assignment]

PREFIX = "stigmer-secret-"
# No '-' or '_' after the digits: a placeholder ends where a word such as "-post" starts.
PLACEHOLDER = re.compile(re.escape(PREFIX) + r"[0-9a-f]{32}(?![0-9A-Za-z])")
PLACEHOLDER_BYTES = re.compile(PLACEHOLDER.pattern.encode())
SECRETS_FILE = os.environ.get("BROKER_SECRETS", "/run/broker/secrets.json")
LOG_FILE = os.environ.get("BROKER_LOG", "")  # JSON lines; empty: stderr
READY_FILE = os.environ.get("BROKER_READY", "")  # written once the proxy listens
LISTEN_WAIT_S = 60.0  # for the server this addon starts (bounded: a port taken, a bad mode)
LISTEN_POLL_S = 0.005
REFUSED_HEADER = "X-Stigmer-Broker"
AWS_SIGV4 = "aws-sigv4"
DONE = "stigmer-broker-done"  # flow.metadata: headers already brokered (a streamed body)


@dataclass(frozen=True)
class Destination:
    """One of a secret's destinations, as the host's egress entries describe it: a name,
    a wildcard (names under it, not itself) or a network, with an optional port."""

    kind: str  # "name", "wildcard" or "network"
    host: str
    port: int | None = None

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        host = host.lower().rstrip(".")
        if self.kind == "network":
            try:
                return ipaddress.ip_address(host.strip("[]")) in ipaddress.ip_network(self.host)
            except ValueError:
                return False
        if self.kind == "wildcard":
            return host.endswith("." + self.host)
        return host == self.host


@dataclass(frozen=True)
class Secret:
    name: str
    placeholder: str
    value: str
    destinations: tuple[Destination, ...]
    header: str = ""  # "Name: template with {value}"
    sign: str = ""  # AWS_SIGV4: re-sign requests signed with the placeholder key id

    def goes_to(self, host: str, port: int) -> bool:
        return any(d.matches(host, port) for d in self.destinations)


def parse_secrets(data: Any) -> dict[str, Secret]:
    """The secrets file's content, by placeholder."""
    found = {}
    for item in data.get("secrets", []):
        secret = Secret(
            name=str(item["name"]),
            placeholder=str(item["placeholder"]),
            value=str(item["value"]),
            destinations=tuple(
                Destination(str(d["kind"]), str(d["host"]), d.get("port"))
                for d in item["destinations"]
            ),
            header=str(item.get("header") or ""),
            sign=str(item.get("sign") or ""),
        )
        found[secret.placeholder] = secret
        # Placeholders no request may carry (an AWS secret key: it only signs in the
        # sandbox): bound to no destination, refused everywhere under the secret's name.
        for other in item.get("unsendable", []):
            found[str(other)] = Secret(secret.name, str(other), "", ())
    return found


class Table:
    """The secrets file, re-read when it changes (one stat per request)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.key: tuple[int, int, int] | None = None
        self.by_placeholder: dict[str, Secret] = {}

    def current(self) -> dict[str, Secret]:
        try:
            st = os.stat(self.path)
        except OSError:
            self.key, self.by_placeholder = None, {}
            return self.by_placeholder
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if key != self.key:
            self.by_placeholder = self._load()
            self.key = key
        return self.by_placeholder

    def _load(self) -> dict[str, Secret]:
        try:
            with open(self.path, encoding="utf-8") as handle:
                return parse_secrets(json.load(handle))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log({"event": "secrets-unreadable", "error": type(exc).__name__})
            return {}


def log(record: dict[str, Any]) -> None:
    line = json.dumps({"time": round(time.time(), 3), **record}, sort_keys=True) + "\n"
    if LOG_FILE:
        with open(LOG_FILE, "a", encoding="utf-8") as handle:
            handle.write(line)
    else:
        sys.stderr.write(line)


def basic_credentials(value: str) -> str | None:
    """The decoded `user:password` of an `Authorization: Basic` value, or None."""
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        return None
    try:
        return base64.b64decode(token.strip(), validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return None


def placeholders_in(
    path: str, headers: Iterable[tuple[str, str]], body: bytes | None
) -> list[tuple[str, str]]:
    """Every (placeholder, where) in a request."""
    found = [(p, "url") for p in PLACEHOLDER.findall(path)]
    for name, value in headers:
        found += [(p, f"header:{name}") for p in PLACEHOLDER.findall(f"{name}: {value}")]
        decoded = basic_credentials(value)
        if decoded:
            found += [(p, f"basic:{name}") for p in PLACEHOLDER.findall(decoded)]
    if body and PREFIX.encode() in body:
        found += [(p.decode(), "body") for p in PLACEHOLDER_BYTES.findall(body)]
    return found


def refusal(
    table: dict[str, Secret], host: str, port: int, found: list[tuple[str, str]]
) -> tuple[str, str] | None:
    """(secret name or "unknown", where) of the first placeholder that may not go to
    host:port, or None."""
    for placeholder, where in found:
        secret = table.get(placeholder)
        if secret is None or not secret.goes_to(host, port):
            return (secret.name if secret else "unknown"), where
    return None


def signing_refusal(
    table: dict[str, Secret], found: list[tuple[str, str]]
) -> tuple[str, str] | None:
    """(secret name, where) of a signing secret's placeholder found anywhere but in the
    Authorization header it signs: a presigned URL (`presigned-url`), a header, a body."""
    for placeholder, where in found:
        secret = table.get(placeholder)
        if secret is not None and secret.sign and where != "header:Authorization":
            return secret.name, "presigned-url" if where == "url" else where
    return None


def substituted(text: str, secrets: list[Secret]) -> str:
    for secret in secrets:
        text = text.replace(secret.placeholder, secret.value)
    return text


def header_value(value: str, secrets: list[Secret]) -> str:
    """A header value with placeholders replaced, inside Basic credentials too."""
    decoded = basic_credentials(value)
    if decoded and any(s.placeholder in decoded for s in secrets):
        return "Basic " + base64.b64encode(substituted(decoded, secrets).encode()).decode()
    return substituted(value, secrets)


async def announce_listening(master: Any) -> None:
    """Write READY_FILE (this process's id) once the proxy server listens; never, and
    one line logged, when it does not within LISTEN_WAIT_S."""
    server = master.addons.get("proxyserver")
    deadline = time.monotonic() + LISTEN_WAIT_S
    while not server.listen_addrs():
        if time.monotonic() > deadline:
            log({"event": "not-listening", "after_s": LISTEN_WAIT_S})
            return
        await asyncio.sleep(LISTEN_POLL_S)
    with open(READY_FILE + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(str(os.getpid()))
    os.replace(READY_FILE + ".tmp", READY_FILE)


class Broker:
    """The addon."""

    def __init__(self) -> None:
        self.table = Table(SECRETS_FILE)

    def running(self) -> None:
        """Start the proxy server now, with this addon in place. The broker is started
        with `server=false`: mitmproxy loads a script in a task of its own, beside the
        one that sets up its server, and which of them comes first is an accident of its
        task scheduling (11.0.2 happens to load scripts first; a request served before
        the addon would pass placeholders on unjudged and unaudited). So a broker that
        listens has its addon, and the gateway's wait for the port is a wait for the
        whole broker. (A script that fails to load at startup makes mitmdump exit.)"""
        from mitmproxy import ctx

        ctx.options.update(server=True)
        if READY_FILE:
            asyncio.get_running_loop().create_task(announce_listening(ctx.master))

    def requestheaders(self, flow: Any) -> None:
        """The URL and headers judged before anything is forwarded; a request whose body
        streams (an S3 upload, or one over `stream_large_bodies`) is brokered now."""
        request = flow.request
        table = self.table.current()
        if not self.allowed(flow, table, None):
            return
        signer = signing_secret(table.values(), request.headers.get("authorization", ""))
        if signer is not None and aws is not None and aws.streams(_lower(request.headers)):
            request.stream = True
        if request.stream:
            flow.metadata[DONE] = True
            self.broker(flow, table, None)

    def request(self, flow: Any) -> None:
        """A request whose body was read: judged with its body, then brokered."""
        if flow.response is not None or flow.metadata.get(DONE):
            return
        table = self.table.current()
        body = flow.request.raw_content
        if self.allowed(flow, table, body):
            self.broker(flow, table, body)

    def allowed(self, flow: Any, table: dict[str, Secret], body: bytes | None) -> bool:
        """Whether every placeholder in the request may go where it goes; if not, the
        request is answered 403 here."""
        request = flow.request
        # The destination is where this connection goes (the target squid forwarded,
        # whose certificate mitmproxy verifies), never what the Host header claims.
        host, port = request.host, request.port
        claimed = (request.host_header or "").lower()
        if claimed and claimed.rsplit(":", 1)[0].strip("[]") != host.lower().strip("[]"):
            self.refuse(flow, "unknown", "host-mismatch")
            return False
        found = placeholders_in(request.path, request.headers.items(multi=True), body)
        refused = refusal(table, host, port, found) or signing_refusal(table, found)
        if refused:
            self.refuse(flow, *refused)
            return False
        return True

    def broker(self, flow: Any, table: dict[str, Secret], body: bytes | None) -> None:
        """Put the values of this destination's secrets into the request (`body`: None
        when it streams), then re-sign it for an AWS secret."""
        request = flow.request
        host, port = request.host, request.port
        here = [s for s in table.values() if s.goes_to(host, port)]
        if not here:
            return
        plain = [s for s in here if not s.sign]
        request.path = substituted(request.path, plain)
        for name in list(request.headers.keys()):
            values = request.headers.get_all(name)
            replaced = [header_value(value, plain) for value in values]
            if replaced != values:
                request.headers.set_all(name, replaced)
        if body and any(s.placeholder.encode() in body for s in plain):
            for secret in plain:
                body = body.replace(secret.placeholder.encode(), secret.value.encode())
            request.raw_content = body
        for secret in plain:
            if secret.header:
                name, _, template = secret.header.partition(":")
                request.headers[name.strip()] = template.strip().replace("{value}", secret.value)
        signer = signing_secret(here, request.headers.get("authorization", ""))
        if signer is not None and not self.resigned(flow, signer, body):
            return
        log(
            {
                "event": "brokered",
                "destination": f"{host}:{port}",
                "secrets": sorted(s.name for s in here),
                "client": flow.client_conn.peername[0],
            }
        )

    def resigned(self, flow: Any, secret: Secret, body: bytes | None) -> bool:
        """Re-sign the request with the secret's real key (True), or refuse it (False)."""
        request = flow.request
        try:
            if aws is None:
                raise RuntimeError("the AWS signer (botocore) is not installed")
            changes = aws.resign(
                request.method,
                request.url,
                _lower(request.headers),
                body,
                placeholder=secret.placeholder,
                keys=aws.keys_of(secret.value),
            )
        except Exception as exc:  # a refusal, or a value the signer cannot use
            where = getattr(exc, "where", "signer-error")
            self.refuse(flow, secret.name, where, str(exc) if hasattr(exc, "where") else "")
            return False
        for name, value in changes.items():
            if value is None:
                request.headers.pop(name, None)
            else:
                request.headers[name] = value
        return True

    def responseheaders(self, flow: Any) -> None:
        # Responses are never inspected: streamed, not buffered (large downloads).
        if flow.response is not None:
            flow.response.stream = True

    def refuse(self, flow: Any, name: str, where: str, why: str = "") -> None:
        from mitmproxy import http

        host, port = flow.request.host, flow.request.port
        flow.request.stream = False  # an answer from here and a streamed body exclude each other
        log(
            {
                "event": "refused",
                "destination": f"{host}:{port}",
                "secret": name,
                "where": where,
                "client": flow.client_conn.peername[0],
            }
        )
        reason = why or f"a secret placeholder ({name}) may not be sent to {host}:{port}"
        flow.response = http.Response.make(
            403,
            f"stigmer broker: {reason}\n",
            {"Content-Type": "text/plain", REFUSED_HEADER: "refused"},
        )


def signing_secret(secrets: Iterable[Secret], authorization: str) -> Secret | None:
    """The signing secret whose placeholder key id signed this Authorization header."""
    for secret in secrets:
        if secret.sign and secret.placeholder in authorization:
            return secret
    return None


def _lower(headers: Any) -> dict[str, str]:
    """Headers by lower-case name (repeated ones joined as SigV4 canonicalises them)."""
    joined: dict[str, list[str]] = {}
    for name, value in headers.items(multi=True):
        joined.setdefault(name.lower(), []).append(value)
    return {name: ",".join(values) for name, values in joined.items()}


addons = [Broker()]
