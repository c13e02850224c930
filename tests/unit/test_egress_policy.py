"""The egress policy model (stigmer_sandbox/egress.py, docs/egress.md): entry grammar,
refused ranges, decisions, presets, settings keys, and properties checked by Hypothesis."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stigmer_sandbox import config, egress
from stigmer_sandbox.egress import EgressPolicy, PresetContext, decide, parse_entry
from stigmer_sandbox.errors import ConfigError, UsageError

PROPERTY = settings(max_examples=200, deadline=None)
# A public address (documentation ranges are not refused: they stand in for the internet).
PUBLIC_V4 = "203.0.113.7"
PUBLIC_V6 = "2001:db8::7"


def allowed(policy: EgressPolicy, name: str | None, address: str, port: int = 443, **kw) -> bool:
    return decide(policy, name, address, port, **kw).allowed


# --------------------------------------------------------------------------- entry grammar


@pytest.mark.parametrize(
    ("text", "canonical", "kind"),
    [
        ("pkg.example", "pkg.example", "name"),
        ("Pkg.Example", "pkg.example", "name"),
        ("pkg.example.", "pkg.example", "name"),  # the absolute form is the same host
        ("pkg.example:443", "pkg.example:443", "name"),
        ("pkg.example.:443", "pkg.example:443", "name"),
        ("*.registry.example", "*.registry.example", "wildcard"),
        ("*.REGISTRY.example:443", "*.registry.example:443", "wildcard"),
        ("db", "db", "name"),  # a container or compose service name
        ("my_service_1", "my_service_1", "name"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example", "name"),
        ("10.0.0.5", "10.0.0.5", "network"),
        ("10.0.0.5:5432", "10.0.0.5:5432", "network"),
        ("10.0.0.0/8", "10.0.0.0/8", "network"),
        ("10.0.0.0/8:5432", "10.0.0.0/8:5432", "network"),
        ("10.0.0.5/32", "10.0.0.5", "network"),
        ("0.0.0.0/0", "0.0.0.0/0", "network"),
        ("::1", "::1", "network"),
        ("[::1]:443", "[::1]:443", "network"),
        ("[::1]", "::1", "network"),
        ("FC00::/7", "fc00::/7", "network"),
        ("[fc00::/7]:443", "[fc00::/7]:443", "network"),
        ("2001:0db8:0000::0001", "2001:db8::1", "network"),
        ("::ffff:10.0.0.5", "10.0.0.5", "network"),  # IPv4-mapped is the IPv4 host
        ("[::ffff:a00:0/104]:80", "10.0.0.0/8:80", "network"),
        ("example.org:65535", "example.org:65535", "name"),
        ("example.org:1", "example.org:1", "name"),
    ],
)
def test_entries_parse_to_their_canonical_form(text, canonical, kind):
    entry = parse_entry(text)
    assert (str(entry), entry.kind) == (canonical, kind)
    assert parse_entry(str(entry)) == entry


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("http://x", "a URL"),
        ("https://pkg.example/simple", "a URL"),
        ("HTTP://x", "a URL"),
        ("http:x", "a URL"),
        ("999.1.1.1/40", "not a valid IP CIDR"),
        ("999.1.1.1", "not a valid IPv4 address"),
        ("1.2.3", "not a valid IPv4 address"),
        ("127.1", "not a valid IPv4 address"),
        ("2130706433", "not a valid IPv4 address"),
        ("0x7f000001", "not a valid IPv4 address"),
        ("010.0.0.1", "not a valid IPv4 address"),
        ("10.0.0.1/8", "host bits set (did you mean 10.0.0.0/8?)"),
        ("10.0.0.0/08", "prefix must be a number"),
        ("10.0.0.0/255.0.0.0", "prefix must be a number"),
        ("10.0.0.0/", "prefix must be a number"),
        ("*", "'*' alone"),
        ("", "empty"),
        ("a..b", "empty label"),
        (".a", "empty label"),
        ("a.", None),  # accepted: see the good list
        ("..", "empty label"),
        (".", "empty name"),
        ("example.org:0", "port 0 is out of range"),
        ("example.org:70000", "port 70000 is out of range"),
        ("example.org:", "port must be a number"),
        ("example.org:-1", "port must be a number"),
        ("example.org:443x", "port must be a number"),
        ("example.org:1:2", "not a valid IP address"),
        ("example.org:٤٤٣", "port must be a number"),  # Arabic-Indic digits
        ("*.", "empty name"),
        ("*.*.x", "only be the whole first label"),
        ("a.*.b", "only be the whole first label"),
        ("*x.example.org", "only be the whole first label"),
        ("x*.example.org", "only be the whole first label"),
        ("*.org", "whole top-level domain"),
        ("*.org.", "whole top-level domain"),
        (" pkg.example", "whitespace"),
        ("pkg.example ", "whitespace"),
        ("pk g.example", "whitespace"),
        ("pkg.example\n", "whitespace"),
        ("pkg\0.example", "control characters"),
        ("user@pkg.example", "user part"),
        ("bücher.example", "non-ASCII name"),
        ("-a.example", "characters a host name cannot have"),
        ("a-.example", "characters a host name cannot have"),
        ("a!.example", "characters a host name cannot have"),
        ("pkg.example/simple", "a path is not a host"),
        ("999.1.1.1/8", "not a valid IP CIDR (999.1.1.1/8)"),
        ("a.example/8", "a path is not a host"),
        ("a" * 64 + ".example", "at most 63"),
        (".".join(["a" * 50] * 5), "at most 253"),
        ("x" * 400, "longer than 300"),
        ("[::1", "missing ']'"),
        ("[::1]x", "only ':PORT'"),
        ("[10.0.0.1]:80", "brackets are for IPv6"),
        ("[::1]:0", "port 0 is out of range"),
        ("fe80::1%eth0", "zone"),
        ("::1::2", "not a valid IP address"),
        ("fc00::1/7", "host bits set (did you mean fc00::/7?)"),
        ("fc00::/129", "not a valid IP CIDR"),
    ],
)
def test_bad_entries_are_one_line_errors_naming_the_entry(text, why):
    if why is None:
        parse_entry(text)
        return
    with pytest.raises(UsageError) as caught:
        parse_entry(text)
    message = caught.value.message
    assert "\n" not in message
    assert message.startswith(f"bad egress entry {text[:79]!r}"[:40])
    assert why in message


def test_a_long_bad_entry_is_cut_in_its_error_line():
    with pytest.raises(UsageError) as caught:
        parse_entry("x" * 400)
    assert len(caught.value.message) < 200


def test_an_entry_that_is_not_text_is_refused():
    with pytest.raises(UsageError, match="must be text"):
        parse_entry(443)  # type: ignore[arg-type]


def test_split_entries_strips_and_drops_blanks_and_repeats():
    assert egress.split_entries(" a.org, b.org,,a.org ,") == ["a.org", "b.org"]
    assert egress.split_entries("") == []


def test_entry_problem_names_the_first_bad_entry_of_a_list():
    assert egress.entry_problem("pkg.example, 10.0.0.0/8") is None
    assert "'http://x'" in str(egress.entry_problem("pkg.example, http://x, *"))


# --------------------------------------------------------------------------- name matching


@pytest.mark.parametrize(
    ("entry", "name", "matches"),
    [
        ("*.example.com", "sub.example.com", True),
        ("*.example.com", "a.b.example.com", True),  # any depth: a deny must not be dodged
        ("*.example.com", "SUB.Example.COM.", True),
        ("*.example.com", "example.com", False),  # the apex is its own entry
        ("*.example.com", "badexample.com", False),
        ("*.example.com", "example.com.evil.org", False),
        ("*.example.com", "sub.example.com\0.evil.org", False),
        ("example.com", "example.com", True),
        ("example.com", "Example.Com.", True),
        ("example.com", "sub.example.com", False),
        ("example.com", "badexample.com", False),
        ("example.com", "example.co", False),
    ],
)
def test_wildcards_cover_subdomains_only(entry, name, matches):
    policy = EgressPolicy("allowlist", allow=(parse_entry(entry),))
    assert allowed(policy, name, PUBLIC_V4) is matches


@pytest.mark.parametrize(
    ("entry", "port", "matches"),
    [
        ("example.com:443", 443, True),
        ("example.com:443", 80, False),
        ("example.com:443", None, False),
        ("example.com", 80, True),
        ("example.com", None, True),
        ("*.example.com:8443", 8443, True),
        ("*.example.com:8443", 443, False),
    ],
)
def test_ports_restrict_an_entry(entry, port, matches):
    policy = EgressPolicy("allowlist", allow=(parse_entry(entry),))
    assert (
        decide(
            policy, "www.example.com" if "*" in entry else "example.com", PUBLIC_V4, port
        ).allowed
        is matches
    )


def test_a_name_that_is_an_ip_literal_or_invalid_matches_no_name_entry():
    policy = EgressPolicy("allowlist", allow=(parse_entry("example.com"),))
    assert not allowed(policy, "203.0.113.7", PUBLIC_V4)
    assert not allowed(policy, "exa mple.com", PUBLIC_V4)
    assert not allowed(policy, "bücher.example", PUBLIC_V4)
    assert egress.normalise_name("Example.COM.") == "example.com"
    assert egress.normalise_name("::1") is None
    assert egress.normalise_name(None) is None


# --------------------------------------------------------------------------- modes and order


def test_default_mode_is_public():
    assert EgressPolicy().mode == "public"
    assert config.Settings().egress == "public"


def test_unknown_mode_is_refused():
    with pytest.raises(UsageError, match="unknown egress mode 'closed'"):
        EgressPolicy("closed")


def test_public_allows_public_addresses_and_refuses_private_ones():
    policy = EgressPolicy()
    assert allowed(policy, "example.org", PUBLIC_V4)
    assert allowed(policy, None, PUBLIC_V6)
    refused = ["127.0.0.1", "10.1.2.3", "172.17.0.1", "192.168.1.1", "169.254.169.254",
               "100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255",
               "::1", "::", "fd00::1", "fe80::1", "ff02::1", "fec0::1", "64:ff9b:1::1"]  # fmt: skip
    for address in refused:
        decision = decide(policy, None, address, 80)
        assert not decision.allowed, address
        assert decision.rule.startswith("refused "), decision


def test_the_rule_and_reason_name_the_range():
    decision = decide(EgressPolicy(), "metadata.example", "169.254.169.254", 80)
    assert decision == egress.Decision(
        False,
        "refused 169.254.0.0/16",
        "metadata.example (169.254.169.254:80): 169.254.169.254 is in 169.254.0.0/16 "
        "(link-local: cloud instance metadata), refused unless an allow entry names it",
    )


def test_allowlist_passes_only_listed_entries():
    policy = EgressPolicy.from_options(
        "allowlist", allow=["pkg.example", "*.registry.example", "198.51.100.0/24"]
    )
    assert allowed(policy, "pkg.example", PUBLIC_V4)
    assert allowed(policy, "npm.registry.example", PUBLIC_V4)
    assert allowed(policy, None, "198.51.100.9")
    decision = decide(policy, "example.org", PUBLIC_V4, 443)
    assert (decision.allowed, decision.rule) == (False, "not in allowlist")
    # The IP literal of an allowed name is not the name.
    assert not allowed(policy, None, PUBLIC_V4)


def test_open_allows_everything_but_deny_entries():
    policy = EgressPolicy.from_options("open", deny=["10.0.0.0/8", "evil.example"])
    assert allowed(policy, None, "127.0.0.1")
    assert allowed(policy, None, "169.254.169.254")
    assert not allowed(policy, None, "10.9.9.9")
    assert not allowed(policy, "evil.example", PUBLIC_V4)
    assert decide(policy, None, PUBLIC_V4, 1).rule == "mode open"


def test_none_refuses_everything():
    policy = EgressPolicy.from_options("none", allow=["203.0.113.7", "10.0.0.0/8"])
    for address in [PUBLIC_V4, PUBLIC_V6, "10.0.0.1", "127.0.0.1"]:
        assert decide(policy, None, address, 443) == egress.Decision(
            False, "mode none", "egress mode none: no network"
        )


def test_deny_wins_over_allow_in_every_mode():
    for mode in ("public", "allowlist", "open"):
        policy = EgressPolicy.from_options(
            mode, allow=["pkg.example", "10.0.0.5"], deny=["pkg.example", "10.0.0.0/8"]
        )
        decision = decide(policy, "pkg.example", PUBLIC_V4, 443)
        assert (decision.allowed, decision.rule) == (False, "deny pkg.example"), mode
        assert decide(policy, None, "10.0.0.5", 443).rule == "deny 10.0.0.0/8", mode


def test_deny_by_address_covers_the_ipv6_forms_of_an_ipv4_address():
    policy = EgressPolicy.from_options("open", deny=["198.51.100.7"])
    for form in ["::ffff:198.51.100.7", "64:ff9b::c633:6407", "2002:c633:6407::1", "::c633:6407"]:
        assert not allowed(policy, None, form), form


def test_an_explicit_allow_of_a_private_address_is_honoured_in_public_and_allowlist():
    for mode in ("public", "allowlist"):
        policy = EgressPolicy.from_options(mode, allow=["172.17.0.1:5432", "192.168.0.0/16"])
        assert allowed(policy, None, "172.17.0.1", 5432), mode
        assert not allowed(policy, None, "172.17.0.1", 22), mode
        assert allowed(policy, "nas.lan", "192.168.1.20", 445), mode
        assert allowed(policy, None, "::ffff:192.168.1.20", 445), mode  # the same host


def test_a_broad_allow_does_not_open_refused_ranges():
    # 0.0.0.0/0 means "any address" to its writer, not "the metadata service too".
    policy = EgressPolicy.from_options("allowlist", allow=["0.0.0.0/0", "::/0", "172.0.0.0/8"])
    assert allowed(policy, None, PUBLIC_V4)
    assert allowed(policy, None, PUBLIC_V6)
    assert not allowed(policy, None, "169.254.169.254")
    assert not allowed(policy, None, "172.17.0.1")
    assert not allowed(policy, None, "::1")


def test_an_allowed_name_resolving_to_a_refused_address_is_refused_by_the_address():
    for mode in ("public", "allowlist"):
        policy = EgressPolicy.from_options(mode, allow=["pkg.example", "*.example.org"])
        decision = decide(policy, "pkg.example", "127.0.0.1", 443)
        assert (decision.allowed, decision.rule) == (False, "refused 127.0.0.0/8"), mode
        assert not allowed(policy, "x.example.org", "169.254.169.254"), mode
        assert not allowed(policy, "x.example.org", "::ffff:169.254.169.254"), mode


def test_rebinding_to_an_explicitly_allowed_address_is_allowed():
    policy = EgressPolicy.from_options("allowlist", allow=["db.internal", "10.0.0.5"])
    assert allowed(policy, "db.internal", "10.0.0.5", 5432)
    assert not allowed(policy, "db.internal", "10.0.0.6", 5432)


def test_host_addresses_and_gateways_are_refused_unless_allowed():
    hosts = ["198.51.100.1", "172.17.0.1", "2001:db8::1", "203.0.113.0/28"]
    policy = EgressPolicy()
    decision = decide(policy, None, "198.51.100.1", 80, host_addresses=hosts)
    assert (decision.allowed, decision.rule) == (False, "refused 198.51.100.1")
    assert "this host's own address or a bridge gateway" in decision.reason
    assert not allowed(policy, None, "2001:db8::1", host_addresses=hosts)
    assert not allowed(policy, None, "203.0.113.9", host_addresses=hosts)
    assert not allowed(policy, None, "::ffff:198.51.100.1", host_addresses=hosts)
    assert allowed(policy, None, "198.51.100.2", host_addresses=hosts)
    opened = EgressPolicy.from_options("public", allow=["198.51.100.1:8080"])
    assert allowed(opened, None, "198.51.100.1", 8080, host_addresses=hosts)
    # A public range that merely contains the host's address does not open it.
    broad = EgressPolicy.from_options("allowlist", allow=["198.51.100.0/24"])
    assert not allowed(broad, None, "198.51.100.1", host_addresses=hosts)
    assert allowed(broad, None, "198.51.100.2", host_addresses=hosts)
    # `open` is today's behaviour: the host is reachable.
    assert allowed(EgressPolicy("open"), None, "198.51.100.1", host_addresses=hosts)


def test_a_bad_host_address_is_a_usage_error():
    with pytest.raises(UsageError, match="bad host address 'gateway'"):
        decide(EgressPolicy(), None, PUBLIC_V4, 80, host_addresses=["gateway"])


def test_an_invalid_destination_address_is_refused_not_raised():
    decision = decide(EgressPolicy("open"), "x.org", "not-an-ip", 80)
    assert (decision.allowed, decision.rule) == (False, "invalid destination")


@pytest.mark.parametrize(
    ("address", "form"),
    [
        ("::ffff:169.254.169.254", "IPv4-mapped"),
        ("::ffff:0:a9fe:a9fe", "IPv4-translated"),
        ("::a9fe:a9fe", "IPv4-compatible"),
        ("64:ff9b::a9fe:a9fe", "NAT64"),
        ("2002:a9fe:a9fe::1", "6to4"),
        ("2001:0:4136:e378:8000:63bf:5601:5601", "Teredo client"),  # client 169.254.169.254 xor
    ],
)
def test_ipv6_forms_of_a_refused_ipv4_address_are_refused(address, form):
    decision = decide(EgressPolicy(), None, address, 80)
    assert not decision.allowed
    assert decision.rule == "refused 169.254.0.0/16"
    assert form in decision.reason


def test_ipv6_forms_of_a_public_ipv4_address_are_allowed_under_public():
    for address in ["::ffff:203.0.113.7", "64:ff9b::cb00:7107", "2002:cb00:7107::1"]:
        assert allowed(EgressPolicy(), None, address), address


# --------------------------------------------------------------------------- the policy value


def test_policy_normalises_orders_and_deduplicates_entries():
    one = EgressPolicy.from_options(
        "allowlist", allow=["B.org, a.org", "a.org."], deny=["10.0.0.0/8"]
    )
    two = EgressPolicy.from_options("allowlist", allow=["a.org", "b.org"], deny=["10.0.0.0/8"])
    assert one == two
    assert one.to_dict() == {
        "mode": "allowlist",
        "allow": ["a.org", "b.org"],
        "deny": ["10.0.0.0/8"],
        "presets": [],
    }
    assert one.fingerprint() == two.fingerprint()
    assert len(one.fingerprint()) == 16


def test_fingerprint_changes_with_what_decides_and_only_with_that():
    base = EgressPolicy.from_options("allowlist", allow=["a.org"])
    prints = {
        base.fingerprint(),
        EgressPolicy.from_options("public", allow=["a.org"]).fingerprint(),
        EgressPolicy.from_options("allowlist", allow=["a.org:443"]).fingerprint(),
        EgressPolicy.from_options("allowlist", allow=["a.org"], deny=["b.org"]).fingerprint(),
    }
    assert len(prints) == 4
    # Entries that cannot decide anything do not change it.
    none = EgressPolicy("none")
    assert (
        EgressPolicy.from_options("none", allow=["a.org"], deny=["b.org"]).fingerprint()
        == none.fingerprint()
    )
    assert (
        EgressPolicy.from_options("open", allow=["a.org"]).fingerprint()
        == EgressPolicy("open").fingerprint()
    )
    # A known value: the fingerprint is stable across runs and machines.
    assert EgressPolicy().fingerprint() == EgressPolicy().fingerprint()


def test_to_dict_is_json_and_round_trips():
    policy = EgressPolicy.from_options(
        "public", allow=["[::1]:443", "*.x.org"], deny=["10.0.0.0/8"]
    )
    data = json.loads(json.dumps(policy.to_dict()))
    assert EgressPolicy.from_dict(data) == policy


def test_policy_is_frozen_and_takes_strings_directly():
    policy = EgressPolicy("allowlist", allow=("pkg.example",))  # type: ignore[arg-type]
    assert policy.allow == (parse_entry("pkg.example"),)
    with pytest.raises(AttributeError):
        policy.mode = "open"  # type: ignore[misc]


def test_a_bad_entry_in_options_names_it():
    with pytest.raises(UsageError, match=r"bad egress entry '\*'"):
        EgressPolicy.from_options("allowlist", allow=["pkg.example", "*"])


# --------------------------------------------------------------------------- settings


def test_settings_keys_parse_and_validate():
    s = config.load_settings(
        "/nonexistent-project",
        environ={
            "INVOKE_STIGMER_EGRESS": "allowlist",
            "INVOKE_STIGMER_ALLOW": "pkg.example, 10.0.0.5:5432",
            "INVOKE_STIGMER_DENY": "*.evil.example",
        },
    )
    assert (s.egress, s.allow, s.deny, s.allow_presets) == (
        "allowlist", "pkg.example, 10.0.0.5:5432", "*.evil.example", ""
    )  # fmt: skip
    policy = EgressPolicy.from_settings(s)
    assert policy.to_dict()["allow"] == ["10.0.0.5:5432", "pkg.example"]
    assert policy.to_dict()["deny"] == ["*.evil.example"]


def test_network_none_means_egress_none():
    s = config.load_settings(
        "/nonexistent-project", environ={}, network="none", allow="pkg.example"
    )
    assert EgressPolicy.from_settings(s).mode == "none"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "INVOKE_STIGMER_EGRESS",
            "closed",
            "key 'egress' must be one of public, allowlist, open, none",
        ),
        (
            "INVOKE_STIGMER_ALLOW",
            "pkg.example,http://x",
            "key 'allow' has a bad egress entry 'http://x'",
        ),
        ("INVOKE_STIGMER_DENY", "999.1.1.1/40", "key 'deny' has a bad egress entry '999.1.1.1/40'"),
        ("INVOKE_STIGMER_ALLOW", "x:70000", "port 70000 is out of range"),
        ("INVOKE_STIGMER_ALLOW_PRESETS", "python,ruby", "has an unknown egress preset 'ruby'"),
    ],
)
def test_bad_settings_are_one_line_config_errors(variable, value, expected):
    with pytest.raises(ConfigError) as caught:
        config.load_settings("/nonexistent-project", environ={variable: value})
    assert expected in caught.value.message
    assert caught.value.message.startswith(variable)
    assert "\n" not in caught.value.message


def test_a_project_file_with_a_bad_entry_names_the_file_and_key(tmp_path):
    (tmp_path / "invoke.yaml").write_text(
        "stigmer:\n  allow: 'pkg.example, *.*.x'\n", encoding="utf-8"
    )
    with pytest.raises(
        ConfigError, match=r"invoke.yaml: key 'allow' has a bad egress entry '\*\.\*\.x'"
    ):
        config.load_settings(tmp_path, environ={})


def test_config_modes_are_the_models():
    assert config.EGRESS_MODES == egress.MODES


# --------------------------------------------------------------------------- presets


def context(
    tmp_path: Path, environ: dict[str, str] | None = None, npm: str | None = None, **kw
) -> PresetContext:
    """A context that reads only `tmp_path` and `environ`, with a fake npm."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {"HOME": str(home), "XDG_CONFIG_DIRS": str(tmp_path / "xdg"), **(environ or {})}
    runs: list[list[str]] = []

    def run(argv, cwd):
        runs.append(list(argv))
        return npm if argv[0] == "npm" else None

    kw.setdefault("pip_defaults", ("https://index.test/", "files.test"))
    return PresetContext(
        environ=env, project_dir=tmp_path, home=home, site_prefix=tmp_path / "venv", run=run, **kw
    )


