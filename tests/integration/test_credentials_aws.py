"""AWS credentials through the broker (issue 26), on the real engine: the guide's `aws s3`
commands work in a sandbox that holds only placeholder keys, because the broker re-signs
each request with the real key; the real key is nowhere in the sandbox, is worthless
without the broker, and what cannot be re-signed (presigned URLs, SigV2, signed chunks)
or goes elsewhere is refused and audited.

The S3 stand-in is moto in server mode over HTTPS (aws_standin.py), started here on the
host with a certificate from a throw-away CA that the secret's `ca` names, and with
signature checks on: its first three actions make an IAM user and its key (the "real"
credentials), after which it verifies every signature against that key. The AWS CLI is
the full image's (Debian's 2.9.19), which ignores AWS_ENDPOINT_URL: every call passes
`--endpoint-url`, and the egress allowlist holds nothing but the stand-ins.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from stigmer_sandbox import config, engine
from stigmer_sandbox.runtime import Sandbox, network
from stigmer_sandbox.runtime.egress_gateway import bridge_gateway

from ..conftest import ROOT
from ..tls_standin import make_certificates
from .conftest import TEST_LABELS
from .egress_support import Quiet, Server
from .test_credentials_broker import value_anywhere

FULL_IMAGE = "stigmer-sandbox-full:local"
STANDIN = Path(__file__).with_name("aws_standin.py")
BUCKET = "stigmer-broker-test"
ENV = "STIGMER_TEST_AWS_CREDENTIALS"


@pytest.fixture(scope="module")
def aws_image(request: pytest.FixtureRequest) -> str:
    """The full image, whose AWS CLI the guide uses; where it was never built (CI builds
    the basic image only), the session's full image from the loopback mirror, whose AWS
    CLI is the real one."""
    if engine.image_id(FULL_IMAGE):
        return FULL_IMAGE
    tag, _ = request.getfixturevalue("full_image_from_mirror")
    return str(tag)


@pytest.fixture(scope="module")
def host() -> str:
    return bridge_gateway()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory, host) -> Path:
    folder = tmp_path_factory.mktemp("aws-tls")
    make_certificates(folder, ["localhost"], [host])
    return folder


@pytest.fixture(scope="module")
def moto(certificates, host) -> Iterator[dict[str, str]]:
    """The stand-in's URL and the real key it accepts (made by its first 3 actions)."""
    import boto3

    log = (certificates / "moto.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, str(STANDIN), str(certificates / "cert.pem")],
        env={"INITIAL_NO_AUTH_ACTION_COUNT": "3", "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=log,
    )
    try:
        port = server.stdout.readline().decode().strip()  # type: ignore[union-attr]
        assert port.isdigit(), (certificates / "moto.log").read_text()[-2000:]
        url = f"https://{host}:{port}"
        iam = boto3.client(
            "iam",
            endpoint_url=url,
            verify=str(certificates / "ca.pem"),
            region_name="us-east-1",
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        allow_all = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*"}]}
        allow_all["Statement"][0]["Resource"] = "*"
        iam.create_user(UserName="real")
        iam.put_user_policy(UserName="real", PolicyName="all", PolicyDocument=json.dumps(allow_all))
        key = iam.create_access_key(UserName="real")["AccessKey"]  # from here on: checked
        yield {"url": url, "port": port, "id": key["AccessKeyId"], "key": key["SecretAccessKey"]}
    finally:
        server.kill()
        server.wait()
        log.close()


class Counted(Quiet):
    """Answers like Quiet and counts the requests that reached it (any method)."""

    def do_GET(self) -> None:
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        super().do_GET()

    do_POST = do_GET


@pytest.fixture(scope="module")
def other(certificates) -> Iterator[Server]:
    """A second HTTPS destination the broker sees (another secret's), that no AWS
    request may reach."""
    server = Server(("0.0.0.0", 0), Counted)
    server.requests = []  # type: ignore[attr-defined]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates / "cert.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, aws_image, host, certificates, moto, other) -> Iterator[Sandbox]:
    folder = tmp_path_factory.mktemp("aws-sandbox")
    ca = str(certificates / "ca.pem")
    secrets = {
        "AWS": {
            "from_env": ENV,
            "sign": "aws-sigv4",
            "hosts": [f"{host}:{moto['port']}"],
            "ca": ca,
        },
        "OTHER_TOKEN": {
            "from_env": "STIGMER_TEST_OTHER_TOKEN",
            "hosts": [f"{host}:{other.server_address[1]}"],
            "ca": ca,
        },
    }
    settings = config.load_settings(ROOT, environ={}).replace(
        **{k: str(folder / k) for k in ("workspace", "logs", "state_dir")},
        image=aws_image,
        egress="allowlist",
        secrets=secrets,
        use_secrets="AWS,OTHER_TOKEN",
    )
    # As `aws configure export-credentials --format process` prints them (several lines).
    exported = {"Version": 1, "AccessKeyId": moto["id"], "SecretAccessKey": moto["key"]}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV, json.dumps(exported, indent=2))
        patch.setenv("STIGMER_TEST_OTHER_TOKEN", "other-token-value")
        with Sandbox.create_ephemeral(settings, extra_labels=TEST_LABELS) as box:
            box.settings_for_test = settings  # type: ignore[attr-defined]
            yield box


def aws(box: Sandbox, moto: dict[str, str], arguments: str, endpoint: str = "") -> tuple:
    """(exit code, stdout, stderr) of the AWS CLI in the sandbox, against the stand-in."""
    command = (
        "AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true "
        f"aws --endpoint-url {endpoint or moto['url']} {arguments}"
    )
    done = box.exec(command, timeout=120)
    return done.exit_code, done.stdout, done.stderr


def refusals(box: Sandbox) -> set[tuple[str, int | None]]:
    records = network.egress_records(box.settings_for_test, None, denied_only=True)  # type: ignore[attr-defined]
    return {(r["rule"], r["port"]) for r in records if r["via"] == "broker"}


def test_aws_s3_works_with_placeholder_keys_and_the_real_key_is_nowhere(sandbox, moto):
    held = sandbox.exec(
        'printf "%s %s %s" "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" '
        '"${AWS_SESSION_TOKEN-unset}"'
    ).stdout.split()
    assert held[0].startswith("stigmer-secret-") and held[1].startswith("stigmer-secret-")
    assert held[0] != held[1] and held[2] == "unset"
    sandbox.exec(
        "printf 'through the broker\\n' > /tmp/small.txt; "
        "head -c 9000000 /dev/urandom > /tmp/big.bin"
    )  # over 8 MB: multipart
    steps = [
        f"s3 mb s3://{BUCKET}",
        f"s3 cp /tmp/small.txt s3://{BUCKET}/small.txt --no-progress",
        f"s3 cp /tmp/big.bin s3://{BUCKET}/big.bin --no-progress",
        f"s3 cp s3://{BUCKET}/big.bin /tmp/down.bin --no-progress",
        f"s3 cp s3://{BUCKET}/small.txt /tmp/down.txt --no-progress",
    ]
    for step in steps:
        code, _out, err = aws(sandbox, moto, step)
        assert code == 0, (step, err[-1500:])
    assert sandbox.exec("cmp /tmp/big.bin /tmp/down.bin && cat /tmp/down.txt").stdout == (
        "through the broker\n"
    )
    code, listed, err = aws(sandbox, moto, "s3 ls")
    assert code == 0 and BUCKET in listed, err
    code, listed, err = aws(sandbox, moto, f"s3 ls s3://{BUCKET}")
    assert code == 0 and "big.bin" in listed and "small.txt" in listed, err
    # Neither half of the real key is in the sandbox's files, environments or commands.
    for value in (moto["id"], moto["key"]):
        searchable = max(re.findall(r"[A-Za-z0-9]+", value), key=len)
        assert len(searchable) >= 12
        assert value_anywhere(sandbox, searchable) == []
    records = network.egress_records(sandbox.settings_for_test, None)  # type: ignore[attr-defined]
    brokered = [r for r in records if r["via"] == "broker" and r["decision"] == "allowed"]
    assert brokered and all(r["rule"] == "secrets:AWS" for r in brokered)
    assert moto["key"] not in json.dumps(records) and moto["id"] not in json.dumps(records)


def test_without_the_broker_the_placeholder_keys_are_worthless(sandbox, moto):
    # Straight to the stand-in (routed, no proxy; its CA is not trusted in there): the
    # request arrives signed with the placeholder key, which no one knows.
    done = sandbox.exec(
        "env -u HTTPS_PROXY -u https_proxy -u HTTP_PROXY -u http_proxy "
        "AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true "
        f"aws --no-verify-ssl --endpoint-url {moto['url']} s3 ls",
        timeout=120,
    )
    assert done.exit_code != 0
    assert "InvalidAccessKeyId" in done.stderr, done.stderr[-1500:]


def test_the_keys_sent_to_another_destination_are_refused_and_audited(sandbox, moto, other, host):
    port = other.server_address[1]
    before = list(other.requests)  # type: ignore[attr-defined]
    code, _out, err = aws(sandbox, moto, "s3 ls", endpoint=f"https://{host}:{port}")
    assert code != 0 and "403" in err, err[-1500:]
    # A body over the broker's 10 MB buffer streams: its headers are judged before any
    # part of the request leaves.
    streamed = sandbox.exec(
        "head -c 11000000 /dev/zero > /tmp/eleven.bin && curl -s -o /dev/null -m 30 "
        "-w '%{http_code}' -X POST --data-binary @/tmp/eleven.bin "
        f'-H "X-Key: $AWS_ACCESS_KEY_ID" https://{host}:{port}/streamed',
        timeout=60,
    )
    assert streamed.stdout == "403", streamed.stderr
    assert other.requests == before  # type: ignore[attr-defined]
    assert ("secret-placeholder:AWS:header:Authorization", port) in refusals(sandbox)
    assert ("secret-placeholder:AWS:header:X-Key", port) in refusals(sandbox)


def test_what_cannot_be_re_signed_is_refused_and_audited(sandbox, moto):
    port = int(moto["port"])
    code, presigned, err = aws(sandbox, moto, f"s3 presign s3://{BUCKET}/small.txt")
    assert code == 0 and "X-Amz-Credential=stigmer-secret-" in presigned, err
    curl = "curl -s -o /dev/null -w '%{http_code}' -m 20"
    now = "$(date -u +%Y%m%dT%H%M%SZ)"
    checks = {
        # A presigned URL made in the sandbox: the key id is in the query.
        "presigned-url": f"{curl} '{presigned.strip()}'",
        # SigV2: the key id and a signature the broker cannot make again.
        "not-sigv4": f'{curl} -H "Authorization: AWS $AWS_ACCESS_KEY_ID:c2lnbmF0dXJl" '
        f"{moto['url']}/{BUCKET}",
        # Signed chunks: every chunk of the body is signed with the placeholder key.
        "signed-chunks": (
            f"d={now}; {curl} -X PUT --data-binary x "
            '-H "x-amz-date: $d" '
            '-H "x-amz-content-sha256: STREAMING-AWS4-HMAC-SHA256-PAYLOAD" '
            '-H "Authorization: AWS4-HMAC-SHA256 '
            "Credential=$AWS_ACCESS_KEY_ID/${d%T*}/us-east-1/s3/aws4_request, "
            "SignedHeaders=host;x-amz-content-sha256;x-amz-date, "
            f'Signature={"0" * 64}" {moto["url"]}/{BUCKET}/chunked'
        ),
        # The secret key placeholder signs in the sandbox only: never sent.
        "header:X-Leak": f'{curl} -H "X-Leak: $AWS_SECRET_ACCESS_KEY" {moto["url"]}/',
    }
    for where, command in checks.items():
        status = sandbox.exec(command, timeout=60).stdout
        assert status == "403", (where, status)
    found = refusals(sandbox)
    for where in checks:
        assert (f"secret-placeholder:AWS:{where}", port) in found, (where, found)


def test_a_rotated_key_holds_from_the_next_up(sandbox, moto, certificates, monkeypatch):
    """Last in this file: it replaces the stand-in's key."""
    import boto3

    iam = boto3.client(
        "iam",
        endpoint_url=moto["url"],
        verify=str(certificates / "ca.pem"),
        region_name="us-east-1",
        aws_access_key_id=moto["id"],
        aws_secret_access_key=moto["key"],
    )
    new = iam.create_access_key(UserName="real")["AccessKey"]
    iam.delete_access_key(UserName="real", AccessKeyId=moto["id"])
    code, _out, err = aws(sandbox, moto, "s3 ls")
    assert code != 0 and "InvalidAccessKeyId" in err, err[-1500:]  # revoked upstream
    rotated = {"AccessKeyId": new["AccessKeyId"], "SecretAccessKey": new["SecretAccessKey"]}
    monkeypatch.setenv(ENV, json.dumps(rotated))
    held = sandbox.exec('printf %s "$AWS_ACCESS_KEY_ID"').stdout
    sandbox.up()  # the running sandbox is kept; the broker reads the value again
    assert sandbox.exec('printf %s "$AWS_ACCESS_KEY_ID"').stdout == held
    code, listed, err = aws(sandbox, moto, "s3 ls")
    assert code == 0 and BUCKET in listed, err[-1500:]
