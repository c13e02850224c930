"""Secrets a sandbox may use but never read: their definitions, sources and placeholders.

A secret is configured on the host (the `secrets` key of the `stigmer:` section) with a
source (an environment variable, a file, or a command whose output is the value), the
destinations it may be sent to (egress entries, docs/egress.md) and how a request
carries it (a header template with `{value}`, or its placeholder substituted wherever
it appears). A sandbox is given a random placeholder per secret, never the value; the
broker on the egress path puts the value into requests to that secret's destinations
only (issue 26).

An AWS secret (`sign: aws-sigv4`) is a key pair instead: its value is the JSON of an AWS
`credential_process` (`aws configure export-credentials --format process`), or it comes
from a profile of the shared credentials file (`from_aws_profile`). The sandbox holds a
placeholder key id and secret key; the broker re-signs the requests signed with them.

This module reads values only when asked (`read_value`) and never puts one in an error,
a listing or a log: errors name the secret and its source, not what it holds.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import secrets as random_tokens
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

# The variable the sandbox sees: a shell-safe environment variable name.
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
# RFC 9110 field-name token characters.
HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
SOURCES = {
    "from_env": "environment variable",
    "from_file": "file",
    "from_command": "command",
    "from_aws_profile": "AWS profile",
}
KEYS = (*SOURCES, "hosts", "header", "ca", "sign")
# How the broker signs requests for a secret: AWS Signature Version 4, re-signed with the
# real key (the sandbox signs with placeholder keys).
AWS_SIGV4 = "aws-sigv4"
SIGNERS = (AWS_SIGV4,)
# The variables a sandbox holds for an AWS secret: what every AWS SDK and CLI reads.
AWS_KEY_ID_VARIABLE = "AWS_ACCESS_KEY_ID"
AWS_SECRET_KEY_VARIABLE = "AWS_SECRET_ACCESS_KEY"
# The shared credentials file, and the variable that moves it (as the AWS tools read it).
AWS_CREDENTIALS_FILE = "~/.aws/credentials"
AWS_CREDENTIALS_VARIABLE = "AWS_SHARED_CREDENTIALS_FILE"
VALUE_MARK = "{value}"
# Every placeholder starts so: the broker recognises one of any sandbox's in any request.
PLACEHOLDER_PREFIX = "stigmer-secret-"
MAX_VALUE = 64 * 1024  # far above any token or key; a file this big is not a credential
COMMAND_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Secret:
    """One configured secret: where its value comes from and where it may go."""

    name: str
    source: str  # a key of SOURCES
    where: str  # the variable, the path or the command
    hosts: tuple[str, ...]
    header: str = ""  # "Name: template with {value}"; "" substitutes the placeholder
    ca: str = ""  # a CA bundle (PEM) the broker trusts for these hosts, besides the system's
    sign: str = ""  # a key of SIGNERS: the broker signs requests with the value

    @property
    def header_name(self) -> str:
        return self.header.split(":", 1)[0].strip()

    @property
    def applied(self) -> str:
        """How a request carries it, in words."""
        if self.sign == AWS_SIGV4:
            return "AWS requests re-signed (SigV4)"
        if self.header:
            return f"{self.header_name} header"
        return "its placeholder replaced in request headers"

    def described(self) -> dict[str, Any]:
        """What may be shown of it: everything but the value."""
        return {
            "name": self.name,
            "source": SOURCES[self.source],
            "from": self.where,
            "hosts": list(self.hosts),
            "applied": self.applied,
        }


def _problem(where: str, name: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{where}: secret {name!r} {problem}", fix)


def parse_secret(name: object, spec: object, where: str) -> Secret:
    """One definition, checked: a ConfigError naming the secret and what to fix."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(
            f"{where}: secret name {name!r} is not a variable name",
            "use letters, digits and '_', not starting with a digit (e.g. API_TOKEN)",
        )
    if not isinstance(spec, Mapping):
        raise _problem(
            where, name, "must be a mapping", "give from_env, from_file or from_command and hosts"
        )
    unknown = sorted(str(key) for key in spec if key not in KEYS)
    if unknown:
        raise _problem(
            where, name, f"has an unknown key {unknown[0]!r}", f"keys are {', '.join(KEYS)}"
        )
    given = [key for key in SOURCES if key in spec]
    if len(given) != 1:
        what = "no source" if not given else f"two sources ({given[0]}, {given[1]})"
        raise _problem(
            where, name, f"has {what}", "give exactly one of from_env, from_file, from_command"
        )
    source = given[0]
    origin = spec[source]
    if not isinstance(origin, str) or not origin.strip() or "\0" in origin:
        raise _problem(where, name, f"has an empty {source}", f"name the {SOURCES[source]} to read")
    sign = _sign(spec.get("sign", ""), where, name)
    header = _header(spec.get("header", ""), where, name)
    if sign and header:
        raise _problem(
            where, name, "has both sign and header", "a signed secret sets no header: drop one"
        )
    if source == "from_aws_profile" and not sign:
        raise _problem(where, name, "reads an AWS profile without sign", f"add sign: {AWS_SIGV4}")
    return Secret(
        name,
        source,
        origin.strip(),
        _hosts(spec.get("hosts"), where, name),
        header,
        _ca(spec.get("ca", ""), where, name),
        sign,
    )