def test_python_preset_defaults_to_pips_index_and_files_host(tmp_path):
    assert egress.expand_preset("python", context(tmp_path)) == ["index.test:443", "files.test:443"]


def test_python_preset_defaults_come_from_the_installed_pip():
    pip_index = pytest.importorskip("pip._internal.models.index")
    url, files_host = egress.pip_defaults(PresetContext())
    assert (url, files_host) == (pip_index.PyPI.url, pip_index.PyPI.file_storage_domain)


def test_python_preset_reads_pip_variables(tmp_path):
    env = {
        "PIP_INDEX_URL": "https://user:secret@mirror.test:8443/simple",
        "PIP_EXTRA_INDEX_URL": "http://extra.test/simple file:///opt/local/simple",
        "PIP_FIND_LINKS": "/opt/wheels https://wheels.test/links",
    }
    assert egress.expand_preset("python", context(tmp_path, env)) == [
        "mirror.test:8443", "extra.test:80", "wheels.test:443"
    ]  # fmt: skip


def test_python_preset_reads_pip_conf_files_in_pips_order(tmp_path):
    ctx = context(tmp_path)
    (tmp_path / "xdg" / "pip").mkdir(parents=True)
    (tmp_path / "xdg" / "pip" / "pip.conf").write_text(
        "[global]\nindex-url = https://global.test/simple\n[install]\nextra_index_url = https://install.test/\n"
    )
    user = tmp_path / "home" / ".config" / "pip"
    user.mkdir(parents=True)
    # The user's [global] loses to the global file's [install], as in pip.
    (user / "pip.conf").write_text(
        "[global]\nindex-url = https://user.test/\nextra-index-url = https://lost.test/\n"
    )
    assert egress.expand_preset("python", ctx) == ["user.test:443", "install.test:443"]
    site = tmp_path / "venv"
    site.mkdir()
    (site / "pip.conf").write_text("[global]\nindex-url = https://site.test/\n")
    assert egress.expand_preset("python", ctx)[0] == "site.test:443"
    env_file = tmp_path / "env.conf"
    env_file.write_text("[global]\nindex-url = https://env-file.test/\n")
    ctx = context(tmp_path, {"PIP_CONFIG_FILE": str(env_file)})
    assert egress.expand_preset("python", ctx)[0] == "env-file.test:443"
    ctx = context(
        tmp_path, {"PIP_CONFIG_FILE": str(env_file), "PIP_INDEX_URL": "https://var.test/"}
    )
    assert egress.expand_preset("python", ctx)[0] == "var.test:443"


