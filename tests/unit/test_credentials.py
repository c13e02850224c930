"""Secret definitions, sources and placeholders (stigmer_sandbox/credentials.py): no value
ever appears in an error, a listing or a row."""

from __future__ import annotations

import json
import sys

import pytest

from stigmer_sandbox import config, credentials
from stigmer_sandbox.errors import ConfigError
from stigmer_sandbox.tasks._common import runtime_config_files

from ..conftest import run_inv

VALUE = "s3cr3t-value-that-must-never-show"
# The command prints VALUE without holding it: its text is configuration, shown in listings.
PRINT_VALUE = "print('s3cr3t-' + 'value-that-must-never-show')"
GOOD = {
    "API_TOKEN": {
        "from_env": "MY_API_TOKEN",
        "hosts": ["api.example.com", "10.1.2.3:8443"],
        "header": "Authorization: Bearer {value}",
    },
    "GIT_TOKEN": {"from_file": "token.txt", "hosts": "github.com, *.github.com"},
    "HELPER": {"from_command": f'{sys.executable} -c "{PRINT_VALUE}"', "hosts": ["h.test"]},
}


def test_good_definitions_parse():
    parsed = credentials.parse_all(GOOD, "invoke.yaml")
    assert parsed["API_TOKEN"].hosts == ("api.example.com", "10.1.2.3:8443")
    assert parsed["API_TOKEN"].header_name == "Authorization"
    assert parsed["GIT_TOKEN"].hosts == ("github.com", "*.github.com")
    assert parsed["GIT_TOKEN"].applied == "its placeholder replaced in request headers"


@pytest.mark.parametrize(
    ("definitions", "expected"),
    [
        ({"A": {"from_env": "X"}}, "secret 'A' has no hosts"),
        ({"A": {"hosts": ["a.com"]}}, "secret 'A' has no source"),
        ({"A": {"from_env": "X", "from_file": "y", "hosts": ["a.com"]}}, "has two sources"),
        ({"A": {"from_env": " ", "hosts": ["a.com"]}}, "has an empty from_env"),
        ({"A": {"from_env": "X", "hosts": ["*"]}}, "secret 'A' has a bad host"),
        ({"A": {"from_env": "X", "hosts": ["a.com:70000"]}}, "secret 'A' has a bad host"),
        ({"A": {"from_env": "X", "hosts": [""]}}, "secret 'A' has a bad host"),
        (
            {"A": {"from_env": "X", "hosts": ["a.com"], "header": "Authorization: x"}},
            "without {value}",
        ),
        (
            {"A": {"from_env": "X", "hosts": ["a.com"], "header": "no colon {value}"}},
            "'Name: template'",
        ),
        (
            {"A": {"from_env": "X", "hosts": ["a.com"], "header": "Bad Name: {value}"}},
            "bad header name",
        ),
        (
            {"A": {"from_env": "X", "hosts": ["a.com"], "header": "H: {value}\r\nX: y"}},
            "control character",
        ),
        ({"A": {"from_env": "X", "hosts": ["a.com"], "colour": "red"}}, "unknown key 'colour'"),
        ({"1A": {"from_env": "X", "hosts": ["a.com"]}}, "secret name '1A' is not a variable name"),
        ({"A": "MY_TOKEN"}, "secret 'A' must be a mapping"),
        (["A"], "key 'secrets' must be a mapping"),
    ],
)
def test_bad_definitions_are_one_line_naming_the_secret(definitions, expected):
    with pytest.raises(ConfigError) as caught:
        credentials.parse_all(definitions, "invoke.yaml")
    assert expected in caught.value.message
    assert "\n" not in caught.value.message and caught.value.hint


def test_values_are_read_from_each_source(tmp_path):
    (tmp_path / "token.txt").write_text(VALUE + "\n")
    parsed = credentials.parse_all(GOOD, "invoke.yaml")
    environ = {"MY_API_TOKEN": VALUE}
    for secret in parsed.values():
        assert credentials.read_value(secret, tmp_path, environ) == VALUE