def _sign(value: object, where: str, name: str) -> str:
    if value in ("", None):
        return ""
    if value not in SIGNERS:
        raise _problem(
            where, name, f"has an unknown sign {value!r}", f"sign may be {', '.join(SIGNERS)}"
        )
    return str(value)


def _ca(value: object, where: str, name: str) -> str:
    if value in ("", None):
        return ""
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise _problem(where, name, "has a ca that is not a path", "name a PEM file")
    return value.strip()


def read_ca(secret: Secret, root: Path) -> bytes:
    """The PEM bundle of a secret's `ca` (empty without one); a ConfigError naming the
    secret when it is missing or holds no certificate."""
    if not secret.ca:
        return b""
    path = root / os.path.expanduser(secret.ca)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _problem(
            "secrets", secret.name, f"reads ca {secret.ca}: {exc.strerror or exc}", "check the path"
        ) from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise _problem(
            "secrets",
            secret.name,
            f"has a ca {secret.ca} with no PEM certificate",
            "name a PEM bundle",
        )
    return data


def _hosts(value: object, where: str, name: str) -> tuple[str, ...]:
    from . import egress

    entries = egress.split_entries(value) if isinstance(value, str) else value
    if not isinstance(entries, Sequence) or isinstance(entries, str) or not entries:
        raise _problem(
            where,
            name,
            "has no hosts",
            "list the destinations it may be sent to, e.g. [api.example.com]",
        )
    checked = []
    for entry in entries:
        problem = (
            egress.entry_problem(entry)
            if isinstance(entry, str) and entry.strip()
            else (f"empty or non-text entry {entry!r}")
        )
        if problem:
            raise _problem(
                where, name, f"has a bad host: {problem}", "hosts use the egress entry syntax"
            )
        checked.append(entry.strip())
    return tuple(checked)


def _header(value: object, where: str, name: str) -> str:
    if value in ("", None):
        return ""
    fix = 'write it like "Authorization: Bearer {value}"'
    if not isinstance(value, str) or ":" not in value:
        raise _problem(where, name, "has a header that is not 'Name: template'", fix)
    header_name, template = (part.strip() for part in value.split(":", 1))
    if not HEADER_NAME_RE.match(header_name):
        raise _problem(where, name, f"has a bad header name {header_name!r}", fix)
    if VALUE_MARK not in template:
        raise _problem(where, name, "has a header template without {value}", fix)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in template):
        raise _problem(where, name, "has a control character in its header template", fix)
    return f"{header_name}: {template}"


def parse_all(definitions: object, where: str) -> dict[str, Secret]:
    """Every definition of the `secrets` key, checked."""
    if not isinstance(definitions, Mapping):
        raise ConfigError(
            f"{where}: key 'secrets' must be a mapping of names to definitions",
            "see docs/local-sandbox.md, Credentials",
        )
    return {str(name): parse_secret(name, spec, where) for name, spec in definitions.items()}