def test_python_preset_with_no_index_keeps_only_find_links(tmp_path):
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "https://wheels.test/"}
    assert egress.expand_preset("python", context(tmp_path, env)) == ["wheels.test:443"]


def test_python_preset_reads_uv_index_variables(tmp_path):
    env = {
        "UV_DEFAULT_INDEX": "https://uv.test/simple",
        "UV_INDEX": "corp=https://corp.test/simple",
    }
    assert egress.expand_preset("python", context(tmp_path, env))[-2:] == [
        "uv.test:443",
        "corp.test:443",
    ]


def test_python_preset_bad_index_url_names_its_source_without_credentials(tmp_path):
    env = {"PIP_INDEX_URL": "https://user:secret@/simple"}
    with pytest.raises(UsageError) as caught:
        egress.expand_preset("python", context(tmp_path, env))
    assert "pip index-url" in caught.value.message
    assert "secret" not in caught.value.message


def test_python_preset_broken_pip_conf_is_one_line(tmp_path):
    site = tmp_path / "venv"
    site.mkdir()
    (site / "pip.conf").write_text("index-url = x\n")
    with pytest.raises(UsageError, match=r"preset python: cannot read .*pip\.conf"):
        egress.expand_preset("python", context(tmp_path))


def test_python_preset_without_pip_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pip._internal.models.index", None)
    with pytest.raises(UsageError, match="pip is not installed here"):
        egress.pip_defaults(context(tmp_path, pip_defaults=None))


