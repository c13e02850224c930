"""Credentials that never enter the sandbox (issue 26), on the real engine: a sandbox using a
secret holds a placeholder; the broker beside its gateway puts the value into requests to
the secret's destinations only, refuses a placeholder sent elsewhere (and audits it),
refuses a destination whose certificate it cannot verify, and takes a rotated value from
the next `up`. The value is searched for in the sandbox's whole filesystem and every
process's environment and command line.

Traffic goes only to HTTPS stand-ins this module runs on the host (0.0.0.0, reached
through the engine's bridge gateway), each with a certificate from a throw-away CA that a
secret's `ca` names; they answer with a hash of the credential they received, never the
credential itself (a destination that echoes a credential back hands it to the sandbox:
see SECURITY.md).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from stigmer_sandbox import config, engine
from stigmer_sandbox.errors import ConfigError
from stigmer_sandbox.runtime import Sandbox, broker, network
from stigmer_sandbox.runtime.egress_gateway import bridge_gateway

from ..conftest import ROOT
from ..tls_standin import make_certificates
from .conftest import TEST_LABELS
from .egress_support import RAW_PROBE, Server

VALUE = "live-credential-" + hashlib.sha256(b"stigmer-broker-test").hexdigest()[:24]
OTHER_VALUE = "other-credential-" + hashlib.sha256(b"stigmer-broker-other").hexdigest()[:24]
ENV = {"STIGMER_TEST_API_TOKEN": VALUE, "STIGMER_TEST_OTHER_TOKEN": OTHER_VALUE}


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Api(http.server.BaseHTTPRequestHandler):
    """`/api` answers 200 only to `Authorization: Bearer <VALUE>`; every path answers with
    hashes of what it received (the Authorization header and X-Token), never the text."""

    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        seen = {
            "authorization": digest(self.headers.get("Authorization", "")),
            "x-token": digest(self.headers.get("X-Token", "")),
            "path": digest(self.path),
        }
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        authorized = self.headers.get("Authorization") == f"Bearer {VALUE}"
        code = 200 if authorized or self.path != "/api" else 401
        body = json.dumps({"authorized": authorized, **seen}).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


class GitFiles(http.server.SimpleHTTPRequestHandler):
    """A bare repository over git's dumb HTTP, only to `Basic <any user>:<VALUE>` (git
    asks without credentials first, then sends those of the URL)."""

    def do_GET(self) -> None:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        try:
            password = base64.b64decode(token).decode().partition(":")[2]
        except ValueError:
            password = ""
        if scheme != "Basic" or password != VALUE:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="stand-in"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture(scope="module")
def host() -> str:
    return bridge_gateway()


@pytest.fixture(scope="module")
def standins(tmp_path_factory, host) -> Iterator[dict[str, object]]:
    """Three HTTPS servers on the host: two with a certificate from the trusted stand-in
    CA (`ca`), one from a CA no one trusts (`untrusted`)."""
    folder = tmp_path_factory.mktemp("broker-tls")
    (folder / "good").mkdir()
    (folder / "bad").mkdir()
    make_certificates(folder / "good", ["localhost"], [host])
    make_certificates(folder / "bad", ["localhost"], [host])
    work, served = folder / "work", folder / "www" / "repo.git"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid"]
    subprocess.run([*git, "init", "-q", str(work)], check=True)
    (work / "README").write_text("cloned through the broker\n")
    subprocess.run([*git, "-C", str(work), "add", "README"], check=True)
    subprocess.run([*git, "-C", str(work), "commit", "-qm", "one"], check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(served)], check=True)
    subprocess.run(["git", "-C", str(served), "update-server-info"], check=True)
    servers = []
    handlers = (Api, Api, Api, functools.partial(GitFiles, directory=str(folder / "www")))
    for cert, handler in zip(("good", "good", "bad", "good"), handlers, strict=True):
        server = Server(("0.0.0.0", 0), handler)
        server.requests = []  # type: ignore[attr-defined]
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(folder / cert / "cert.pem")
        server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    try:
        yield {
            "ca": str(folder / "good" / "ca.pem"),
            "api": servers[0],
            "other": servers[1],
            "untrusted": servers[2],
            "git": servers[3],
        }
    finally:
        for server in servers:
            server.shutdown()


def port_of(server: object) -> int:
    return int(server.server_address[1])  # type: ignore[attr-defined]


def settings_for(tmp: Path, host: str, standins: dict[str, object], **changes: object):
    folders = {k: str(tmp / k) for k in ("workspace", "logs", "state_dir")}
    secrets = {
        "API_TOKEN": {
            "from_env": "STIGMER_TEST_API_TOKEN",
            "hosts": [
                f"{host}:{port_of(standins['api'])}",
                f"{host}:{port_of(standins['untrusted'])}",
            ],
            "header": "Authorization: Bearer {value}",
            "ca": standins["ca"],
        },
        "OTHER_TOKEN": {
            "from_env": "STIGMER_TEST_OTHER_TOKEN",
            "hosts": [f"{host}:{port_of(standins['other'])}"],
            "ca": standins["ca"],
        },
        "GIT_TOKEN": {  # no header: git puts the placeholder in Basic credentials itself
            "from_env": "STIGMER_TEST_API_TOKEN",
            "hosts": [f"{host}:{port_of(standins['git'])}"],
            "ca": standins["ca"],
        },
    }
    base = config.load_settings(ROOT, environ={})
    chosen = {"use_secrets": "API_TOKEN,OTHER_TOKEN,GIT_TOKEN", **changes}
    return base.replace(**folders, secrets=secrets, **chosen)


def get(box: Sandbox, url: str, *headers: str) -> tuple[int, dict]:
    """(status, parsed JSON body or {}) of a curl in the sandbox. A curl that got no HTTP
    answer fails the test at once, saying why: the command's result lost (the sandbox's
    exec path, not its egress), or curl's own error (the proxy or broker did not answer)."""
    flags = " ".join(f'-H "{h}"' for h in headers)  # the shell expands $NAME in them
    result = box.exec(f"curl -sS -m 10 {flags} -w '\\n%{{http_code}}' {url}", timeout=30)
    assert result.exit_code is not None, f"the curl's result was lost: {result.error}"
    body, _, code = result.stdout.rpartition("\n")
    assert int(code or 0), f"no HTTP answer (curl exit {result.exit_code}): {result.stderr}"
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = {"text": body}
    return int(code), parsed


