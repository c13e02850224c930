"""Egress policies on real sandboxes (issue 22): the default refuses the host, allow and deny
entries hold, a changed policy is applied live and said, eight sandboxes with eight
policies never leak into each other, and every attempt is in the egress audit with the
command that made it.

Traffic goes only to web servers this module runs on the host (bound to 0.0.0.0, reached
through the engine's bridge gateway, as a server on a developer's machine would be) and,
for the install test, to the package index pip is configured with.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import ipaddress
import itertools
import json
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from stigmer_sandbox import config, engine
from stigmer_sandbox.errors import SandboxError
from stigmer_sandbox.images.services import ensure_gateway_image
from stigmer_sandbox.runtime import Sandbox, SandboxPool, network
from stigmer_sandbox.runtime.backends.docker import DockerBackend
from stigmer_sandbox.runtime.egress_gateway import bridge_gateway, subnet_candidates

from ..conftest import ROOT, run_inv
from ..tls_standin import make_certificates
from .conftest import TEST_LABELS, wait_for
from .egress_support import RAW_PROBE, host_servers


@pytest.fixture(scope="module")
def host_ports() -> Iterator[list[int]]:
    """Nine web servers on the host, each answering with its own port."""
    with host_servers(9) as ports:
        yield ports


@pytest.fixture(scope="module")
def host() -> str:
    return bridge_gateway()


def settings_in(tmp: Path, **changes: object) -> config.Settings:
    base = config.load_settings(ROOT, environ={})
    folders = {k: str(tmp / k) for k in ("workspace", "logs", "state_dir")}
    return base.replace(**{**folders, **changes})


def fetch(box: Sandbox, url: str, proxy: bool = True) -> str:
    """The body a curl in the sandbox got, or `refused <code>`."""
    flags = "" if proxy else "--noproxy '*'"
    result = box.exec(f"curl -s -m 6 {flags} -w ' %{{http_code}}' {url}", timeout=30)
    body, _, code = result.stdout.rpartition(" ")
    return body if code == "200" and body.startswith("host-server-") else f"refused {code}"


def raw(box: Sandbox, host: str, port: int) -> str:
    return box.exec(["python3", "-c", RAW_PROBE, host, str(port)], timeout=30).stdout


def test_the_default_sandbox_refuses_the_host_by_every_route_and_audits_it(
    tmp_path, host, host_ports
):
    settings = settings_in(tmp_path)
    assert settings.egress == "public"
    port = host_ports[0]
    with Sandbox.create_ephemeral(settings, extra_labels=TEST_LABELS) as box:
        assert fetch(box, f"http://{host}:{port}/") == "refused 403"
        assert fetch(box, f"http://{host}:{port}/", proxy=False).startswith("refused")
        unset = box.exec(
            f"env -u http_proxy -u HTTP_PROXY curl -s -m 6 http://{host}:{port}/", timeout=30
        )
        assert "host-server" not in unset.stdout
        probe = box.exec(["python3", "-c", RAW_PROBE, host, str(port)], timeout=30)
        assert probe.stdout.startswith("refused")
        mapped = box.exec(f"curl -s -m 6 --noproxy '*' http://[::ffff:{host}]:{port}/", timeout=30)
        assert "host-server" not in mapped.stdout
        records = network.egress_records(box.settings, box.name, denied_only=True)
        mine = [r for r in records if r["port"] == port]
        assert mine and all(r["decision"] == "refused" for r in mine)
        assert probe.command_id in {r["command_id"] for r in mine}


def test_an_allowed_host_port_is_reached_and_a_deny_wins(tmp_path, host, host_ports):
    allowed, other = host_ports[1], host_ports[2]
    settings = settings_in(tmp_path).with_egress(
        "public", allow=[f"{host}:{allowed}", f"{host}:{other}"], deny=[f"{host}:{other}"]
    )
    with Sandbox.create_ephemeral(settings, extra_labels=TEST_LABELS) as box:
        assert fetch(box, f"http://{host}:{allowed}/") == f"host-server-{allowed}"
        assert raw(box, host, allowed).startswith("HTTP/1.0 200")
        assert fetch(box, f"http://{host}:{other}/").startswith("refused")
        assert raw(box, host, other).startswith("refused")
        assert fetch(box, f"http://{host}:{host_ports[3]}/").startswith("refused")


def test_a_changed_policy_is_applied_live_and_said(tmp_path, host, host_ports):
    first, second = host_ports[4], host_ports[5]
    settings = settings_in(tmp_path)
    name = f"stigmer-egress-live-{tmp_path.name[-8:]}"
    box = Sandbox(settings, name=name, extra_labels=TEST_LABELS, allow=[f"{host}:{first}"]).up()
    try:
        assert fetch(box, f"http://{host}:{first}/") == f"host-server-{first}"
        changed = Sandbox(settings, name=name, extra_labels=TEST_LABELS, allow=[f"{host}:{second}"])
        changed.up()
        assert any("applied live" in note for note in changed.notes), changed.notes
        assert changed.status()["id"] == box.status()["id"]  # the same container
        assert fetch(changed, f"http://{host}:{second}/") == f"host-server-{second}"
        assert fetch(changed, f"http://{host}:{first}/").startswith("refused")
    finally:
        box.remove()
    assert engine.find_container(f"{name}-egress-gw") is None  # its gateway went with it


def test_a_mode_change_recreates_the_sandbox_and_takes_its_gateway_away(tmp_path, host, host_ports):
    name = f"stigmer-egress-mode-{tmp_path.name[-8:]}"
    settings = settings_in(tmp_path)
    box = Sandbox(settings, name=name, extra_labels=TEST_LABELS).up()
    try:
        assert engine.find_container(f"{name}-egress-gw") is not None
        opened = Sandbox(settings, name=name, extra_labels=TEST_LABELS, egress="open").up()
        assert any("recreating" in note for note in opened.notes), opened.notes
        assert engine.find_container(f"{name}-egress-gw") is None
        assert not engine.client().networks.list(names=[f"{name}-egress"])
        assert fetch(opened, f"http://{host}:{host_ports[0]}/", proxy=False).startswith(
            "host-server"
        )
        closed = Sandbox(settings, name=name, extra_labels=TEST_LABELS).up()
        assert raw(closed, host, host_ports[0]).startswith("refused")
    finally:
        box.remove()
    assert engine.find_container(f"{name}-egress-gw") is None


def test_eight_sandboxes_with_eight_policies_never_leak(tmp_path, host, host_ports):
    ports = host_ports[:8]

    def start(index: int) -> Sandbox:
        settings = settings_in(tmp_path / str(index))
        allow = [f"{host}:{ports[index]}"]
        return Sandbox.create_ephemeral(settings, extra_labels=TEST_LABELS, allow=allow).up()

    with ThreadPoolExecutor(8) as pool:
        boxes = list(pool.map(start, range(8)))
    try:
        for index, box in enumerate(boxes):
            script = "; ".join(
                f"curl -s -m 4 -o /dev/null -w '{p}:%{{http_code}} ' http://{host}:{p}/"
                for p in ports
            )
            codes = dict(item.split(":") for item in box.exec(script, timeout=120).stdout.split())
            reached = {int(p) for p, code in codes.items() if code == "200"}
            assert reached == {ports[index]}, (index, codes)
    finally:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda box: box.remove(), boxes))


@pytest.fixture
def git_server(tmp_path, host) -> Iterator[tuple[int, str]]:
    """An HTTPS server on the host (0.0.0.0) serving a bare git repository over git's dumb
    HTTP protocol, with a certificate from a throw-away CA: its port and that CA."""
    certificates = tmp_path / "tls"
    certificates.mkdir()
    make_certificates(certificates, [], [host])
    work, served = tmp_path / "work", tmp_path / "www" / "repo.git"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid"]
    subprocess.run([*git, "init", "-q", str(work)], check=True)
    (work / "README").write_text("cloned through the gateway\n")
    subprocess.run([*git, "-C", str(work), "add", "README"], check=True)
    subprocess.run([*git, "-C", str(work), "commit", "-qm", "one"], check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(served)], check=True)
    subprocess.run(["git", "-C", str(served), "update-server-info"], check=True)
    handler = functools.partial(QuietFiles, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates / "cert.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], (certificates / "ca.pem").read_text()
    server.shutdown()


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *_args: object) -> None:
        pass


def test_an_allowlist_with_presets_installs_real_packages_and_clones_an_allowed_host(
    tmp_path, host, git_server
):
    port, ca = git_server
    settings = settings_in(tmp_path).with_egress(
        "allowlist", allow=[f"{host}:{port}"], allow_presets=["python", "node"]
    )
    with Sandbox.create_ephemeral(settings, extra_labels=TEST_LABELS) as box:
        installed = box.exec("pip install -q --no-deps --target /tmp/t six", timeout=300)
        assert installed.exit_code == 0, installed.stderr[-500:]
        assert box.exec("ls /tmp/t", timeout=30).stdout.count("six") >= 1
        npm = "cd /tmp && npm install --no-save --no-audit --no-fund is-number"
        installed = box.exec(npm, timeout=300)
        assert installed.exit_code == 0, installed.stderr[-500:]
        assert box.exec("ls /tmp/node_modules", timeout=30).stdout.split() == ["is-number"]
        box.put_file("ca.pem", ca.encode())
        clone = (
            f"GIT_SSL_CAINFO=/workspace/ca.pem git clone -q https://{host}:{port}/repo.git /tmp/r"
        )
        cloned = box.exec(clone, timeout=120)
        assert cloned.exit_code == 0, cloned.stderr[-500:]
        assert box.exec("cat /tmp/r/README", timeout=30).stdout == "cloned through the gateway\n"


def test_mode_none_leaves_only_loopback(tmp_path):
    settings = settings_in(tmp_path).with_egress("none")
    with Sandbox.create_ephemeral(settings, extra_labels=TEST_LABELS) as box:
        assert box.exec("ls /sys/class/net", timeout=30).stdout.split() == ["lo"]


def test_the_cli_takes_the_flags_and_prints_the_egress_audit(tmp_path, host, host_ports):
    port = host_ports[6]
    env = {
        "INVOKE_STIGMER_CONTAINER_NAME": f"stigmer-egress-cli-{tmp_path.name[-8:]}",
        "INVOKE_STIGMER_WORKSPACE": str(tmp_path / "workspace"),
        "INVOKE_STIGMER_LOGS": str(tmp_path / "logs"),
        "INVOKE_STIGMER_STATE_DIR": str(tmp_path / "state"),
        "INVOKE_STIGMER_RELAY_IDLE_S": "0",
    }
    try:
        done = run_inv(
            "run", "--egress", "allowlist", "--allow", f"{host}:{port}",
            f"curl -s -m 6 http://{host}:{port}/; curl -s -m 6 -o /dev/null -w ' %{{http_code}}' "
            f"http://{host}:{host_ports[7]}/",
            env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"host-server-{port}") and done.stdout.endswith(" 403")
        audit = run_inv("sandbox.egress", "--json", "--denied", env=env)
        records = json.loads(audit.stdout)
        assert records and all(r["decision"] == "refused" for r in records)
        assert any(r["port"] == host_ports[7] and r["command_id"] for r in records)
    finally:
        run_inv("sandbox.down", env=env)


def test_a_fork_and_a_pooled_sandbox_refuse_the_host_like_any_other(tmp_path, host, host_ports):
    """Sandboxes started another way (fork, pool) get their own gateway and the same policy."""
    port = host_ports[8]
    with Sandbox.create_ephemeral(settings_in(tmp_path / "a"), extra_labels=TEST_LABELS) as box:
        fork = box.fork()
        try:
            assert raw(fork, host, port).startswith("refused")
            assert fetch(fork, f"http://{host}:{port}/", proxy=False).startswith("refused")
        finally:
            fork.remove()
    with SandboxPool(
        size=1, settings=settings_in(tmp_path / "b"), extra_labels=TEST_LABELS
    ) as pool:
        pooled = pool.acquire()
        assert raw(pooled, host, port).startswith("refused")
        unset = pooled.exec(f"env -u http_proxy curl -s -m 6 http://{host}:{port}/", timeout=30)
        assert "host-server" not in unset.stdout


class RefusingBackend(DockerBackend):
    """The engine, but the sandbox's own container cannot be created (its gateway can)."""

    def __init__(self, refused: str) -> None:
        self.refused = refused

    def create(self, spec):  # type: ignore[no-untyped-def]
        if spec.get("name") == self.refused:
            raise SandboxError("created nothing, for the test")
        return super().create(spec)