def test_node_preset_reads_npm_config_including_scoped_registries(tmp_path):
    out = json.dumps(
        {
            "registry": "https://npm.test/",
            "@corp:registry": "https://corp.test:4873/",
            "fund": False,
        }
    )
    assert egress.expand_preset("node", context(tmp_path, npm=out)) == [
        "npm.test:443",
        "corp.test:4873",
    ]


def test_node_preset_without_npm_reads_variables_then_npmrc(tmp_path):
    env = {"npm_config_registry": "http://env.test:4873"}
    assert egress.expand_preset("node", context(tmp_path, env)) == ["env.test:4873"]
    (tmp_path / ".npmrc").write_text(
        "# comment\nregistry=https://${HOSTPART}.test/\n@x:registry = https://x.test/\n"
    )
    ctx = context(tmp_path, {"HOSTPART": "project"})
    assert egress.expand_preset("node", ctx) == ["project.test:443", "x.test:443"]


def test_node_preset_with_nothing_configured_and_no_npm_says_so(tmp_path):
    ctx = context(tmp_path, {"NPM_CONFIG_GLOBALCONFIG": str(tmp_path / "none")})
    with pytest.raises(UsageError, match="preset node: npm is not installed here"):
        egress.expand_preset("node", ctx)


def test_debian_preset_uses_the_configured_mirror(tmp_path):
    ctx = context(tmp_path, debian_mirror="http://mirror.test/debian")
    assert egress.expand_preset("debian", ctx) == ["mirror.test:80"]


