"""AWS Signature Version 4 re-signing for the credentials broker (issue 26, an AWS secret).

A sandbox given an AWS secret holds a placeholder key id and secret key. The AWS tools in
it sign each request with them; the broker checks that the request names this sandbox's
placeholder key id, then signs it again with the real key (botocore's signer: the same
canonical request AWS recomputes) and replaces the Authorization header. Nothing else of
the request changes, so a body already on its way (an S3 upload, `x-amz-content-sha256`
set) needs no buffering: the payload hash is the client's, taken from that header.

What cannot be re-signed is refused, each with the `where` the audit records:
`not-sigv4` (SigV2, or no SigV4 header at all), `key-id` (another key id), `date`
(`x-amz-date` missing or outside the scope), `signed-chunks` (a streaming upload whose
chunks carry signatures made with the placeholder key), `no-body` (a payload hash that
needs a body the broker streamed). Presigned URLs carry the key id in the URL: the addon
refuses them before this module is asked (`presigned-url`).

Pure functions over (method, url, headers, body): no mitmproxy here, so the host's tests
import this module beside a botocore of their own.
"""

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest

_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=(?P<key_id>[^/\s,]+)/(?P<date>\d{8})/(?P<region>[^/\s,]+)/"
    r"(?P<service>[^/\s,]+)/aws4_request,\s*SignedHeaders=(?P<signed>[a-z0-9;._-]+),"
    r"\s*Signature=[0-9a-f]{64}\Z"
)
# Signed chunks chain every chunk's signature from the one in the header: the body carries
# signatures made with the placeholder key, which no header change can mend.
SIGNED_CHUNKS = (
    "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
    "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER",
    "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD",
    "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD-TRAILER",
)
TOKEN_HEADER = "x-amz-security-token"
PAYLOAD_HEADER = "x-amz-content-sha256"


class Refused(Exception):
    """A request that cannot be re-signed: `where` for the audit, the message for the
    sandbox (no secret in either)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(message)
        self.where = where


@dataclass(frozen=True)
class Keys:
    """The real credentials, with the attribute names botocore's signers read."""

    access_key: str
    secret_key: str
    token: str | None = None


@dataclass(frozen=True)
class Scope:
    """What the client signed for (its Authorization header)."""

    key_id: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]


def keys_of(value: str) -> Keys:
    """The real credentials from a secret's value (the host wrote credential_process JSON)."""
    document = json.loads(value)
    return Keys(document["AccessKeyId"], document["SecretAccessKey"], document.get("SessionToken"))


def scope_of(authorization: str, placeholder: str) -> Scope:
    """The scope of a SigV4 Authorization value signed with `placeholder` as key id."""
    found = _AUTHORIZATION.match(authorization.strip())
    if not found:
        raise Refused("not-sigv4", "only AWS Signature V4 in an Authorization header is re-signed")
    if found["key_id"] != placeholder:
        raise Refused("key-id", "the Authorization header does not name this sandbox's key id")
    return Scope(
        found["key_id"],
        found["date"],
        found["region"],
        found["service"],
        tuple(found["signed"].split(";")),
    )


def streams(headers: Mapping[str, str]) -> bool:
    """Whether a request can be re-signed before its body is read (the payload hash is
    in a header, as in every S3 request)."""
    return PAYLOAD_HEADER in headers


def resign(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes | None,
    *,
    placeholder: str,
    keys: Keys,
) -> dict[str, str | None]:
    """The header changes (name -> value; None removes it) that re-sign a request the
    sandbox signed with `placeholder`, with `keys`.

    `headers` are keyed by lower-case name. `body` is None while the body streams, which
    needs the payload hash in `x-amz-content-sha256` (kept as the client sent it: a real
    hash, UNSIGNED-PAYLOAD or STREAMING-UNSIGNED-PAYLOAD-TRAILER).
    """
    scope = scope_of(headers.get("authorization", ""), placeholder)
    payload = headers.get(PAYLOAD_HEADER)
    if payload in SIGNED_CHUNKS:
        raise Refused(
            "signed-chunks",
            f"a signed-chunk upload ({payload}) cannot be re-signed: use HTTPS "
            "(the AWS tools then send an unsigned payload)",
        )
    if payload is None and body is None:
        raise Refused("no-body", "a streamed body without x-amz-content-sha256 cannot be signed")
    timestamp = headers.get("x-amz-date", "")
    if timestamp[:8] != scope.date:
        raise Refused("date", "x-amz-date is missing or outside the credential scope")
    # Exactly the headers the client signed, as received: the canonical request is then
    # the one the server recomputes. Its session token goes (it signs nothing real); the
    # real one, for temporary credentials, is added and signed.
    signed = {h: headers[h] for h in scope.signed_headers if h in headers and h != TOKEN_HEADER}
    changes: dict[str, str | None] = {}
    if TOKEN_HEADER in headers:
        changes[TOKEN_HEADER] = None
    if keys.token:
        signed[TOKEN_HEADER] = changes[TOKEN_HEADER] = keys.token
    request = AWSRequest(method=method, url=url, headers=signed, data=body or b"")
    request.context["timestamp"] = timestamp
    # S3 signs the path as sent; other services normalise it (botocore knows which).
    signer_class = S3SigV4Auth if scope.service == "s3" else SigV4Auth
    signer = signer_class(keys, scope.service, scope.region)
    # Not add_auth(): it would set a new date and, for S3, hash the body (which may be
    # aws-chunked, or not here yet). canonical_request() takes the client's payload hash
    # from its header.
    canonical = signer.canonical_request(request)
    signature = signer.signature(signer.string_to_sign(request, canonical), request)
    signer._inject_signature_to_request(request, signature)
    changes["authorization"] = request.headers["Authorization"]
    return changes