@pytest.mark.parametrize("ephemeral", [True, False])
def test_a_start_that_fails_leaves_no_gateway_or_network(tmp_path, ephemeral):
    """The gateway is made before the sandbox (it fails closed meanwhile); when the
    sandbox's own container then cannot be made, nothing of it may stay behind."""
    settings = settings_in(tmp_path)
    name = f"stigmer-failed-start-{'eph' if ephemeral else 'named'}-{tmp_path.name[-8:]}"
    box = Sandbox(
        settings,
        name=name,
        ephemeral=ephemeral,
        extra_labels=TEST_LABELS,
        backend=RefusingBackend(name),
    )
    with pytest.raises(SandboxError, match="created nothing"):
        box.up()
    client = engine.client()
    assert client.containers.list(all=True, filters={"name": name}) == []
    assert client.networks.list(names=[f"{name}-egress"]) == []


@contextlib.contextmanager
def network_on(subnet: str, name: str) -> Iterator[None]:
    """A network of the test's holding `subnet` (no other network can be made on it)."""
    import docker.types

    ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=subnet)])
    made = engine.client().networks.create(name, ipam=ipam, labels=TEST_LABELS)
    try:
        yield
    finally:
        made.remove()


def test_a_sandbox_whose_first_subnet_is_taken_is_made_again_on_the_next(
    tmp_path, host, host_ports
):
    """The sandbox's container is created while its network is made, for the first subnet
    the network is tried on; when another network holds that one, the container is made
    again for the subnet the network got, and works behind its gateway."""
    settings = settings_in(tmp_path, egress="public")
    name = f"stigmer-subnet-taken-{tmp_path.name[-8:]}"
    first, second = list(itertools.islice(subnet_candidates(name, settings.egress_subnets), 2))
    holder = network_on(first, f"{name}-holder")
    with holder, Sandbox(settings, name=name, ephemeral=True, extra_labels=TEST_LABELS) as box:
        joined = box.find().attrs["NetworkSettings"]["Networks"][f"{name}-egress"]
        assert ipaddress.ip_address(joined["IPAddress"]) in ipaddress.ip_network(second)
        resolver = ipaddress.ip_network(second).network_address + 1
        assert box.exec("echo $HTTPS_PROXY").stdout.strip().startswith(f"http://{resolver}:")
        assert fetch(box, f"http://{host}:{host_ports[0]}/").startswith("refused")
    assert engine.client().containers.list(all=True, filters={"name": name}) == []