def test_unknown_preset_is_refused():
    with pytest.raises(UsageError, match="unknown egress preset 'ruby'"):
        egress.expand_preset("ruby")
    assert egress.preset_problem("python, node") is None


def test_presets_expand_into_allow_entries_and_are_named(tmp_path):
    policy = EgressPolicy.from_options("allowlist", presets=["python"], context=context(tmp_path))
    assert policy.to_dict()["allow"] == ["files.test:443", "index.test:443"]
    assert policy.presets == ("python",)
    assert allowed(policy, "index.test", PUBLIC_V4, 443)
    assert not allowed(policy, "index.test", PUBLIC_V4, 80)


def test_describe_presets_has_a_line_per_preset():
    lines = egress.describe_presets().splitlines()
    assert [line.split(":")[0] for line in lines] == list(egress.PRESETS)


def test_the_module_names_no_registry_host():
    source = Path(egress.__file__).read_text(encoding="utf-8")
    for host in ("pypi" + ".org", "pythonhosted", "npmjs", "debian" + ".org"):
        assert host not in source, host


# --------------------------------------------------------------------------- properties

V4_RANGES = [r.network for r in egress.REFUSED_V4]
V6_RANGES = [r.network for r in egress.REFUSED_V6]


def in_network(network):
    """A strategy for any address inside `network`."""
    first = int(network.network_address)
    kind = ipaddress.IPv4Address if network.version == 4 else ipaddress.IPv6Address
    return st.integers(0, network.num_addresses - 1).map(lambda i: kind(first + i))


