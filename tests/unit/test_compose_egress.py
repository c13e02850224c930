"""The compose sandbox's egress override: pure logic (what compose resolved in, keys out)."""

from __future__ import annotations

import pytest

from stigmer_sandbox import config, egress
from stigmer_sandbox.errors import ConfigError
from stigmer_sandbox.host import compose_egress
from stigmer_sandbox.runtime import network
from stigmer_sandbox.runtime.egress_gateway import INHIBIT_IPV4, GatewayPlacement

PLACED = GatewayPlacement("box-egress", "10.231.0.11", "10.231.0.9")
LABELS = {"dev.stigmer.sandbox.managed": "true"}


def resolved(**extra_services: dict) -> dict:
    """What compose resolves for the base file plus the database file (and more services)."""
    return {
        "services": {
            "sandbox": {"networks": {"box-egress": {}, "stigmer-network": None}},
            "database": {"networks": {"stigmer-network": {"aliases": ["db"]}}},
            **extra_services,
        },
        "networks": {
            "box-egress": {"external": True, "name": "box-egress"},
            "stigmer-network": {"labels": LABELS},
        },
    }


def test_the_sandbox_goes_on_the_gateways_network_only_with_its_resolver_and_proxy():
    keys = compose_egress.service_keys(PLACED, ["database"])
    assert keys["networks"] == {"box-egress": {"ipv4_address": "10.231.0.11"}}
    assert keys["dns"] == ["10.231.0.9"]
    environment = keys["environment"]
    assert environment["HTTP_PROXY"] == environment["https_proxy"] == "http://10.231.0.9:3128"
    assert environment["NO_PROXY"].split(",")[-1] == "database"


def test_a_shared_network_is_made_internal_without_a_host_address_and_keeps_its_labels():
    found = compose_egress.network_keys(PLACED, resolved())
    assert found["box-egress"] == {"external": True, "name": "box-egress"}
    shared = found["stigmer-network"]
    assert shared["internal"] is True and shared["driver_opts"] == {INHIBIT_IPV4: "true"}
    assert shared["labels"] == LABELS  # an override replaces the whole definition


def test_the_services_beside_the_sandbox_are_reached_without_the_proxy():
    config = resolved(web={"container_name": "web-1", "networks": ["stigmer-network"]})
    config["services"]["lonely"] = {"networks": ["elsewhere"]}
    names = compose_egress.direct_names(config, advanced=True)
    assert names == ["host.docker.internal", "database", "db", "web", "web-1"]
    assert compose_egress.direct_names(config, advanced=False)[0] == "database"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"services": {"router": {"networks": ["box-egress"]}}}, "'router' joins the sandbox's"),
        (
            {
                "services": {"router": {"networks": ["e"]}},
                "networks": {"e": {"name": "box-egress"}},
            },
            "'router' joins the sandbox's",
        ),
        ({"services": {"sandbox": {"network_mode": "host"}}}, "network_mode 'host'"),
        ({"services": {"spy": {"network_mode": "container:box-egress-gw"}}}, "'spy' joins"),
        ({"networks": {"stigmer-network": {"external": True}}}, "external network"),
    ],
)
def test_a_way_around_the_gateway_is_refused(change, named):
    config = resolved()
    for section, entries in change.items():
        for key, value in entries.items():
            config[section][key] = {**config[section].get(key, {}), **value}
    with pytest.raises(ConfigError, match=named):
        compose_egress.refuse_bypasses(config, "box-egress", "box-egress-gw")


def test_the_projects_own_files_pass():
    compose_egress.refuse_bypasses(resolved(), "box-egress", "box-egress-gw")


def test_advanced_adds_the_host_as_an_allow_entry_only_under_a_gateway(monkeypatch):
    monkeypatch.setattr(compose_egress, "bridge_gateway", lambda: "172.17.0.1")
    settings = config.Settings()
    added = compose_egress.with_policy_entries(settings, advanced=True)
    assert [str(e) for e in network.policy_of(added).allow] == ["172.17.0.1"]
    assert compose_egress.with_policy_entries(settings, advanced=False) == settings
    opened = settings.replace(egress="open")
    assert compose_egress.with_policy_entries(opened, advanced=True) == opened
    decided = network.policy_of(added).decide(None, "172.17.0.1", 3000, ["172.17.0.1"])
    assert decided.allowed  # an explicit allow of the host's address is honoured


def test_notes_name_the_allowed_host_and_unreachable_ports(monkeypatch):
    monkeypatch.setattr(compose_egress, "bridge_gateway", lambda: "172.17.0.1")
    published = {"services": {"sandbox": {"ports": ["3000:3000"]}}}
    notes = compose_egress.notes(config.Settings(), published, advanced=True)
    assert "host.docker.internal (172.17.0.1)" in notes[0] and "--deny 172.17.0.1" in notes[0]
    assert "published ports are not reachable" in notes[1]
    assert compose_egress.notes(config.Settings(), {}, advanced=False) == []


def test_a_policy_read_back_from_a_gateway_is_the_one_written():
    written = egress.EgressPolicy.from_options("allowlist", ["pypi.org"], ["10.0.0.1"], [])
    assert egress.EgressPolicy.from_dict(written.to_dict()).fingerprint() == written.fingerprint()