@pytest.mark.parametrize(
    ("spec", "prepare", "expected"),
    [
        ({"from_env": "MISSING"}, None, "environment variable MISSING, which is not set"),
        ({"from_env": "EMPTY"}, None, "is empty (environment variable EMPTY)"),
        ({"from_file": "nope.txt"}, None, "reads file nope.txt: No such file"),
        ({"from_file": "t.txt"}, "two\nlines", "holds a line break or NUL"),
        ({"from_file": "t.txt"}, b"\xff\xfe", "is not UTF-8 text"),
        ({"from_command": "false"}, None, "command false exited 1"),
        ({"from_command": "no-such-program-here"}, None, "cannot start"),
        ({"from_command": "echo 'unbalanced"}, None, "does not parse"),
    ],
)
def test_a_source_that_gives_no_value_is_one_line(tmp_path, spec, prepare, expected):
    if isinstance(prepare, bytes):
        (tmp_path / "t.txt").write_bytes(prepare)
    elif prepare is not None:
        (tmp_path / "t.txt").write_text(prepare)
    secret = credentials.parse_secret("TOKEN", {**spec, "hosts": ["a.com"]}, "invoke.yaml")
    with pytest.raises(ConfigError) as caught:
        credentials.read_value(secret, tmp_path, {"EMPTY": ""})
    assert expected in caught.value.message
    assert "secret 'TOKEN'" in caught.value.message


def test_a_failing_command_never_shows_what_it_printed(tmp_path):
    command = f'{sys.executable} -c "{PRINT_VALUE}; raise SystemExit(3)"'
    secret = credentials.parse_secret("T", {"from_command": command, "hosts": ["a.com"]}, "f")
    with pytest.raises(ConfigError) as caught:
        credentials.read_value(secret, tmp_path, {})
    assert "exited 3" in caught.value.message
    assert VALUE not in caught.value.message + str(caught.value.hint)


def test_a_listing_never_holds_a_value_even_when_checked(tmp_path):
    (tmp_path / "token.txt").write_text(VALUE)
    rows = credentials.listing(
        GOOD, ["API_TOKEN"], tmp_path, check=True, environ={"MY_API_TOKEN": VALUE}
    )
    assert VALUE not in json.dumps(rows)
    assert [r["in_use"] for r in rows] == [True, False, False]
    assert all(r["readable"] for r in rows)
    missing = credentials.listing(GOOD, [], tmp_path, check=True, environ={})
    assert missing[0]["readable"] is False and "MY_API_TOKEN" in missing[0]["problem"]


def test_placeholders_are_random_and_recognisable():
    made = {credentials.new_placeholder() for _ in range(100)}
    assert len(made) == 100
    assert all(p.startswith(credentials.PLACEHOLDER_PREFIX) and len(p) == 15 + 32 for p in made)


def test_settings_carry_definitions_and_check_the_names_in_use(tmp_path):
    settings = config.load_settings(tmp_path, environ={}, secrets=GOOD, use_secrets="API_TOKEN")
    assert settings.secrets["API_TOKEN"]["from_env"] == "MY_API_TOKEN"
    assert hash(settings) == hash(settings.replace())  # a mapping key, still hashable
    with pytest.raises(ConfigError) as caught:
        settings.replace(use_secrets="API_TOKEN,NOPE")
    assert "unknown secret 'NOPE' (defined: API_TOKEN, GIT_TOKEN, HELPER)" in caught.value.message
    with pytest.raises(ConfigError, match="not a secret name"):
        settings.replace(use_secrets="bad-name")
    assert (
        config.Settings().secrets == {}
        and config.Settings().secrets is not config.Settings().secrets
    )


def test_the_project_file_and_the_environment_are_checked(tmp_path):
    (tmp_path / "invoke.yaml").write_text("stigmer:\n  secrets:\n    A: {from_env: X}\n")
    with pytest.raises(ConfigError, match="secret 'A' has no hosts"):
        config.load_settings(tmp_path, environ={})
    with pytest.raises(ConfigError, match="INVOKE_STIGMER_SECRETS: key 'secrets' cannot be set"):
        config.check_environment({"INVOKE_STIGMER_SECRETS": "x"})


def test_runtime_config_files_are_found_before_the_first_task():
    argv = ["-f", "a.yaml", "--config=b.yml", "-e", "compose.up", "-f", "compose.yml"]
    assert [str(p) for p in runtime_config_files(argv, {"INVOKE_RUNTIME_CONFIG": "c.json"})] == [
        "c.json",
        "a.yaml",
        "b.yml",
    ]
    assert runtime_config_files(["-f", "tasks.py"], {}) == []


