"""Issue 22, the compose path, on a real engine (Compose v1 here): `inv compose.up` puts the
sandbox behind the same egress gateway as `inv sandbox.up`. The default refuses the host by
every route (the database's network too), the database still answers by name, a changed
policy is applied live, `--advanced`'s host.docker.internal is an allow entry the user sees,
files that would route around the gateway are refused, and `compose.down` removes it all.

Traffic goes only to web servers this module runs on the host and to the package index.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from stigmer_sandbox import engine
from stigmer_sandbox.runtime.egress_gateway import INHIBIT_IPV4, bridge_gateway

from ..conftest import run_inv
from .compose_support import labels_file, sandbox_env, unique_name
from .conftest import TEST_LABELS
from .egress_support import RAW_PROBE, host_servers


@pytest.fixture(scope="module")
def host_ports() -> Iterator[list[int]]:
    with host_servers(4) as ports:
        yield ports


@pytest.fixture(scope="module")
def host() -> str:
    return bridge_gateway()


@pytest.fixture(scope="module")
def gated(tmp_path_factory, docker_engine) -> Iterator[dict[str, str]]:
    """A compose sandbox with the database, under the default policy; downed after."""
    tmp = tmp_path_factory.mktemp("compose-egress")
    env = sandbox_env(tmp, unique_name("stigmer-compose-egress"))
    env["LABELS_FILE"] = str(labels_file(tmp))
    up = up_with(env, "--database")
    assert up.returncode == 0, up.stdout + up.stderr
    yield env
    run_inv("compose.down", "--database", env=env)


def up_with(env: dict[str, str], *flags: str):
    return run_inv("compose.up", *flags, "--file", env["LABELS_FILE"], env=env)


def sh(env: dict[str, str], command: str) -> str:
    done = run_inv("compose.exec", "--database", "--", command, env=env)
    return done.stdout.strip()


def raw(env: dict[str, str], address: str, port: int) -> str:
    script = RAW_PROBE.replace("'", "'\"'\"'")
    return sh(env, f"python3 -c '{script}' {address} {port}")


def curl(env: dict[str, str], url: str, flags: str = "") -> str:
    return sh(env, f"curl -s -m 6 {flags} -o /dev/null -w '%{{http_code}}' {url}")


def test_the_host_is_refused_by_every_route_and_the_database_still_answers(gated, host, host_ports):
    port = host_ports[0]
    assert raw(gated, host, port).startswith("refused")
    assert curl(gated, f"http://{host}:{port}/") == "403"  # the gateway's refusal
    assert curl(gated, f"http://{host}:{port}/", "--noproxy '*'") == "000"
    unset = "env -u HTTP_PROXY -u http_proxy -u HTTPS_PROXY -u https_proxy "
    assert (
        sh(gated, unset + f"curl -s -m 6 -o /dev/null -w '%{{http_code}}' http://{host}:{port}/")
        == "000"
    )
    probe = (
        "for i in $(seq 50); do curl -fsS -o /dev/null -w '%{http_code}' http://database:5432/ "
        "&& exit 0; sleep 0.2; done; exit 1"
    )
    assert sh(gated, probe) == "200"  # by name, without the proxy (NO_PROXY names it)


def test_the_network_shared_with_the_database_has_no_way_to_the_host(gated, host_ports):
    name = gated["INVOKE_STIGMER_CONTAINER_NAME"]
    attrs = engine.client().containers.get(name).attrs
    joined = attrs["NetworkSettings"]["Networks"]
    assert set(joined) == {f"{name}-egress", f"{name}_stigmer-network"}
    shared = engine.client().networks.get(f"{name}_stigmer-network").attrs
    assert shared["Internal"] and shared["Options"][INHIBIT_IPV4] == "true"
    address = shared["IPAM"]["Config"][0]["Gateway"]
    assert raw(gated, address, host_ports[1]).startswith("refused")
    assert curl(gated, f"http://{address}:{host_ports[1]}/", "--noproxy '*'") == "000"


def test_every_refusal_is_in_the_egress_audit_with_its_command(gated, host, host_ports):
    name = gated["INVOKE_STIGMER_CONTAINER_NAME"]
    assert raw(gated, host, host_ports[2]).startswith("refused")
    done = run_inv("sandbox.egress", "--json", "--denied", "--name", name, env=gated)
    records = [r for r in json.loads(done.stdout) if r["port"] == host_ports[2]]
    assert records and all(r["decision"] == "refused" and r["sandbox"] == name for r in records)
    assert any(r["command_id"] for r in records)
    audit = run_inv("sandbox.audit", "--compose", "--json", env=gated)
    checks = {check["name"]: check for check in json.loads(audit.stdout)["checks"]}
    egress = checks["egress: the host, the LAN and metadata refused"]
    assert egress["status"] == "pass" and f"gateway {name}-egress-gw" in egress["detail"]


def test_a_changed_policy_is_applied_live_and_said(gated, host, host_ports):
    port = host_ports[3]
    changed = up_with(gated, "--database", "--allow", f"{host}:{port}")
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert "applied live" in changed.stdout + changed.stderr
    assert raw(gated, host, port).startswith("HTTP/1.0 200")  # an explicit allow, honoured
    assert raw(gated, host, host_ports[0]).startswith("refused")  # that port only
    back = up_with(gated, "--database")
    assert back.returncode == 0 and raw(gated, host, port).startswith("refused")


def test_another_mode_needs_the_shared_network_recreated_and_says_how(gated):
    done = up_with(gated, "--database", "--egress", "open")
    assert done.returncode != 0
    error = done.stderr.strip().splitlines()
    assert error == [error[0]] and "must be recreated" in error[0]
    assert "inv compose.down" in error[0] and "Traceback" not in done.stderr
    name = gated["INVOKE_STIGMER_CONTAINER_NAME"]
    assert engine.find_container(f"{name}-egress-gw") is not None  # the running one's


@pytest.mark.parametrize(
    ("document", "named"),
    [
        (
            {
                "services": {
                    "router": {
                        "image": "stigmer-sandbox-basic:local",
                        "networks": ["e"],
                        "labels": TEST_LABELS,
                    }
                },
                "networks": {"e": {"external": True, "name": "{name}-egress"}},
            },
            "joins the sandbox's egress network",
        ),
        (
            {
                "services": {"sandbox": {"networks": ["outside"]}},
                "networks": {"outside": {"external": True, "name": "bridge"}},
            },
            "external network",
        ),
    ],
)
def test_a_file_that_routes_around_the_gateway_is_refused_before_anything_starts(
    tmp_path, docker_engine, document, named
):
    name = unique_name("stigmer-compose-egress")
    env = sandbox_env(tmp_path, name)
    text = yaml.safe_dump(document).replace("{name}", name)
    extra = tmp_path / "extra.yml"
    extra.write_text(text, encoding="utf-8")
    done = run_inv(
        "compose.up", "--file", str(labels_file(tmp_path)), "--file", str(extra), env=env
    )
    assert done.returncode != 0 and named in done.stderr and "Traceback" not in done.stderr
    assert engine.find_container(name) is None
    assert engine.find_container(f"{name}-egress-gw") is None


def test_advanced_allows_the_host_alias_visibly_and_down_removes_the_gateway(
    tmp_path, docker_engine, host, host_ports
):
    name = unique_name("stigmer-compose-egress")
    env = sandbox_env(tmp_path, name)
    env["LABELS_FILE"] = str(labels_file(tmp_path))
    try:
        up = up_with(env, "--advanced")
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"host.docker.internal ({host}) is allowed for --advanced" in up.stdout + up.stderr
        reached = run_inv(
            "compose.exec", "--advanced", "--",
            f"curl -s -m 6 http://host.docker.internal:{host_ports[0]}/", env=env,
        )  # fmt: skip
        assert reached.stdout.strip() == f"host-server-{host_ports[0]}"
        policy = Path(env["INVOKE_STIGMER_STATE_DIR"]) / "egress" / name / "config" / "policy.json"
        assert json.loads(policy.read_text())["allow"] == [host]
    finally:
        down = run_inv("compose.down", "--advanced", env=env)
    assert down.returncode == 0
    assert engine.find_container(f"{name}-egress-gw") is None
    assert not docker_engine.networks.list(names=[f"{name}-egress"])
    assert policy.exists()  # the egress audit's folder stays