REFUSED_V4_ADDRESS = st.sampled_from(V4_RANGES).flatmap(in_network)
REFUSED_ADDRESS = st.sampled_from(V4_RANGES + V6_RANGES).flatmap(in_network)
ANY_V4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
ANY_V6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
ANY_ADDRESS = st.one_of(ANY_V4, ANY_V6, REFUSED_ADDRESS)
PORT = st.one_of(st.none(), st.integers(1, 65535))
LABEL = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True).filter(
    lambda s: not s.isdigit()
)
NAME = st.lists(LABEL, min_size=2, max_size=4).map(".".join)


def entry_text_for(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int | None, prefix: int
) -> str:
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    host = str(network) if prefix < network.max_prefixlen else str(address)
    if port is None:
        return host
    return f"[{host}]:{port}" if network.version == 6 else f"{host}:{port}"


@st.composite
def address_entries(draw):
    address = draw(ANY_ADDRESS)
    prefix = draw(st.integers(0, address.max_prefixlen))
    return entry_text_for(address, draw(PORT), prefix)


ENTRY_TEXT = st.one_of(address_entries(), NAME, NAME.map(lambda n: "*." + n))
MODE = st.sampled_from(egress.MODES)


@PROPERTY
@given(
    MODE,
    st.lists(ENTRY_TEXT, max_size=4),
    st.lists(ENTRY_TEXT, max_size=4),
    NAME,
    ANY_ADDRESS,
    PORT,
)
def test_deny_always_wins(mode, allow, deny, name, address, port):
    policy = EgressPolicy.from_options(mode, allow, deny)
    forms = [address, *(inner for inner, _ in egress.embedded_ipv4(address))]
    for entry in policy.deny:
        hit = any(entry.matches_address(f, port) for f in forms) or entry.matches_name(name, port)
        if hit:
            assert not decide(policy, name, address, port).allowed


