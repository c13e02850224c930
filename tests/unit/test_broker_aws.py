"""AWS re-signing in the broker (dockerfiles/broker/stigmer_broker_aws.py, and the addon's
decisions about a signing secret), without mitmproxy: a request the sandbox signed with
its placeholder keys, re-signed, carries exactly the Authorization that signing it with
the real key gives; what cannot be re-signed is refused, naming why."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from stigmer_sandbox import egress
from stigmer_sandbox.credentials import new_placeholder
from stigmer_sandbox.runtime import broker as host_broker

botocore_auth = pytest.importorskip("botocore.auth")
from botocore.awsrequest import AWSRequest  # noqa: E402
from botocore.credentials import Credentials  # noqa: E402

FOLDER = Path(__file__).resolve().parents[2] / "dockerfiles" / "broker"
sys.path.insert(0, str(FOLDER))  # the addon imports its signer as the image lays them out
try:
    import stigmer_broker_aws as aws

    spec = importlib.util.spec_from_file_location("stigmer_broker", FOLDER / "stigmer_broker.py")
    addon = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(addon)  # type: ignore[union-attr]
finally:
    sys.path.remove(str(FOLDER))

KEY_ID = new_placeholder()
SECRET_KEY = new_placeholder()
PLACEHOLDER_KEYS = Credentials(KEY_ID, SECRET_KEY)
REAL = aws.Keys("AKIAEXAMPLEREALKEY01", "real/secret+key")
TEMPORARY = aws.Keys("ASIAEXAMPLETEMPKEY01", "temp/secret+key", "session-token-value")
DATE = "20261207T120000Z"
S3_URL = "https://bucket.s3.eu-west-1.amazonaws.com/some%20key.txt?partNumber=1&uploadId=x"
STS_URL = "https://sts.eu-west-1.amazonaws.com/"
STS_BODY = b"Action=GetCallerIdentity&Version=2011-06-15"


def signed(credentials, service: str, url: str, body: bytes, headers: dict) -> AWSRequest:
    """A request signed as an AWS tool signs it (botocore's signer, a fixed date)."""
    request = AWSRequest(method="POST", url=url, data=body, headers={"X-Amz-Date": DATE, **headers})
    if credentials.token:
        request.headers["X-Amz-Security-Token"] = credentials.token
    request.context["timestamp"] = DATE
    auth = (botocore_auth.S3SigV4Auth if service == "s3" else botocore_auth.SigV4Auth)(
        credentials, service, "eu-west-1"
    )
    canonical = auth.canonical_request(request)
    auth._inject_signature_to_request(
        request, auth.signature(auth.string_to_sign(request, canonical), request)
    )
    return request


def lower(request: AWSRequest) -> dict[str, str]:
    return {name.lower(): value for name, value in request.headers.items()}


S3_HEADERS = {
    "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
    "Content-Encoding": "aws-chunked",
    "x-amz-trailer": "x-amz-checksum-crc32",
}
CASES = {
    "s3": ("s3", S3_URL, b"", S3_HEADERS),
    "sts": ("sts", STS_URL, STS_BODY, {"Content-Type": "application/x-www-form-urlencoded"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("real", [REAL, TEMPORARY], ids=["static", "temporary"])
def test_the_re_signed_request_carries_the_real_keys_signature(case, real):
    service, url, body, headers = CASES[case]
    from_sandbox = signed(PLACEHOLDER_KEYS, service, url, body, headers)
    # The S3 body streams (its hash is in a header); other services' bodies are hashed.
    given = None if service == "s3" else body
    changes = aws.resign("POST", url, lower(from_sandbox), given, placeholder=KEY_ID, keys=real)
    direct = signed(
        Credentials(real.access_key, real.secret_key, real.token), service, url, body, headers
    )
    assert changes["authorization"] == direct.headers["Authorization"]
    assert changes.get("x-amz-security-token") == real.token
    assert KEY_ID not in json.dumps(changes)


def test_a_session_token_from_the_sandbox_is_dropped():
    sandbox_token = Credentials(KEY_ID, SECRET_KEY, "sandbox-made-token")
    from_sandbox = signed(sandbox_token, "sts", STS_URL, STS_BODY, {})
    changes = aws.resign(
        "POST", STS_URL, lower(from_sandbox), STS_BODY, placeholder=KEY_ID, keys=REAL
    )
    assert changes["x-amz-security-token"] is None
    direct = signed(Credentials(REAL.access_key, REAL.secret_key), "sts", STS_URL, STS_BODY, {})
    assert changes["authorization"] == direct.headers["Authorization"]


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"authorization": f"AWS {KEY_ID}:c2lnbmF0dXJl"}, "not-sigv4"),  # SigV2
        ({"authorization": "Bearer x"}, "not-sigv4"),
        ("other key id", "key-id"),
        ({"x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"}, "signed-chunks"),
        ({"x-amz-date": "20261208T000000Z"}, "date"),
        ("no payload hash, streamed", "no-body"),
    ],
)
def test_what_cannot_be_re_signed_is_refused_naming_why(change, where):
    headers = lower(signed(PLACEHOLDER_KEYS, "s3", S3_URL, b"", S3_HEADERS))
    if change == "other key id":
        headers["authorization"] = headers["authorization"].replace(KEY_ID, new_placeholder())
    elif change == "no payload hash, streamed":
        del headers["x-amz-content-sha256"]
    else:
        headers |= change
    with pytest.raises(aws.Refused) as caught:
        aws.resign("PUT", S3_URL, headers, None, placeholder=KEY_ID, keys=REAL)
    assert caught.value.where == where
    assert REAL.secret_key not in str(caught.value)