@pytest.mark.parametrize("ephemeral", [True, False])
def test_a_network_that_cannot_be_made_leaves_no_container(tmp_path, ephemeral):
    """The sandbox's container, created while its network is made, goes when no subnet of
    the pool is free: the start fails and nothing of the sandbox stays."""
    pool = "10.252.13.0/29"  # a single /29: held by the test's own network
    settings = settings_in(tmp_path, egress="public", egress_subnets=pool)
    name = f"stigmer-no-subnet-{'eph' if ephemeral else 'named'}-{tmp_path.name[-8:]}"
    with network_on(pool, f"{name}-holder"):
        box = Sandbox(settings, name=name, ephemeral=ephemeral, extra_labels=TEST_LABELS)
        with pytest.raises(SandboxError, match="no free"):
            box.up()
    client = engine.client()
    assert client.containers.list(all=True, filters={"name": name}) == []
    assert client.networks.list(names=[f"{name}-egress"]) == []


UDP_FLOOD = (
    "import socket, sys, time\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "end = time.monotonic() + float(sys.argv[3])\n"
    "while time.monotonic() < end:\n"
    "    try:\n"
    "        s.sendto(b'leak', (sys.argv[1], int(sys.argv[2])))\n"
    "    except OSError:\n"
    "        pass\n"
    "    time.sleep(0.0005)\n"
)


