"""The per-sandbox egress gateway on the real engine (issue 22, item 3).

Traffic goes only to servers this module starts: a stand-in internet (a labelled network
with two web servers and a resolver in containers) and two web servers in this process,
bound to 0.0.0.0 and reached through the default bridge's gateway; plus the package index
for the one install test. A plain container of the basic image (uid 1000, no
capabilities, no-new-privileges) is put behind a gateway with `sandbox_options()` and
tries every bypass of the issue; "reached" means the destination's own content came back.
One world and one gateway per mode serve the whole module.
"""

from __future__ import annotations

import collections
import http.server
import ipaddress
import socketserver
import threading
from pathlib import Path

import pytest

from stigmer_sandbox import egress, engine, labels
from stigmer_sandbox.runtime import egress_gateway
from stigmer_sandbox.runtime.egress_gateway import EgressGateway

from ..tls_standin import make_certificates
from .conftest import SESSION_ID, TEST_LABELS, wait_for

BASIC = "stigmer-sandbox-basic:local"
INET_CANDIDATES = ("198.18.99.0/24", "198.18.98.0/24", "198.18.97.0/24", "198.19.99.0/24")
CA_IN_CLIENT = "/etc/egress-test/ca.pem"
PROBE_IN_CLIENT = "/etc/egress-test/probe.py"
UNSET = "env -u HTTP_PROXY -u http_proxy -u HTTPS_PROXY -u https_proxy"
CURL = f"curl -sS --max-time 6 --cacert {CA_IN_CLIENT}"

SERVER = r"""
import http.server, os, socketserver, ssl, sys, threading
root = sys.argv[1]
class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *a, **k):
        super().__init__(*a, directory=root, **k)
    def log_message(self, *a):
        pass
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
servers = [Server(("0.0.0.0", 80), Handler), Server(("0.0.0.0", 8080), Handler)]
tls = Server(("0.0.0.0", 443), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain("/srv/cert.pem")
tls.socket = context.wrap_socket(tls.socket, server_side=True)
for server in [tls, *servers[1:]]:
    threading.Thread(target=server.serve_forever, daemon=True).start()
servers[0].serve_forever()
"""

