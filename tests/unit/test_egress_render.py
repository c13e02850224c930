"""The egress gateway's configuration rendered from a policy, and its audit parsed from logs
(runtime/egress_gateway.py; no Docker)."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re

import pytest

from stigmer_sandbox import egress
from stigmer_sandbox.errors import SandboxError, UsageError
from stigmer_sandbox.runtime import egress_gateway as eg

HOSTS = ("127.0.0.1", "172.17.0.1", "192.0.2.2", "198.51.100.1", "fd00::2")


def config(mode: str = "allowlist", allow=(), deny=(), policy=None, **extra) -> eg.GatewayConfig:
    policy = policy or egress.EgressPolicy.from_options(mode, allow=list(allow), deny=list(deny))
    fields = {
        "subnet": "10.231.9.0/29",
        "host_addresses": HOSTS,
        "upstream_dns": ("10.255.255.53",),
        "egress_router": "172.17.0.1",
        "generation": "abc123",
        **extra,
    }
    return eg.GatewayConfig(policy=policy, **fields)


def index(lines: list[str], needle: str) -> int:
    return next(i for i, line in enumerate(lines) if needle in line)


def test_every_file_is_rendered_and_env_names_the_addresses():
    files = eg.render(config())
    assert set(files) == {"gw.nft", "squid.conf", "dnsmasq.conf", "ulogd.conf", "env"}
    env = dict(line.split("=", 1) for line in files["env"].splitlines())
    assert env == {
        "GW_INT_IP": "10.231.9.2",
        "VGW": "10.231.9.1",
        "EGRESS_ROUTER": "172.17.0.1",
        "GENERATION": "abc123",
        "BROKER_PORT": "",
    }


@pytest.mark.parametrize("mode", ["open", "none"])
def test_modes_without_a_gateway_render_nothing(mode):
    with pytest.raises(UsageError, match="no gateway"):
        eg.render(config(mode))


def test_a_setting_that_could_inject_shell_is_refused():
    with pytest.raises(UsageError, match="bad gateway setting"):
        eg.render(config(egress_router="1.2.3.4; rm -rf /"))


def test_refused_ranges_hold_metadata_private_and_host_addresses_once():
    nets = eg.refused_networks(HOSTS)
    texts = {str(n) for n in nets}
    for expected in ("169.254.0.0/16", "10.0.0.0/8", "172.16.0.0/12", "192.0.2.2/32"):
        assert expected in texts
    assert "198.51.100.1/32" in texts and "::ffff:0:0/96" in texts
    # 172.17.0.1 is inside 172.16/12 and 127.0.0.1 inside 127/8: not listed twice
    assert "172.17.0.1/32" not in texts and "127.0.0.1/32" not in texts
    for a in nets:
        assert not any(a != b and a.version == b.version and a.subnet_of(b) for b in nets)


def test_nft_deny_wins_then_unlocks_then_refused_then_allows():
    nft = eg.render(config("public", allow=["10.0.0.5:5432", "0.0.0.0/0"], deny=["1.2.3.4"]))[
        "gw.nft"
    ]
    lines = nft.splitlines()
    order = [
        index(lines, "@deny4 jump log_"),
        index(lines, "@unlock4 jump log_"),
        index(lines, "daddr @refused4 jump log_"),
        index(lines, "@allow4 jump log_"),
        index(lines, "tcp jump log_accept_allowed_public"),
    ]
    assert order == sorted(order)
    assert re.search(r"set deny4 .*1\.2\.3\.4/32 \. 1-65535", nft)
    # wholly inside refused space: opens it; 0.0.0.0/0 does not (checked after refused4)
    assert re.search(r"set unlock4 .*10\.0\.0\.5/32 \. 5432", nft)
    assert re.search(r"set allow4 .*0\.0\.0\.0/0 \. 1-65535", nft)
    assert "169.254.0.0/16" in nft and "192.0.2.2" in nft
    assert "redirect to :53" in nft and "redirect to :3129" in nft and "redirect to :3130" in nft
    # squid's own connections are judged by address too (rebinding)
    assert 'meta skuid "proxy" ip daddr @refused4' in nft


def test_every_logged_verdict_records_at_a_bounded_rate_and_says_when_it_did_not():
    nft = eg.render(config("public", deny=["1.2.3.4"]))["gw.nft"]
    chains = re.findall(r"chain (log_\w+) \{\n(.*?)\n  \}", nft, re.S)
    assert {name for name, _ in chains} >= {
        "log_reject_refused_deny",
        "log_reject_refused_refused_address",
        "log_accept_allowed_public",
    }
    for name, body in chains:
        verdict = name.split("_")[1]
        rules = [line.strip() for line in body.splitlines()]
        assert rules[0].startswith(f"limit rate {eg.LOG_RATE}/second burst {eg.LOG_BURST} packets")
        assert rules[1].startswith("limit rate 1/second") and eg.OVER_RATE in rules[1]
        assert rules[2] == f"counter {verdict}"  # over both rates: the same verdict
        assert all(rule.endswith(verdict) for rule in rules)
    for rule in re.findall(r"^    .*log prefix.*$", nft, re.M):
        assert "limit rate" in rule  # no record is written at the sandbox's own pace
    assert f"th dport 53 limit rate over {eg.DNS_RATE}/second" in nft
    assert f"ct state new limit rate over {eg.PROXY_RATE}/second" in nft


def test_nft_allowlist_has_no_public_rule():
    nft = eg.render(config("allowlist", allow=["example.org"]))["gw.nft"]
    assert "allowed public" not in nft
    assert "refused not-in-allowlist" in nft


def test_squid_deny_entries_come_before_every_allow():
    squid = eg.render(
        config(
            "allowlist",
            allow=["*.example.org", "example.org:8443", "10.0.0.5:5432", "203.0.113.0/24"],
            deny=["bad.example.org", "198.51.100.7"],
        )
    )["squid.conf"]
    lines = squid.splitlines()
    denies = [i for i, line in enumerate(lines) if line.startswith("http_access deny e")]
    allows = [i for i, line in enumerate(lines) if line.startswith("http_access allow e")]
    assert len(denies) == 2 and len(allows) == 4
    assert max(denies) < min(allows)
    refused = index(lines, "http_access deny refused_dst")
    unlock = index(lines, "rule=allow:10.0.0.5:5432")
    acl_name = lines[unlock].split()[1]
    unlock_access = next(
        i for i, line in enumerate(lines) if line.startswith("http_access") and acl_name in line
    )
    assert unlock_access < refused < max(allows)
    assert lines[-1] == "ssl_bump terminate " + lines[-1].split()[-1]
    assert "host_verify_strict on" in lines
    assert index(lines, "ssl_bump terminate") < index(lines, "ssl_bump splice")


def test_squid_entries_become_acls():
    squid = eg.render(
        config("allowlist", allow=["example.org:8443", "*.example.org", "203.0.113.0/24"])
    )["squid.conf"]
    assert re.search(r"acl e\d+d dstdomain -n example\.org$", squid, re.M)
    assert re.search(r"acl e\d+s ssl::server_name example\.org$", squid, re.M)
    assert re.search(r"acl e\d+p port 8443$", squid, re.M)
    assert re.search(r"acl e\d+a dst 203\.0\.113\.0/24$", squid, re.M)
    wildcard = re.search(r"acl e\d+d dstdom_regex -n -i (\S+)$", squid, re.M)
    assert wildcard
    pattern = re.compile(wildcard.group(1))
    assert pattern.search("a.example.org") and pattern.search("a.b.example.org")
    assert not pattern.search("example.org") and not pattern.search("badexample.org")


def test_squid_public_splices_everything_not_denied():
    squid = eg.render(config("public", deny=["bad.example.org"]))["squid.conf"]
    lines = squid.splitlines()
    assert "ssl_bump splice all" in lines
    assert index(lines, "ssl_bump terminate") < index(lines, "ssl_bump splice all")
    assert "host_verify_strict on" not in lines
    assert re.search(r"^http_access allow r\d+$", squid, re.M)


def test_dnsmasq_forwards_only_listed_names_under_allowlist():
    conf = eg.render(config("allowlist", allow=["*.example.org", "pypi.example", "10.0.0.5"]))[
        "dnsmasq.conf"
    ]
    assert "server=/example.org/10.255.255.53" in conf
    assert "server=/pypi.example/10.255.255.53" in conf
    assert "server=10.255.255.53" not in conf.splitlines()
    assert "no-resolv" in conf


def test_dnsmasq_forwards_everything_under_public_and_honours_test_routes():
    conf = eg.render(config("public", test_dns_routes=(("test", "198.18.99.53"), ("test2", None))))[
        "dnsmasq.conf"
    ]
    lines = conf.splitlines()
    assert "server=10.255.255.53" in lines
    assert "server=/test/198.18.99.53" in lines and "address=/test2/" in lines


def test_allowlisted_names_under_a_test_route_use_the_stand_in_resolver():
    conf = eg.render(
        config("allowlist", allow=["allowed.test"], test_dns_routes=(("test", "198.18.99.53"),))
    )["dnsmasq.conf"]
    assert "server=/allowed.test/" not in conf


def test_subnet_candidates_are_29s_of_the_pool_starting_by_name():
    first = list(eg.subnet_candidates("a", "10.231.0.0/24"))
    assert len(first) == 32 and len(set(first)) == 32
    assert all(ipaddress.IPv4Network(s).prefixlen == 29 for s in first)
    assert list(eg.subnet_candidates("a", "10.231.0.0/24")) == first
    with pytest.raises(UsageError, match="smaller"):
        list(eg.subnet_candidates("a", "10.231.0.0/30"))


def test_upstream_resolvers_skip_loopback_and_need_one(tmp_path):
    loopback = tmp_path / "a.conf"
    loopback.write_text("nameserver 127.0.0.53\noptions edns0\n")
    real = tmp_path / "b.conf"
    real.write_text("# x\nnameserver 10.0.0.2\nnameserver fe80::1\nnameserver 10.0.0.2\n")
    assert eg.upstream_resolvers([str(loopback), str(real)]) == ("10.0.0.2",)
    with pytest.raises(SandboxError, match="no resolver"):
        eg.upstream_resolvers([str(loopback), str(tmp_path / "missing")])


def write_logs(folder, squid: list[str], packets: list[dict], dns: list[str]) -> None:
    logs = folder / "logs"
    logs.mkdir()
    (folder / "config").mkdir()
    (folder / "config" / "env").write_text("VGW=10.231.2.1\n")
    (logs / "access.log").write_text("".join(line + "\n" for line in squid))
    (logs / "packets.json").write_text("".join(json.dumps(p) + "\n" for p in packets))
    (logs / "dns.log").write_text("".join(line + "\n" for line in dns))


def packet(dest: str, port: int, prefix: str, sec: int = 1796614439) -> dict:
    return {
        "oob.prefix": prefix,
        "oob.time.sec": sec,
        "oob.time.usec": 0,
        "ip.protocol": 6,
        "src_ip": "10.231.2.3",
        "src_port": 40000,
        "dest_ip": dest,
        "dest_port": port,
    }


def test_records_merge_proxy_packet_and_dns_logs(tmp_path):
    write_logs(
        tmp_path,
        squid=[
            "1796614437.547 10.231.2.3 GET http://allowed.test/index.html sni=- "
            "dst=198.51.100.10:80 orig=10.231.2.1:3128 TCP_MISS/200 rule=allow:allowed.test",
            "1796614438.710 10.231.2.3 CONNECT other.test:443 sni=- dst=-:- "
            "orig=10.231.2.1:3128 TCP_DENIED/403 rule=not-in-allowlist",
            "1796614438.808 10.231.2.3 CONNECT 198.51.100.11:443 sni=other.test dst=-:- "
            "orig=198.51.100.11:443 NONE_NONE/000 rule=sni-check,not-in-allowlist",
            "1796614438.900 10.231.2.3 CONNECT 198.51.100.10:443 sni=allowed.test dst=-:- "
            "orig=198.51.100.10:443 NONE_NONE/000 rule=sni-check",
            "1796614438.958 10.231.2.3 CONNECT allowed.test:443 sni=allowed.test "
            "dst=198.51.100.10:443 orig=198.51.100.10:443 TCP_TUNNEL/500 rule=allow:allowed.test",
            "1796614442.020 10.231.2.3 CONNECT 172.17.0.1:443 sni=rebind.test dst=-:- "
            "orig=172.17.0.1:443 TCP_DENIED/000 rule=refused-address",
            "1796614442.021 10.231.2.3 GET https://rebind.test/index.html sni=rebind.test "
            "dst=-:- orig=172.17.0.1:443 NONE_NONE/403 rule=-",
            "1796614187.664 127.0.0.1 - error:transaction-end-before-headers sni=- dst=-:- "
            "orig=127.0.0.1:3128 NONE_NONE/000 rule=-",
        ],
        packets=[
            packet("172.17.0.1", 18080, "refused refused-address "),
            packet("172.17.0.1", 18080, "refused refused-address "),  # a retransmitted SYN
            packet("198.51.100.10", 8080, "allowed public "),
        ],
        dns=[
            "Dec  7 03:33:57 dnsmasq[20]: 3 10.231.2.3/49851 query[A] www.site.test from "
            "10.231.2.3",
            "Dec  7 03:33:57 dnsmasq[20]: 3 10.231.2.3/49851 reply www.site.test is 198.51.100.10",
            "Dec  7 03:33:58 dnsmasq[20]: 4 10.231.2.3/4985 query[A] secret.example from "
            "10.231.2.3",
            "Dec  7 03:33:58 dnsmasq[20]: 4 10.231.2.3/4985 config error is REFUSED (EDE: not "
            "ready)",
        ],
    )
    records = eg.read_records(tmp_path / "logs", "sb-1", year=2026)
    assert all(r["sandbox"] == "sb-1" and r["source"] == "10.231.2.3" for r in records)
    times = [r["time"] for r in records]
    assert times == sorted(times)
    by = {(r["via"], r["name"], r["address"], r["port"]): r for r in records}
    allowed = by[("proxy", "allowed.test", "198.51.100.10", 80)]
    assert (allowed["decision"], allowed["rule"]) == ("allowed", "allow:allowed.test")
    assert by[("proxy", "other.test", None, 443)]["decision"] == "refused"
    sni = by[("intercepted", "other.test", "198.51.100.11", 443)]
    assert (sni["decision"], sni["rule"]) == ("refused", "not-in-allowlist")
    tunnel = by[("intercepted", "allowed.test", "198.51.100.10", 443)]
    assert tunnel["decision"] == "allowed"
    rebind = by[("intercepted", "rebind.test", "172.17.0.1", 443)]
    assert (rebind["decision"], rebind["rule"]) == ("refused", "refused-address")
    host = [r for r in records if r["via"] == "packet/tcp" and r["port"] == 18080]
    assert len(host) == 1 and host[0]["rule"] == "refused-address"
    named = by[("packet/tcp", "www.site.test", "198.51.100.10", 8080)]
    assert named["decision"] == "allowed" and named["rule"] == "public"
    lookup = by[("dns", "secret.example", None, 53)]
    assert lookup["decision"] == "refused"
    assert len(records) == 8
    denied = eg.read_records(tmp_path / "logs", "sb-1", denied_only=True, year=2026)
    assert {r["decision"] for r in denied} == {"refused"} and len(denied) == 5


def test_records_read_only_the_newest_part_of_a_big_log(tmp_path, monkeypatch):
    line = (
        "1796614437.547 10.231.2.3 GET http://allowed.test/ sni=- dst=198.51.100.10:80 "
        "orig=10.231.2.1:3128 TCP_MISS/200 rule=allow:allowed.test"
    )
    write_logs(tmp_path, squid=[line] * 2000, packets=[], dns=[])
    monkeypatch.setattr(eg, "AUDIT_TAIL_BYTES", 10 * (len(line) + 1) + 5)
    records = eg.read_records(tmp_path / "logs", "sb", year=2026)
    assert len(records) == 10  # the cut first line dropped, never a half record


def test_records_of_missing_logs_are_empty(tmp_path):
    assert eg.read_records(tmp_path / "nothing", "sb") == []


def test_a_secrets_destinations_go_through_the_broker_and_nothing_else_does():
    policy = egress.EgressPolicy.from_options("public", allow=["api.example.com", "10.9.0.1:8443"])
    policy = dataclasses.replace(policy, brokered=("api.example.com", "10.9.0.1:8443"))
    files = eg.render(config(policy=policy, broker_uid=1000))
    squid = files["squid.conf"].splitlines()
    assert f"cache_peer 127.0.0.1 parent {eg.BROKER_PORT} 0" in squid[index(squid, "cache_peer ")]
    routed = [line for line in squid if line.startswith(("cache_peer_access", "never_direct"))]
    assert len(routed) == 2 * 3 + 1  # a name: destination and SNI; an address: destination
    assert routed[-1] == "cache_peer_access broker deny all"
    nft = files["gw.nft"]
    assert "meta skuid 1000 ip daddr @refused4 jump log_reject_refused_refused_address" in nft
    assert "BROKER_PORT=3180" in files["env"]
    without = eg.render(config(mode="public"))
    assert "cache_peer" not in without["squid.conf"] and "skuid 1000" not in without["gw.nft"]