class _Receiver:
    """UDP datagrams arriving at a port on the host (0.0.0.0), collected in a thread."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("0.0.0.0", 0))
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.got: list[bytes] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._done.is_set():
            with contextlib.suppress(OSError):
                self.got.append(self.socket.recv(64))

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        self.socket.close()


def test_a_fresh_gateway_joined_at_its_creation_forwards_nothing_before_its_rules(tmp_path, host):
    """A gateway made with a new network joins that network at its creation (one engine
    call fewer on the start's path), so the network is there before its rules are. The
    attack: a container on that network, uid 1000 without capabilities, floods a refused
    host address with UDP from before the gateway starts until after it is ready. Not one
    datagram may reach the host: nothing holds the network's route address until the
    gateway claims it, after its rules. The flood did reach the gateway: its audit has it,
    refused by the rules."""
    receiver = _Receiver()
    settings = settings_in(tmp_path)
    name = f"stigmer-egress-joined-{tmp_path.name[-8:]}"
    gateway = network.gateway_for(
        settings, name, network.policy_of(settings), TEST_LABELS, DockerBackend()
    )
    flooder = None
    try:
        image = ensure_gateway_image(settings)
        prepared = gateway._prepared(image, *gateway._ensure_network())
        assert prepared.joined, "a gateway on a network made now joins it at creation"
        flooder = engine.client().containers.run(
            settings.image,
            [
                "python3",
                "-u",
                "-c",
                "print('flooding')\n" + UDP_FLOOD,
                host,
                str(receiver.port),
                "60",
            ],
            detach=True,
            user="1000:1000",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges:true"],
            labels=TEST_LABELS,
            **gateway.sandbox_options(),
        )
        assert wait_for(lambda: b"flooding" in flooder.logs(), 30), flooder.logs()
        assert prepared.bring_up(60) == "created"
        refused = {"decision": "refused", "via": "packet/udp", "port": receiver.port}
        assert wait_for(lambda: any(refused.items() <= r.items() for r in gateway.records()), 15), (
            gateway.records()[-5:]
        )
        flooder.reload()
        assert flooder.status == "running", "the flood ended before the gateway was ready"
    finally:
        if flooder is not None:
            flooder.remove(force=True)
        gateway.down(purge_logs=True)
        receiver.close()
    assert receiver.got == []


def test_a_gateway_restarted_under_a_flood_forwards_nothing_before_its_rules(tmp_path, host):
    """The attack: a command floods a refused host address with UDP (nothing to proxy,
    only the rules stop it) while the policy changes live three times, each a gateway
    restart. Not one datagram may reach the host: the gateway loads its rules before the
    sandbox's network is connected to it again."""
    receiver = _Receiver()
    settings = settings_in(tmp_path)
    name = f"stigmer-egress-flood-{tmp_path.name[-8:]}"
    box = Sandbox(settings, name=name, extra_labels=TEST_LABELS).up()
    try:
        flood = box.start(["python3", "-c", UDP_FLOOD, host, str(receiver.port), "30"])
        for allowed in range(3):  # each a new policy: the gateway restarts
            changed = Sandbox(
                settings, name=name, extra_labels=TEST_LABELS, allow=[f"10.9.9.{allowed}"]
            ).up()
            assert any("applied live" in note for note in changed.notes), changed.notes
        assert flood.status()["running"], "the flood ended before the restarts did"
        flood.kill()
    finally:
        box.remove()
        receiver.close()
    assert receiver.got == []