def chosen(definitions: Mapping[str, Any], names: Sequence[str], where: str) -> list[Secret]:
    """The secrets named (`--secret`, `use_secrets`), each defined: an unknown name is
    one ConfigError listing the defined ones."""
    known = parse_all(definitions, where)
    picked: list[Secret] = []
    for name in names:
        if name not in known:
            defined = ", ".join(sorted(known)) or "none"
            raise ConfigError(
                f"{where}: unknown secret {name!r} (defined: {defined})",
                "define it under the 'secrets' key of invoke.yaml",
            )
        if known[name] not in picked:
            picked.append(known[name])
    signers = [secret.name for secret in picked if secret.sign]
    if len(signers) > 1:
        raise ConfigError(
            f"{where}: secrets {signers[0]!r} and {signers[1]!r} both sign AWS requests",
            f"a sandbox holds one AWS key pair ({AWS_KEY_ID_VARIABLE}): give it one of them",
        )
    return picked


def read_value(secret: Secret, root: Path, environ: Mapping[str, str] | None = None) -> str:
    """The secret's value, read now from its source (a trailing newline dropped); a
    ConfigError naming the secret and its source when it cannot be had."""
    environ = os.environ if environ is None else environ
    readers = {
        "from_env": _from_env,
        "from_file": _from_file,
        "from_command": _from_command,
        "from_aws_profile": _from_aws_profile,
    }
    value = readers[secret.source](secret, root, environ)
    if secret.sign == AWS_SIGV4:
        return json.dumps(aws_credentials(secret, value), sort_keys=True)
    value = value[:-1] if value.endswith("\n") else value
    value = value[:-1] if value.endswith("\r") else value
    if not value:
        raise _problem("secrets", secret.name, f"is empty ({_origin(secret)})", "give it a value")
    if len(value) > MAX_VALUE:
        raise _problem(
            "secrets",
            secret.name,
            f"is over {MAX_VALUE} bytes ({_origin(secret)})",
            "point it at the credential only",
        )
    if any(ch in value for ch in "\r\n\0"):
        raise _problem(
            "secrets",
            secret.name,
            f"holds a line break or NUL ({_origin(secret)})",
            "a request header cannot carry it: store the value on one line",
        )
    return value


def _origin(secret: Secret) -> str:
    return f"{SOURCES[secret.source]} {secret.where}"


def aws_credentials(secret: Secret, value: str) -> dict[str, str]:
    """An AWS secret's value (credential_process JSON) as `AccessKeyId`, `SecretAccessKey`
    and, for temporary credentials, `SessionToken`; a ConfigError naming the secret and
    what is wrong, never the value."""
    document = _aws_document(secret, value)
    found: dict[str, str] = {}
    for key in ("AccessKeyId", "SecretAccessKey", "SessionToken"):
        item = document.get(key)
        if item in (None, "") and key == "SessionToken":
            continue
        if not isinstance(item, str) or not item:
            raise _bad_aws(secret, f"has no {key}")
        # Each goes into a request header or its signature: no line breaks, no controls.
        if any(ord(ch) < 33 or ord(ch) == 127 for ch in item):
            raise _bad_aws(secret, f"has a space or control character in {key}")
        found[key] = item
    if "/" in found["AccessKeyId"]:
        raise _bad_aws(secret, "has a '/' in AccessKeyId (it is part of the signature's scope)")
    return found


def _aws_document(secret: Secret, value: str) -> dict[str, Any]:
    if not value.strip():
        raise _problem("secrets", secret.name, f"is empty ({_origin(secret)})", "give it a value")
    if len(value) > MAX_VALUE:
        raise _bad_aws(secret, f"is over {MAX_VALUE} bytes")
    try:
        document = json.loads(value)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise _bad_aws(secret, "is not AWS credentials JSON")
    return document


def _bad_aws(secret: Secret, problem: str) -> ConfigError:
    return _problem(
        "secrets",
        secret.name,
        f"{problem} ({_origin(secret)})",
        'give {"AccessKeyId": ..., "SecretAccessKey": ...} as '
        "`aws configure export-credentials --format process` prints it",
    )


def _from_env(secret: Secret, _root: Path, environ: Mapping[str, str]) -> str:
    if secret.where not in environ:
        raise _problem(
            "secrets",
            secret.name,
            f"reads {_origin(secret)}, which is not set",
            f"export {secret.where}",
        )
    return environ[secret.where]