@PROPERTY
@given(MODE, st.lists(ENTRY_TEXT, max_size=4), NAME, ANY_ADDRESS, PORT)
def test_a_matching_deny_entry_is_the_rule(mode, allow, name, address, port):
    deny = entry_text_for(address, port, address.max_prefixlen)
    decision = decide(EgressPolicy.from_options(mode, allow, [deny]), name, address, port)
    assert not decision.allowed
    assert decision.rule in ("mode none", f"deny {parse_entry(deny)}")


@PROPERTY
@given(REFUSED_ADDRESS, st.lists(NAME, max_size=3), st.sampled_from(["public", "allowlist"]), PORT)
def test_every_refused_address_is_refused_unless_explicitly_allowed(address, names, mode, port):
    # Names may be allowed (even the destination's own): the address still decides.
    policy = EgressPolicy.from_options(mode, allow=names)
    name = names[0] if names else None
    decision = decide(policy, name, address, port)
    assert not decision.allowed
    assert decision.rule.startswith("refused ")
    opened = EgressPolicy.from_options(
        mode, allow=[*names, entry_text_for(address, port, address.max_prefixlen)]
    )
    assert decide(opened, name, address, port).allowed


@PROPERTY
@given(REFUSED_V4_ADDRESS, PORT)
def test_ipv6_forms_of_refused_ipv4_addresses_are_refused(address, port):
    value = int(address)
    forms = [
        ipaddress.IPv6Address((0xFFFF << 32) | value),  # mapped
        ipaddress.IPv6Address((0xFFFF << 48) | value),  # translated
        ipaddress.IPv6Address((0x64FF9B << 96) | value),  # NAT64
        ipaddress.IPv6Address((0x2002 << 112) | (value << 80) | 1),  # 6to4
    ]
    if value > 1:  # :: and ::1 are themselves, not the compatible forms of 0.0.0.0/1
        forms.append(ipaddress.IPv6Address(value))  # compatible
    for form in forms:
        assert not decide(EgressPolicy(), "allowed.example", form, port).allowed, form
    # ... and opened by an explicit allow of the IPv4 address.
    opened = EgressPolicy.from_options("public", allow=[str(address)])
    for form in forms:
        assert decide(opened, None, form, port).allowed, form