def value_anywhere(box: Sandbox, value: str) -> list[str]:
    """Where `value` is in the sandbox. The image's layers were built before any secret
    existed: what the container changed is its writable layer (read on the host), its
    tmpfs folders and mounts (read inside, as root), and its processes' environments and
    command lines (every /proc/PID, as root)."""
    container = engine.client().containers.get(box.name)
    found = []
    upper = Path(container.attrs["GraphDriver"]["Data"]["UpperDir"])
    for path in upper.rglob("*"):
        if path.is_file() and not path.is_symlink() and value.encode() in path.read_bytes():
            found.append(f"layer:{path.relative_to(upper)}")
    inside = [m["Destination"] for m in container.attrs["Mounts"]]
    inside += list(container.attrs["HostConfig"].get("Tmpfs") or {})
    # A pattern that matches the value without holding it: the search's own command
    # lines must not be what it finds.
    pattern = f"{value[:5]}[{value[5]}]{value[6:]}"
    script = (
        f"timeout 60 grep -rlsE -- '{pattern}' {' '.join(inside)} /dev/shm; "
        f"for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do "
        f"grep -lsaE -- '{pattern}' \"$f\"; done; true"
    )
    out = container.exec_run(["sh", "-c", script], user="0").output.decode()
    found += [line for line in out.splitlines() if line]
    return found


@pytest.fixture
def environment(monkeypatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)