def _from_file(secret: Secret, root: Path, _environ: Mapping[str, str]) -> str:
    path = root / os.path.expanduser(secret.where)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_VALUE + 2)
    except OSError as exc:
        raise _problem(
            "secrets",
            secret.name,
            f"reads {_origin(secret)}: {exc.strerror or exc}",
            "check the path and its permissions",
        ) from None
    return _text(secret, data)


def _from_command(secret: Secret, root: Path, environ: Mapping[str, str]) -> str:
    try:
        argv = shlex.split(secret.where)
        done = subprocess.run(
            argv,
            cwd=root,
            env=dict(environ),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
    except ValueError as exc:  # unbalanced quotes
        raise _problem(
            "secrets",
            secret.name,
            f"has a command that does not parse: {exc}",
            "quote it like a shell line",
        ) from None
    except subprocess.TimeoutExpired:
        raise _problem(
            "secrets",
            secret.name,
            f"{_origin(secret)} did not finish in {COMMAND_TIMEOUT_S:.0f} s",
            "run it by hand to see why",
        ) from None
    except OSError as exc:
        raise _problem(
            "secrets",
            secret.name,
            f"{_origin(secret)} cannot start: {exc.strerror or exc}",
            "check the command",
        ) from None
    if done.returncode != 0:
        # Its output is not shown: a failing credential helper may still print secrets.
        raise _problem(
            "secrets",
            secret.name,
            f"{_origin(secret)} exited {done.returncode}",
            "run it by hand to see why",
        )
    return _text(secret, done.stdout)


def _from_aws_profile(secret: Secret, root: Path, environ: Mapping[str, str]) -> str:
    """The static keys of a profile of the shared credentials file, as credential_process
    JSON (profiles that get keys some other way, SSO or a role, go through
    `from_command: aws configure export-credentials --profile NAME --format process`)."""
    where = environ.get(AWS_CREDENTIALS_VARIABLE) or AWS_CREDENTIALS_FILE
    path = root / os.path.expanduser(where)
    parser = configparser.RawConfigParser()
    try:
        with path.open(encoding="utf-8") as handle:
            parser.read_file(handle)
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        problem = exc.strerror if isinstance(exc, OSError) else "it does not parse"
        raise _problem(
            "secrets",
            secret.name,
            f"reads AWS profile {secret.where} from {where}: {problem or exc}",
            f"check the file, or set {AWS_CREDENTIALS_VARIABLE}",
        ) from None
    if not parser.has_section(secret.where):
        raise _problem(
            "secrets",
            secret.name,
            f"reads AWS profile {secret.where}, which {where} does not have",
            "name a profile of that file",
        )
    profile = parser[secret.where]
    keys = {
        "AccessKeyId": profile.get("aws_access_key_id", "").strip(),
        "SecretAccessKey": profile.get("aws_secret_access_key", "").strip(),
        "SessionToken": profile.get("aws_session_token", "").strip(),
    }
    if not keys["AccessKeyId"] or not keys["SecretAccessKey"]:
        raise _problem(
            "secrets",
            secret.name,
            f"reads AWS profile {secret.where}, which holds no static keys",
            "use from_command: aws configure export-credentials "
            f"--profile {secret.where} --format process",
        )
    return json.dumps({k: v for k, v in keys.items() if v})


def _text(secret: Secret, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _problem(
            "secrets",
            secret.name,
            f"is not UTF-8 text ({_origin(secret)})",
            "store the credential as text",
        ) from None


def new_placeholder() -> str:
    """A fresh placeholder: the prefix the broker knows, then 128 random bits."""
    return PLACEHOLDER_PREFIX + random_tokens.token_hex(16)


def listing(
    definitions: Mapping[str, Any],
    in_use: Sequence[str],
    root: Path,
    check: bool = False,
    environ: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One row per defined secret (what `described` shows, and whether sandboxes get it);
    with `check`, each source is read now and the row says whether it gave a value,
    never what."""
    rows = []
    for secret in parse_all(definitions, "secrets").values():
        row = {**secret.described(), "in_use": secret.name in in_use}
        if check:
            try:
                read_value(secret, root, environ)
            except ConfigError as exc:
                row["readable"], row["problem"] = False, exc.message.split(": ", 1)[-1]
            else:
                row["readable"], row["problem"] = True, ""
        rows.append(row)
    return rows