def test_the_hosts_of_secrets_in_use_are_allowed_and_need_a_gateway(tmp_path):
    from stigmer_sandbox.egress import EgressPolicy

    base = config.load_settings(tmp_path, environ={}, secrets=GOOD, egress="allowlist")
    assert EgressPolicy.from_settings(base).allow == ()
    used = base.replace(use_secrets="API_TOKEN,GIT_TOKEN", allow="pypi.example")
    allowed = [str(entry) for entry in EgressPolicy.from_settings(used).allow]
    assert sorted(allowed) == sorted(
        [
            "pypi.example",
            "api.example.com",
            "10.1.2.3:8443",
            "github.com",
            "*.github.com",
        ]
    )
    for change in ({"egress": "open"}, {"egress": "none"}, {"network": "none"}):
        with pytest.raises(ConfigError, match="has no gateway to carry secrets"):
            used.replace(**change)


def test_the_secret_flag_adds_to_the_configured_secrets(tmp_path):
    from invoke import Context

    from stigmer_sandbox.tasks._common import egress_settings

    (tmp_path / "invoke.yaml").write_text("")
    defaults = config.load_settings(tmp_path, environ={}, secrets=GOOD, use_secrets="API_TOKEN")
    context = Context({config.SECTION: defaults.as_dict()})
    chosen = egress_settings(context, None, None, None, None, ["GIT_TOKEN", "API_TOKEN"])
    assert chosen.use_secrets == "API_TOKEN,GIT_TOKEN"
    with pytest.raises(ConfigError, match="unknown secret 'NOPE'"):
        egress_settings(context, None, None, None, None, ["NOPE"])


def test_the_egress_task_shows_the_secrets_hosts_in_the_policy(tmp_path):
    runtime = tmp_path / "runtime.yaml"
    runtime.write_text(
        "stigmer:\n  use_secrets: API_TOKEN\n  secrets:\n    API_TOKEN:\n"
        "      from_env: MY_API_TOKEN\n      hosts: [api.example.com]\n"
    )
    done = run_inv("-f", str(runtime), "sandbox.egress", "--policy", "--json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["brokered"] == ["api.example.com"] and "api.example.com" in shown["allow"]


# -- AWS secrets: `sign: aws-sigv4` ------------------------------------------------------

AWS_KEYS = {"AccessKeyId": "AKIAEXAMPLEKEY", "SecretAccessKey": "wJalr/EXAMPLE+KEY"}
AWS = {"from_env": "MY_AWS", "sign": "aws-sigv4", "hosts": ["*.amazonaws.com"]}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({**AWS, "header": "Authorization: {value}"}, "secret 'A' has both sign and header"),
        ({**AWS, "sign": "aws-sigv2"}, "secret 'A' has an unknown sign 'aws-sigv2'"),
        (
            {"from_aws_profile": "default", "hosts": ["s3.amazonaws.com"]},
            "secret 'A' reads an AWS profile without sign",
        ),
        ({**AWS, "hosts": []}, "secret 'A' has no hosts"),
    ],
)
def test_bad_aws_definitions_are_one_line_naming_the_secret(spec, expected):
    with pytest.raises(ConfigError) as caught:
        credentials.parse_secret("A", spec, "invoke.yaml")
    assert expected in caught.value.message
    assert "\n" not in caught.value.message and caught.value.hint