def test_a_secret_reaches_its_api_while_the_sandbox_holds_only_a_placeholder(
    tmp_path, host, standins, environment
):
    settings = settings_for(tmp_path, host, standins)
    api = f"https://{host}:{port_of(standins['api'])}"
    with Sandbox.create_ephemeral(settings, extra_labels=TEST_LABELS) as box:
        held = box.exec('printf %s "$API_TOKEN"').stdout
        assert held.startswith("stigmer-secret-") and held != VALUE
        status, body = get(box, f"{api}/api")
        assert (status, body["authorized"]) == (200, True)
        # The placeholder is replaced wherever the command puts it: a header, the URL.
        status, body = get(box, f"{api}/echo?t=$API_TOKEN", "X-Token: $API_TOKEN")
        assert status == 200
        assert body["x-token"] == digest(VALUE)
        assert body["path"] == digest(f"/echo?t={VALUE}")
        # Python's own TLS stack trusts the broker too (the bundle the image's tools read).
        python = box.exec(
            ["python3", "-c", f"import urllib.request as u; print(u.urlopen('{api}/api').status)"],
            timeout=30,
        )
        assert python.stdout.strip() == "200", python.stderr
        assert value_anywhere(box, VALUE) == []
        assert value_anywhere(box, OTHER_VALUE) == []
    records = network.egress_records(settings, None)
    assert any(r["via"] == "broker" and r["decision"] == "allowed" for r in records)
    assert not any(VALUE in json.dumps(r) for r in records)


def test_a_placeholder_sent_to_another_destination_is_refused_and_audited(
    tmp_path, host, standins, environment
):
    settings = settings_for(tmp_path, host, standins)
    other = f"https://{host}:{port_of(standins['other'])}"
    before = list(standins["other"].requests)  # type: ignore[attr-defined]
    with Sandbox.create_ephemeral(settings, extra_labels=TEST_LABELS) as box:
        status, body = get(box, f"{other}/leak", "X-Token: $API_TOKEN")
        assert status == 403 and "API_TOKEN" in body["text"]
        status, body = get(box, f"{other}/leak?q=$API_TOKEN")
        assert status == 403
        # Its own secret still goes there, substituted.
        status, body = get(box, f"{other}/fine", "X-Token: $OTHER_TOKEN")
        assert (status, body["x-token"]) == (200, digest(OTHER_VALUE))
        # Fronting: a Host header that is not where the connection goes.
        status, _body = get(box, f"{other}/front", "Host: evil.example", "X-Token: $OTHER_TOKEN")
        assert status == 403
        # Around the broker: straight to the server (routed, not proxied) carries only
        # the placeholder, and the broker's own port is not the sandbox's to reach.
        api_port = port_of(standins["api"])
        status, body = get(box, f"--noproxy '*' -k https://{host}:{api_port}/api")
        assert (status, body.get("authorized")) == (401, False)
        gateway = box.exec('printf %s "$HTTPS_PROXY"').stdout.split("//")[1].split(":")[0]
        probe = box.exec(["python3", "-c", RAW_PROBE, gateway, str(broker.PORT)], timeout=30)
        assert probe.stdout.startswith("refused"), probe.stdout
    assert standins["other"].requests[len(before) :] == ["/fine"]  # type: ignore[attr-defined]
    refused = [r for r in network.egress_records(settings, None, denied_only=True)]
    leaks = [r for r in refused if r["via"] == "broker"]
    assert {r["rule"] for r in leaks} == {
        "secret-placeholder:API_TOKEN:header:X-Token",
        "secret-placeholder:API_TOKEN:url",
        "secret-placeholder:unknown:host-mismatch",
    }
    assert all(r["port"] == port_of(standins["other"]) for r in leaks)


def test_an_unverifiable_destination_never_gets_the_secret(tmp_path, host, standins, environment):
    settings = settings_for(tmp_path, host, standins)
    untrusted = f"https://{host}:{port_of(standins['untrusted'])}"
    with Sandbox.create_ephemeral(settings, extra_labels=TEST_LABELS) as box:
        status, _body = get(box, f"{untrusted}/api")
        assert status == 502
    assert standins["untrusted"].requests == []  # type: ignore[attr-defined]