def table(tmp_path: Path) -> dict:
    document = {
        "secrets": [
            {
                "name": "AWS",
                "placeholder": KEY_ID,
                "value": json.dumps({"AccessKeyId": "AKIA1", "SecretAccessKey": "s"}),
                "destinations": [host_broker._destination(egress.parse_entry("*.amazonaws.com"))],
                "header": "",
                "sign": "aws-sigv4",
                "unsendable": [SECRET_KEY],
            }
        ]
    }
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps(document))
    return addon.Table(str(path)).current()


def test_the_key_id_placeholder_may_sign_only_in_an_authorization_header(tmp_path):
    secrets = table(tmp_path)
    s3 = "bucket.s3.amazonaws.com"
    signed_by_it = [(KEY_ID, "header:Authorization")]
    assert addon.refusal(secrets, s3, 443, signed_by_it) is None
    assert addon.signing_refusal(secrets, signed_by_it) is None
    assert addon.signing_secret(secrets.values(), f"Credential={KEY_ID}/x").name == "AWS"
    # Presigned (the key id in the query), in another header, in a body: refused.
    presigned = addon.placeholders_in(f"/k?X-Amz-Credential={KEY_ID}%2F2026", [], None)
    assert addon.signing_refusal(secrets, presigned) == ("AWS", "presigned-url")
    assert addon.signing_refusal(secrets, [(KEY_ID, "header:X-Meta")]) == ("AWS", "header:X-Meta")
    # To a host that is not the secret's: refused, as every placeholder is.
    assert addon.refusal(secrets, "evil.example", 443, signed_by_it) == (
        "AWS",
        "header:Authorization",
    )
    # The secret key placeholder signs in the sandbox only: refused everywhere, named.
    assert addon.refusal(secrets, s3, 443, [(SECRET_KEY, "body")]) == ("AWS", "body")


def test_a_signing_secret_is_never_substituted(tmp_path):
    secrets = table(tmp_path)
    # Only the secrets without `sign` are put in place of their placeholders.
    assert [s for s in secrets.values() if not s.sign and s.goes_to("s3.amazonaws.com", 443)] == []
    assert aws.keys_of(secrets[KEY_ID].value) == aws.Keys("AKIA1", "s", None)