@PROPERTY
@given(ANY_V4, PORT)
def test_public_allows_exactly_the_addresses_outside_the_refused_ranges(address, port):
    refused = any(address in network for network in V4_RANGES)
    assert decide(EgressPolicy(), None, address, port).allowed is not refused


@PROPERTY
@given(ANY_ADDRESS, NAME, PORT)
def test_none_refuses_and_open_allows_everything_without_deny(address, name, port):
    assert not decide(EgressPolicy("none"), name, address, port).allowed
    assert decide(EgressPolicy("open"), name, address, port).allowed


@PROPERTY
@given(ENTRY_TEXT)
def test_canonical_entries_parse_back_to_themselves(text):
    entry = parse_entry(text)
    assert parse_entry(str(entry)) == entry
    assert str(parse_entry(str(entry))) == str(entry)


@PROPERTY
@given(st.text(max_size=80))
def test_parse_entry_raises_nothing_but_usage_errors(text):
    try:
        entry = parse_entry(text)
    except UsageError as exc:
        assert "\n" not in exc.message
        return
    assert parse_entry(str(entry)) == entry


@PROPERTY
@given(st.lists(ENTRY_TEXT, max_size=6), st.lists(ENTRY_TEXT, max_size=3), st.randoms())
def test_fingerprint_ignores_order_and_repeats(allow, deny, random):
    shuffled = [*allow, *allow]
    random.shuffle(shuffled)
    one = EgressPolicy.from_options("allowlist", allow, deny)
    two = EgressPolicy.from_options("allowlist", shuffled, list(reversed(deny)))
    assert one.fingerprint() == two.fingerprint()


@PROPERTY
@given(NAME, NAME, PORT)
def test_a_wildcard_matches_exactly_the_names_under_it(suffix, other, port):
    entry = parse_entry(f"*.{suffix}")
    assert entry.matches_name(f"{other}.{suffix}", port)
    assert not entry.matches_name(suffix, port)
    assert not entry.matches_name(f"x{suffix}", port)
    assert entry.matches_name(other, port) is other.endswith("." + suffix)