def test_an_aws_value_is_credential_process_json_made_compact(tmp_path):
    secret = credentials.parse_secret("AWS", AWS, "invoke.yaml")
    assert secret.applied == "AWS requests re-signed (SigV4)"
    printed = json.dumps({"Version": 1, **AWS_KEYS, "Expiration": "2026-12-07T13:00:00Z"}, indent=2)
    assert json.loads(credentials.read_value(secret, tmp_path, {"MY_AWS": printed})) == AWS_KEYS
    temporary = {**AWS_KEYS, "SessionToken": "FwoGZXIvYXdzEXAMPLE"}
    value = credentials.read_value(secret, tmp_path, {"MY_AWS": json.dumps(temporary)})
    assert json.loads(value) == temporary


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("AKIAEXAMPLEKEY:wJalr/EXAMPLE+KEY", "is not AWS credentials JSON"),
        ('["AKIAEXAMPLEKEY"]', "is not AWS credentials JSON"),
        ('{"AccessKeyId": "AKIAEXAMPLEKEY"}', "has no SecretAccessKey"),
        ('{"AccessKeyId": 7, "SecretAccessKey": "wJalr/EXAMPLE+KEY"}', "has no AccessKeyId"),
        ('{"AccessKeyId": "AKIA/EXAMPLE", "SecretAccessKey": "wJalr/EXAMPLE+KEY"}', "a '/'"),
        (
            '{"AccessKeyId": "AKIAEXAMPLEKEY", "SecretAccessKey": "wJalr/EXAMPLE+KEY", '
            '"SessionToken": "line\\nbreak"}',
            "control character in SessionToken",
        ),
        ("  ", "is empty"),
    ],
)
def test_a_bad_aws_value_is_one_line_that_never_shows_it(tmp_path, value, expected):
    secret = credentials.parse_secret("AWS", AWS, "invoke.yaml")
    with pytest.raises(ConfigError) as caught:
        credentials.read_value(secret, tmp_path, {"MY_AWS": value})
    shown = caught.value.message + str(caught.value.hint)
    assert expected in caught.value.message and "secret 'AWS'" in caught.value.message
    assert "\n" not in caught.value.message
    assert "EXAMPLE+KEY" not in shown and "AKIA/EXAMPLE" not in shown


def test_an_aws_profile_gives_its_static_keys(tmp_path):
    (tmp_path / "creds").write_text(
        "[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = d/efault\n"
        "[work]\naws_access_key_id = AKIAWORK\naws_secret_access_key = w+ork\n"
        "aws_session_token = tok\n[sso]\nsso_session = corp\n"
    )
    environ = {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "creds")}

    def read(profile: str) -> dict:
        spec = {"from_aws_profile": profile, "sign": "aws-sigv4", "hosts": ["s3.amazonaws.com"]}
        secret = credentials.parse_secret("AWS", spec, "invoke.yaml")
        return json.loads(credentials.read_value(secret, tmp_path, environ))

    assert read("default") == {"AccessKeyId": "AKIADEFAULT", "SecretAccessKey": "d/efault"}
    assert read("work")["SessionToken"] == "tok"
    for profile, expected in [
        ("nope", "reads AWS profile nope, which"),
        ("sso", "holds no static keys"),
    ]:
        with pytest.raises(ConfigError, match=expected) as caught:
            read(profile)
        assert "export-credentials --profile" in str(caught.value.hint) or "name a" in str(
            caught.value.hint
        )
    environ["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "absent")
    with pytest.raises(ConfigError, match="No such file"):
        read("default")


def test_a_sandbox_holds_one_aws_key_pair(tmp_path):
    two = {"AWS": AWS, "AWS_OTHER": {**AWS, "from_env": "OTHER"}}
    with pytest.raises(ConfigError) as caught:
        credentials.chosen(two, ["AWS", "AWS_OTHER"], "use_secrets")
    assert "secrets 'AWS' and 'AWS_OTHER' both sign AWS requests" in caught.value.message


def test_an_aws_secret_gives_the_sandbox_placeholder_keys_and_the_broker_the_value(tmp_path):
    from stigmer_sandbox.runtime import broker

    settings = config.load_settings(
        tmp_path,
        environ={},
        secrets={**GOOD, "AWS": AWS},
        use_secrets="AWS,API_TOKEN",
        egress="allowlist",
        state_dir=str(tmp_path / "state"),
    )
    environment = broker.sandbox_environment(settings, "box")
    key_id, secret_key = environment["AWS_ACCESS_KEY_ID"], environment["AWS_SECRET_ACCESS_KEY"]
    assert key_id.startswith("stigmer-secret-") and secret_key.startswith("stigmer-secret-")
    assert (
        key_id != secret_key and "AWS" not in environment and "AWS_SESSION_TOKEN" not in environment
    )
    assert environment["API_TOKEN"].startswith("stigmer-secret-")
    assert broker.sandbox_environment(settings, "box") == environment  # stable across ups
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MY_AWS", json.dumps(AWS_KEYS))
        patch.setenv("MY_API_TOKEN", VALUE)
        document = broker.secrets_document(settings, "box")
    aws = next(item for item in document["secrets"] if item["name"] == "AWS")
    assert aws["placeholder"] == key_id and aws["unsendable"] == [secret_key]
    assert aws["sign"] == "aws-sigv4" and json.loads(aws["value"]) == AWS_KEYS