def test_a_rotated_value_holds_from_the_next_up(tmp_path, host, standins, monkeypatch):
    monkeypatch.setenv("STIGMER_TEST_OTHER_TOKEN", OTHER_VALUE)
    monkeypatch.setenv("STIGMER_TEST_API_TOKEN", "first-value")
    settings = settings_for(tmp_path, host, standins)
    api = f"https://{host}:{port_of(standins['api'])}"
    with Sandbox.create_ephemeral(settings, extra_labels=TEST_LABELS) as box:
        assert get(box, f"{api}/api")[0] == 401
        placeholder = box.exec('printf %s "$API_TOKEN"').stdout
        monkeypatch.setenv("STIGMER_TEST_API_TOKEN", VALUE)
        box.up()  # the running sandbox is kept; the broker reads the value again
        assert box.exec('printf %s "$API_TOKEN"').stdout == placeholder
        status, body = get(box, f"{api}/api")
        assert (status, body["authorized"]) == (200, True)


def test_git_clones_over_https_with_a_token_it_never_holds(tmp_path, host, standins, environment):
    settings = settings_for(tmp_path, host, standins)
    url = f"https://x-access-token:$GIT_TOKEN@{host}:{port_of(standins['git'])}/repo.git"
    with Sandbox.create_ephemeral(settings, extra_labels=TEST_LABELS) as box:
        cloned = box.exec(f"git clone -q {url} /workspace/repo && cat /workspace/repo/README")
        assert cloned.stdout == "cloned through the broker\n", cloned.stderr
        remote = box.exec("git -C /workspace/repo remote get-url origin").stdout
        assert "stigmer-secret-" in remote
        assert value_anywhere(box, VALUE) == []


def test_a_source_that_gives_no_value_starts_nothing(tmp_path, host, standins, monkeypatch):
    monkeypatch.delenv("STIGMER_TEST_API_TOKEN", raising=False)
    monkeypatch.setenv("STIGMER_TEST_OTHER_TOKEN", OTHER_VALUE)
    settings = settings_for(tmp_path, host, standins)
    box = Sandbox.create_ephemeral(settings, extra_labels=TEST_LABELS)
    with pytest.raises(ConfigError) as caught:
        box.up()
    assert "secret 'API_TOKEN'" in caught.value.message
    assert "STIGMER_TEST_API_TOKEN, which is not set" in caught.value.message
    client = engine.client()
    assert client.containers.list(all=True, filters={"name": box.name}) == []
    assert client.networks.list(names=[f"{box.name}-egress"]) == []


def test_a_fork_holds_no_value_and_brokers_with_its_own_placeholders(
    tmp_path, host, standins, environment
):
    settings = settings_for(tmp_path, host, standins)
    api = f"https://{host}:{port_of(standins['api'])}"
    with Sandbox.create_ephemeral(settings, extra_labels=TEST_LABELS) as box:
        box.exec("echo work > /workspace/notes")
        with box.fork() as fork:
            mine = box.exec('printf %s "$API_TOKEN"').stdout
            theirs = fork.exec('printf %s "$API_TOKEN"').stdout
            assert theirs.startswith("stigmer-secret-") and theirs != mine
            status, body = get(fork, f"{api}/api")
            assert (status, body["authorized"]) == (200, True)
            # The source's placeholder is not the fork's: its broker refuses it.
            status, _body = get(fork, f"{api}/x", f"X-Token: {mine}")
            assert status == 403
            assert value_anywhere(fork, VALUE) == []
            image = engine.client().images.get(engine.client().containers.get(fork.name).image.id)
            assert VALUE not in json.dumps(image.attrs)


def test_a_pooled_sandbox_brokers_its_secret_holds_no_value_and_passes_the_audit(
    tmp_path, host, standins, environment
):
    from stigmer_sandbox.runtime import SandboxPool, security_audit

    settings = settings_for(tmp_path, host, standins)
    api = f"https://{host}:{port_of(standins['api'])}"
    with SandboxPool(1, settings=settings, extra_labels=TEST_LABELS) as pool:
        box = pool.acquire()
        status, body = get(box, f"{api}/api")
        assert (status, body["authorized"]) == (200, True)
        assert value_anywhere(box, VALUE) == []
        failed = [(r.name, r.detail) for r in security_audit.audit(box) if r.failed]
        assert failed == []
        pool.release(box)