PROBE = r'''
"""Probes a shell cannot make: raw TCP, DNS over UDP to a chosen resolver, ICMP echo."""
import socket, struct, sys
kind, host = sys.argv[1], sys.argv[2]
try:
    if kind == "tcp":
        s = socket.create_connection((host, int(sys.argv[3])), timeout=4)
        s.sendall(b"GET /index.html HTTP/1.0\r\nHost: probe\r\n\r\n")
        data = b""
        while len(data) < 65536:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        print(data.decode(errors="replace"))
    elif kind == "dns":
        name = sys.argv[3]
        query = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
        query += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
        query += struct.pack("!HH", 1, 1)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(4)
        s.sendto(query, (host, 53))
        answer = s.recv(512)
        wanted = socket.inet_aton(sys.argv[4])
        print("reached-other-resolver" if wanted in answer[12:] else "answered-by-gateway")
    elif kind == "icmp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
        s.settimeout(3)
        s.sendto(struct.pack("!BBHHH", 8, 0, 0, 0, 1) + b"probe", (host, 0))
        data = s.recv(128)
        print("reached-icmp" if data and data[0] == 0 else "no")
except OSError as exc:
    print(f"refused: {exc}")
'''


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def _host_server(folder: Path, marker: str) -> _Server:
    """A web server in this process on 0.0.0.0 (a free port) serving `marker`."""
    root = folder / marker
    root.mkdir()
    (root / "index.html").write_text(marker + "\n")

    class Handler(_Quiet):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

    server = _Server(("0.0.0.0", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _inet(client) -> tuple[object, ipaddress.IPv4Network]:
    import docker.types

    for candidate in INET_CANDIDATES:
        network = ipaddress.IPv4Network(candidate)
        ipam = docker.types.IPAMConfig(
            pool_configs=[
                docker.types.IPAMPool(subnet=candidate, gateway=str(network.network_address + 1))
            ]
        )
        try:
            made = client.networks.create(
                f"egtest-inet-{SESSION_ID}", driver="bridge", ipam=ipam, labels=TEST_LABELS
            )
            return made, network
        except Exception as exc:  # another network holds it: try the next one
            if "overlap" not in str(exc).lower():
                raise
    pytest.fail("no free stand-in internet subnet")


def _fixed_address(client, network: str, address: str) -> dict:
    """`containers.run` arguments that put a container on `network` at `address`."""
    endpoint = client.api.create_endpoint_config(ipv4_address=address)
    return {"network": network, "networking_config": {network: endpoint}}


def _other_host_address(skip: set[str]) -> str | None:
    """One of this host's own addresses that is not a bridge gateway or loopback."""
    for text in egress_gateway.host_addresses():
        address = ipaddress.ip_address(text)
        if address.version == 4 and not address.is_loopback and text not in skip:
            return text
    return None


@pytest.fixture(scope="module")
def world(docker_engine, tmp_path_factory, project_settings):
    """The stand-in internet and the host's servers."""
    client = docker_engine
    folder = tmp_path_factory.mktemp("egress-world")
    folder.chmod(0o755)
    network, subnet = _inet(client)
    web10, web11, resolver = (str(subnet.network_address + n) for n in (10, 11, 53))
    bridge = egress_gateway.bridge_gateway()
    host_other = _other_host_address({bridge, str(subnet.network_address + 1)})
    names = ["allowed.test", "other.test", "*.wild.test", "rebind.test"]
    make_certificates(folder, names, [web10, web11])
    (folder / "server.py").write_text(SERVER)
    for name, address in (("web10", web10), ("web11", web11)):
        www = folder / name
        www.mkdir()
        (www / "index.html").write_text(f"reached-{name}\n")
        client.containers.run(
            BASIC,
            ["python3", "/srv/server.py", f"/srv/{name}"],
            name=f"egtest-{name}-{SESSION_ID}",
            user="0:0",
            detach=True,
            labels=TEST_LABELS,
            volumes={str(folder): {"bind": "/srv", "mode": "ro"}},
            **_fixed_address(client, network.name, address),
        )
    dns = [
        f"address=/allowed.test/{web10}",
        f"address=/other.test/{web11}",
        f"address=/wild.test/{web10}",
        f"address=/rebind.test/{bridge}",
        f"address=/hostaddr.test/{host_other or bridge}",
        f"address=/secret.test2/{subnet.network_address + 99}",
    ]
    (folder / "dns.conf").write_text("no-resolv\nno-hosts\n" + "\n".join(dns) + "\n")
    client.containers.run(
        egress_gateway.ensure_gateway_image(project_settings),
        ["--keep-in-foreground", "--conf-file=/srv/dns.conf", "--user=root"],
        entrypoint=["dnsmasq"],
        name=f"egtest-resolver-{SESSION_ID}",
        detach=True,
        labels=TEST_LABELS,
        volumes={str(folder): {"bind": "/srv", "mode": "ro"}},
        **_fixed_address(client, network.name, resolver),
    )
    (folder / "probe.py").write_text(PROBE)
    hidden = _host_server(folder, "reached-host-hidden")
    allowed = _host_server(folder, "reached-host-allowed")
    yield {
        "folder": folder,
        "network": network.name,
        "web10": web10,
        "web11": web11,
        "resolver": resolver,
        "secret": str(subnet.network_address + 99),
        "bridge": bridge,
        "host_other": host_other,
        "hidden_port": hidden.server_address[1],
        "allowed_port": allowed.server_address[1],
    }
    hidden.shutdown()
    allowed.shutdown()


def _policy(mode: str, world: dict, **extra: list[str]) -> egress.EgressPolicy:
    allow = [
        "allowed.test",
        "*.wild.test",
        "rebind.test",
        "hostaddr.test",
        f"{world['bridge']}:{world['allowed_port']}",
    ]
    return egress.EgressPolicy.from_options(
        mode,
        allow=allow + extra.get("allow", []),
        deny=["bad.wild.test", *extra.get("deny", [])],
        presets=extra.get("presets", []),
    )


def _client(docker_engine, gateway: EgressGateway, world: dict, name: str):
    """A plain container of the basic image behind `gateway`, as a sandbox would be."""
    options = gateway.sandbox_options()
    return docker_engine.containers.run(
        BASIC,
        ["sleep", "infinity"],
        name=f"egtest-client-{name}-{SESSION_ID}",
        detach=True,
        user="1000:1000",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges:true"],
        labels=TEST_LABELS,
        volumes={
            str(world["folder"] / "ca.pem"): {"bind": CA_IN_CLIENT, "mode": "ro"},
            str(world["folder"] / "probe.py"): {"bind": PROBE_IN_CLIENT, "mode": "ro"},
        },
        **options,
    )


def _gateway(
    project_settings, world: dict, mode: str, name: str = "", **extra: list[str]
) -> EgressGateway:
    return EgressGateway(
        project_settings,
        f"egtest-{SESSION_ID}-{name or mode}",
        _policy(mode, world, **extra),
        extra_labels=TEST_LABELS,
        test_dns_routes={"test": world["resolver"], "test2": None},
        test_networks=[world["network"]],
    )


@pytest.fixture(scope="module")
def sandboxes(docker_engine, project_settings, world):
    """mode -> (gateway, client container), for public and allowlist."""
    made = {}
    try:
        for mode in ("public", "allowlist"):
            presets = ["python"] if mode == "allowlist" else []
            gateway = _gateway(project_settings, world, mode, presets=presets)
            gateway.up()
            made[mode] = (gateway, _client(docker_engine, gateway, world, mode))
        yield made
    finally:
        for gateway, container in made.values():
            container.remove(force=True)
            gateway.down(purge_logs=True)


def _run(container, command: str) -> str:
    result = container.exec_run(["bash", "-c", command], user="1000:1000")
    return result.output.decode("utf-8", "replace")


def _cases(world: dict) -> list[tuple[str, str, str, bool, bool]]:
    """(id, command, marker, reached under public, reached under allowlist)."""
    bridge, hidden, open_port = world["bridge"], world["hidden_port"], world["allowed_port"]
    web10 = world["web10"]
    probe = f"python3 {PROBE_IN_CLIENT}"
    cases = [
        ("http-proxy", f"{CURL} http://allowed.test/", "reached-web10", True, True),
        ("https-proxy", f"{CURL} https://allowed.test/", "reached-web10", True, True),
        ("http-transparent", f"{UNSET} {CURL} http://allowed.test/", "reached-web10", True, True),
        ("https-sni", f"{UNSET} {CURL} https://allowed.test/", "reached-web10", True, True),
        ("wildcard", f"{CURL} https://a.wild.test/", "reached-web10", True, True),
        ("wildcard-sni", f"{UNSET} {CURL} -k https://b.c.wild.test/", "reached-web10", True, True),
        ("deny-wins", f"{CURL} https://bad.wild.test/", "reached-web10", False, False),
        ("deny-sni", f"{UNSET} {CURL} https://bad.wild.test/", "reached-web10", False, False),
        ("deny-http", f"{UNSET} {CURL} http://bad.wild.test/", "reached-web10", False, False),
        ("unlisted", f"{CURL} https://other.test/", "reached-web11", True, False),
        ("unlisted-sni", f"{UNSET} {CURL} https://other.test/", "reached-web11", True, False),
        ("ip-literal", f"{CURL} http://{web10}/", "reached-web10", True, False),
        ("ip-literal-tls", f"{UNSET} {CURL} -k https://{web10}/", "reached-web10", True, False),
        ("public-other-port", f"{probe} tcp {web10} 8080", "reached-web10", True, False),
        ("host-raw-tcp", f"{probe} tcp {bridge} {hidden}", "reached-host-hidden", False, False),
        (
            "host-noproxy",
            f"curl -sS --max-time 6 --noproxy '*' http://{bridge}:{hidden}/",
            "reached-host-hidden",
            False,
            False,
        ),
        (
            "host-via-proxy",
            f"{CURL} http://{bridge}:{hidden}/",
            "reached-host-hidden",
            False,
            False,
        ),
        (
            "host-connect",
            f"{CURL} -k https://{bridge}:{hidden}/",
            "reached-host-hidden",
            False,
            False,
        ),
        (
            "private-allow-proxy",
            f"{CURL} http://{bridge}:{open_port}/",
            "reached-host-allowed",
            True,
            True,
        ),
        (
            "private-allow-l3",
            f"{probe} tcp {bridge} {open_port}",
            "reached-host-allowed",
            True,
            True,
        ),
        (
            "rebind-proxy",
            f"{CURL} http://rebind.test:{hidden}/",
            "reached-host-hidden",
            False,
            False,
        ),
        (
            "rebind-transparent",
            f"{UNSET} {CURL} http://rebind.test:{hidden}/",
            "reached-host-hidden",
            False,
            False,
        ),
        (
            "ipv6-loopback",
            f"{UNSET} {CURL} http://[::1]:{hidden}/",
            "reached-host-hidden",
            False,
            False,
        ),
        (
            "ipv4-mapped",
            f"{UNSET} {CURL} 'http://[::ffff:{bridge}]:{hidden}/'",
            "reached-host-hidden",
            False,
            False,
        ),
        (
            "ipv4-mapped-proxy",
            f"{CURL} 'http://[::ffff:{bridge}]:{hidden}/'",
            "reached-host-hidden",
            False,
            False,
        ),
        (
            "other-resolver-udp",
            f"{probe} dns {world['resolver']} secret.test2 {world['secret']}",
            "reached-other-resolver",
            False,
            False,
        ),
        ("icmp-host", f"{probe} icmp {bridge}", "reached-icmp", False, False),
        ("icmp-public", f"{probe} icmp {web10}", "reached-icmp", False, False),
    ]
    if world["host_other"]:
        other = world["host_other"]
        cases += [
            (
                "host-other-address",
                f"{probe} tcp {other} {hidden}",
                "reached-host-hidden",
                False,
                False,
            ),
            (
                "host-other-by-name",
                f"{CURL} http://hostaddr.test:{hidden}/",
                "reached-host-hidden",
                False,
                False,
            ),
        ]
    return cases


@pytest.mark.parametrize("mode", ["public", "allowlist"])
def test_every_bypass_fails_and_allowed_destinations_work(sandboxes, world, mode):
    container = sandboxes[mode][1]
    wrong = []
    for case_id, command, marker, public, allowlist in _cases(world):
        expected = public if mode == "public" else allowlist
        output = _run(container, command)
        if (marker in output) != expected:
            wanted = "reached" if expected else "refused"
            wrong.append(f"{case_id}: expected {wanted}, got {output.strip()[:160]!r}")
    assert not wrong, "\n".join(wrong)


def test_the_audit_holds_allowed_and_refused_attempts(sandboxes, world):
    gateway, container = sandboxes["allowlist"]
    _run(container, f"{CURL} https://allowed.test/")
    _run(container, f"{CURL} https://other.test/")
    _run(container, f"python3 {PROBE_IN_CLIENT} tcp {world['bridge']} {world['hidden_port']}")
    records: list[dict] = []

    def has(**wanted):
        return any(all(r.get(k) == v for k, v in wanted.items()) for r in records)

    def complete() -> bool:  # the daemons write their logs a moment after the fact
        records[:] = gateway.records()
        return has(address=world["bridge"], port=world["hidden_port"], decision="refused")

    wait_for(complete, seconds=10)
    assert records and all(r["sandbox"] == gateway.sandbox_name for r in records)

    assert has(name="allowed.test", decision="allowed", rule="allow:allowed.test"), records[-10:]
    assert has(name="other.test", decision="refused", rule="not-in-allowlist"), records[-10:]
    assert has(address=world["bridge"], port=world["hidden_port"], decision="refused"), records[
        -10:
    ]
    denied = gateway.records(denied_only=True)
    assert denied and all(r["decision"] == "refused" for r in denied)
    for record in records:
        assert set(record) >= {"time", "source", "name", "address", "port", "decision", "rule"}


# As fast as one process can: new connections (SYNs, never completed) to refused ports of the
# host, and DNS queries for new names under .test (the stand-in resolver's); then what came
# back. Prints: SYNs sent, queries sent, answers got.
FLOOD = r"""
import socket, struct, sys, time
host, seconds = sys.argv[1], float(sys.argv[2])
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.setblocking(False)
syns = queries = answered = 0
def drain():
    global answered
    try:
        while udp.recv(512):
            answered += 1
    except BlockingIOError:
        pass
end = time.monotonic() + seconds
while time.monotonic() < end:
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((host, 9 + syns % 1000))
    s.close()
    syns += 1
    labels = [f"n{queries}", "flood", "test"]
    name = b"".join(bytes([len(p)]) + p.encode() for p in labels) + b"\0"
    udp.sendto(struct.pack("!HHHHHH", queries & 0xFFFF, 0x100, 1, 0, 0, 0) + name
               + struct.pack("!HH", 1, 1), (host, 53))
    queries += 1
    drain()
time.sleep(2)
drain()
print(syns, queries, answered)
"""


def test_a_flood_of_attempts_writes_a_bounded_audit_that_says_so(
    docker_engine, project_settings, world
):
    seconds = 4
    gateway = _gateway(project_settings, world, "public", name="flood")
    gateway.up()
    container = None
    try:
        container = _client(docker_engine, gateway, world, "flood")
        flood = container.exec_run(["python3", "-c", FLOOD, world["bridge"], str(seconds)])
        syns, queries, answered = map(int, flood.output.split())
        bounded = egress_gateway.LOG_BURST + (seconds + 3) * (egress_gateway.LOG_RATE + 1)
        assert syns > 10 * bounded and queries > 10 * egress_gateway.DNS_BURST, (syns, queries)

        def flooded() -> list[dict]:
            return [r for r in gateway.records() if r["address"] == world["bridge"]]

        wait_for(lambda: any(egress_gateway.OVER_RATE in r["rule"] for r in flooded()), seconds=10)
        records = flooded()
        assert all(r["decision"] == "refused" for r in records)
        kinds = collections.Counter((r["via"], r["rule"]) for r in records)
        packets = [r for r in records if r["via"].startswith("packet/")]
        assert len(packets) <= bounded, kinds  # unbounded: one per SYN
        # SYNs to ports 80 and 443 went to the proxy: new connections to it have their rate.
        proxied = egress_gateway.PROXY_BURST + (seconds + 3) * egress_gateway.PROXY_RATE
        assert len(records) - len(packets) <= proxied, kinds
        assert any(egress_gateway.OVER_RATE in r["rule"] for r in records)
        assert (gateway.log_dir / "packets.json").stat().st_size < 1024 * bounded
        # DNS beyond its rate is dropped unanswered, so dnsmasq's log is bounded too.
        dns_bound = egress_gateway.DNS_BURST + (seconds + 3) * egress_gateway.DNS_RATE
        assert answered <= dns_bound, (queries, answered)
        logged = (gateway.log_dir / "dns.log").read_text(errors="replace").count("flood.test")
        assert logged <= 4 * dns_bound, logged
        # Once the flood is over, each attempt is recorded and each query answered again.
        probe = f"python3 {PROBE_IN_CLIENT}"
        _run(container, f"{probe} tcp {world['bridge']} {world['hidden_port']}")
        assert wait_for(
            lambda: any(
                r["port"] == world["hidden_port"] and egress_gateway.OVER_RATE not in r["rule"]
                for r in flooded()
            ),
            seconds=10,
        )
        answer = _run(container, f"{probe} dns {world['bridge']} allowed.test {world['web10']}")
        assert "refused" not in answer, answer
    finally:
        if container is not None:
            container.remove(force=True)
        gateway.down(purge_logs=True)


def test_a_policy_change_is_applied_live(sandboxes, world, project_settings):
    gateway, container = sandboxes["allowlist"]
    before = gateway.policy
    assert "reached-web11" not in _run(container, f"{CURL} https://other.test/")
    note = gateway.apply(_policy("allowlist", world, allow=["other.test"], presets=["python"]))
    try:
        assert "applied live" in note
        assert "reached-web11" in _run(container, f"{CURL} https://other.test/")
        assert "reached-web11" in _run(container, f"{UNSET} {CURL} https://other.test/")
        assert "unchanged" in gateway.apply(gateway.policy)
    finally:
        gateway.apply(before)
    assert "reached-web11" not in _run(container, f"{CURL} https://other.test/")


def test_pip_downloads_a_package_under_an_allowlist_with_the_python_preset(sandboxes):
    container = sandboxes["allowlist"][1]
    output = _run(
        container, "cd /tmp && pip download --no-deps --disable-pip-version-check -d dl six 2>&1"
    )
    assert "Saved" in output or "already" in output.lower(), output[-800:]


def test_up_is_idempotent_and_down_leaves_nothing(docker_engine, project_settings, world):
    gateway = _gateway(project_settings, world, "allowlist", name="updown")
    try:
        gateway.up()
        first = engine.find_container(gateway.container_name).id
        gateway.up()
        assert engine.find_container(gateway.container_name).id == first
        assert "unchanged" in gateway.apply(gateway.policy)
    finally:
        gateway.down(purge_logs=True)
    assert engine.find_container(gateway.container_name) is None
    owned = {"label": [f"{labels.OWNER}={gateway.sandbox_name}"]}
    assert docker_engine.networks.list(filters=owned) == []
    assert docker_engine.containers.list(all=True, filters=owned) == []
    assert not gateway.folder.exists()


def test_modes_without_a_gateway_are_refused(project_settings):
    with pytest.raises(Exception, match=r"no gateway"):
        EgressGateway(project_settings, "x", egress.EgressPolicy("open"))
