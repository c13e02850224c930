"""The credentials broker beside a sandbox's egress gateway (issue 26).

A sandbox that uses secrets (`use_secrets`, credentials.py) holds only placeholders: one
random `stigmer-secret-…` per secret, in its environment. Its gateway's squid sends the
connections to the secrets' destinations to a broker container (mitmproxy with
dockerfiles/broker/stigmer_broker.py) that shares the gateway's network namespace and
listens on its loopback: it terminates their TLS with this installation's broker CA,
puts the values in, refuses placeholders sent anywhere else, and verifies upstream
certificates against the system store (plus the extra CA and a secret's own `ca`).

Where things are (host side):
- `<state_dir>/broker/ca/`: the CA, made once per project by mitmproxy itself in a
  throwaway broker container (its key mode 0600, never in a sandbox);
- `<state_dir>/broker/placeholders/<sandbox>.json`: the sandbox's placeholders (stable,
  so its container is not recreated for them);
- `<state_dir>/broker/bundles/`: the sandbox image's CA bundle plus the broker CA,
  mounted read-only over the image's bundle (tools already trust that path);
- `<gateway folder>/broker/secrets.json`: the values (0600, folder 0700), written at
  every `up` (a revoked or rotated secret holds from the next request), mounted only
  into the broker, deleted with the gateway.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import credentials, egress, engine, labels
from ..config import Settings
from ..errors import SandboxError
from ..images.services import ensure_broker_image

STATE_FOLDER = "broker"
CA_BASENAME = "mitmproxy"
CA_CERT = f"{CA_BASENAME}-ca-cert.pem"
CA_FILES = (f"{CA_BASENAME}-ca.pem", CA_CERT, f"{CA_BASENAME}-dhparam.pem")
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# What tools read for their trust store; each may replace the store, so each names the
# whole bundle (the image's own, plus the broker CA).
TRUST_VARIABLES = (
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "PIP_CERT",
    "GIT_SSL_CAINFO",
    "NODE_EXTRA_CA_CERTS",
    "AWS_CA_BUNDLE",
)
PORT = 3180  # on the gateway's loopback (egress_gateway.BROKER_PORT)
MEMORY = "256m"
PIDS = 64
READY_FILE = "broker-ready"
LOG_FILE = "broker.jsonl"
KIND = labels.CREDENTIALS_BROKER
CONFIG_LABEL = f"{labels.PREFIX}.config"
# In the broker container.
SECRETS_MOUNT = "/run/broker"
LOG_MOUNT = "/var/log/broker"
CA_MOUNT = "/etc/broker-ca"
RESOLV_MOUNT = "/etc/resolv.conf"
MITMDUMP = "/opt/broker/bin/mitmdump"
ADDON = "/opt/broker/addon/stigmer_broker.py"
READS = "/opt/broker/addon/stigmer_broker_io.py"  # bigger socket reads, loaded first
_MAKE_CA = (
    "import sys; from mitmproxy.certs import CertStore; "
    f"CertStore.from_store(sys.argv[1], {CA_BASENAME!r}, 2048)"
)
_lock = threading.Lock()


def state_folder(settings: Settings) -> Path:
    return settings.path("state_dir") / STATE_FOLDER


def _private_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Written whole or not at all (a rename), never readable by others meanwhile."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- the CA


def ensure_ca(settings: Settings) -> Path:
    """The broker CA's folder, made on first use (mitmproxy writes it, as the host's user,
    in a container without network: no host tool is needed)."""
    folder = state_folder(settings) / "ca"
    if all((folder / name).is_file() for name in CA_FILES):
        return folder
    with _lock:
        if all((folder / name).is_file() for name in CA_FILES):
            return folder
        image = ensure_broker_image(settings)
        parent = _private_folder(state_folder(settings))
        made = Path(tempfile.mkdtemp(dir=parent, prefix=".ca-"))
        try:
            spec = {
                "image": image,
                "entrypoint": ["/opt/broker/bin/python", "-c", _MAKE_CA, "/out"],
                "user": f"{os.getuid()}:{os.getgid()}",
                "network_mode": "none",
                "labels": labels.project_labels(KIND),
                "mounts": [_bind(made, "/out", read_only=False)],
            }
            with engine.engine_errors():
                container = engine.client().containers.create(**spec)
                try:
                    container.start()
                    code = container.wait(timeout=60).get("StatusCode")
                    tail = container.logs(tail=5).decode("utf-8", "replace").strip()
                finally:
                    container.remove(force=True)
            if code != 0 or not all((made / name).is_file() for name in CA_FILES):
                raise SandboxError("the broker CA could not be made", tail or f"exit {code}")
            for item in made.iterdir():
                os.chmod(item, 0o644 if item.name == CA_CERT else 0o600)
            os.chmod(made, 0o700)
            shutil.rmtree(folder, ignore_errors=True)
            made.rename(folder)
        finally:
            shutil.rmtree(made, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------- the sandbox side


def placeholders(settings: Settings, sandbox: str) -> dict[str, str]:
    """Sandbox `sandbox`'s placeholder for each secret in use, and for an AWS secret a
    second one (its secret key, under `<name>/secret-key`): kept across `up`s, new ones
    made for secrets it did not have."""
    path = _private_folder(state_folder(settings) / "placeholders") / f"{sandbox}.json"
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    names = [s.name for s in settings.secrets_in_use]
    names += [_secret_key(s.name) for s in settings.secrets_in_use if s.sign]
    wanted = {name: str(known.get(name) or credentials.new_placeholder()) for name in names}
    if any(known.get(name) != value for name, value in wanted.items()):
        _write_private(path, json.dumps({**known, **wanted}, indent=1, sort_keys=True))
    return wanted


def _secret_key(name: str) -> str:
    return f"{name}/secret-key"  # "/" is in no secret's name: no clash


def sandbox_environment(settings: Settings, sandbox: str) -> dict[str, str]:
    """The placeholders as the sandbox holds them: `NAME=<placeholder>`; for an AWS
    secret, the two variables AWS tools read (a key id and a secret key that sign
    nothing anywhere but through the broker), and no session token."""
    placed = placeholders(settings, sandbox)
    environment = {}
    for secret in settings.secrets_in_use:
        if secret.sign:
            environment[credentials.AWS_KEY_ID_VARIABLE] = placed[secret.name]
            environment[credentials.AWS_SECRET_KEY_VARIABLE] = placed[_secret_key(secret.name)]
        else:
            environment[secret.name] = placed[secret.name]
    return environment


def trust_bundle(settings: Settings, image: str) -> Path:
    """A file holding `image`'s CA bundle and the broker CA, made once per both."""
    ca_cert = (ensure_ca(settings) / CA_CERT).read_bytes()
    image_id = engine.image(image).id
    key = hashlib.sha256(image_id.encode() + ca_cert).hexdigest()[:16]
    path = state_folder(settings) / "bundles" / f"{key}.pem"
    if path.is_file():
        return path
    own = _file_of_image(image_id, SYSTEM_BUNDLE)
    if own is None:
        raise SandboxError(
            f"image {image} has no {SYSTEM_BUNDLE}: a sandbox with secrets must trust the "
            "broker CA there",
            "use an image with Debian's ca-certificates (the project's images have it)",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, (own.rstrip(b"\n") + b"\n" + ca_cert).decode("utf-8"), mode=0o644)
    return path


def _file_of_image(image_id: str, path: str) -> bytes | None:
    """One file of an image, read through a container that is created, never started."""
    import docker.errors

    api = engine.client().api
    with engine.engine_errors():
        created = api.create_container(
            image_id, command=["true"], labels=labels.project_labels(KIND)
        )
        try:
            stream, _stat = api.get_archive(created["Id"], path)
            data = b"".join(stream)
        except docker.errors.NotFound:
            return None
        finally:
            api.remove_container(created["Id"], force=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for member in archive.getmembers():
            if member.isfile():
                extracted = archive.extractfile(member)
                return extracted.read() if extracted else None
    return None


def sandbox_options(settings: Settings, sandbox: str, image: str) -> dict[str, Any]:
    """What a sandbox with secrets is created with: each secret's placeholder in its
    environment, and the broker CA trusted (the bundle mounted over the image's, and the
    variables tools read pointed at it)."""
    from docker.types import Mount

    bundle = trust_bundle(settings, image)
    environment = {
        **sandbox_environment(settings, sandbox),
        **dict.fromkeys(TRUST_VARIABLES, SYSTEM_BUNDLE),
    }
    mount = Mount(target=SYSTEM_BUNDLE, source=str(bundle), type="bind", read_only=True)
    return {"environment": environment, "mounts": [mount]}


# --------------------------------------------------------------------------- the broker side


def secrets_document(settings: Settings, sandbox: str) -> dict[str, Any]:
    """What the broker reads: each secret in use with its placeholder, value (read now)
    and destinations; an AWS secret also with how it signs and the placeholder of its
    secret key (which no request may carry)."""
    placed = placeholders(settings, sandbox)
    items = []
    for secret in settings.secrets_in_use:
        value = credentials.read_value(secret, settings.root)
        destinations = [_destination(egress.parse_entry(host)) for host in secret.hosts]
        item = {
            "name": secret.name,
            "placeholder": placed[secret.name],
            "value": value,
            "destinations": destinations,
            "header": secret.header,
        }
        if secret.sign:
            item |= {"sign": secret.sign, "unsendable": [placed[_secret_key(secret.name)]]}
        items.append(item)
    return {"secrets": items}


def _destination(entry: egress.Entry) -> dict[str, Any]:
    host = str(entry.network) if entry.network is not None else entry.host
    return {"kind": entry.kind, "host": host, "port": entry.port}


class Broker:
    """The broker container of one gateway: made, (re)started and removed with it."""

    def __init__(
        self,
        settings: Settings,
        sandbox: str,
        folder: Path,
        log_dir: Path,
        owner: Mapping[str, str],
    ) -> None:
        self.settings = settings
        self.sandbox = sandbox
        self.folder = folder / STATE_FOLDER  # the values: 0700, mounted into the broker only
        self.log_dir = log_dir
        self.owner = dict(owner)
        self.container_name = f"{sandbox}-egress-broker"
        self.values_written = False  # by this object: each `up` reads the sources once

    def write_secrets(self) -> None:
        """Values read now from their sources, for the broker's next request; the CAs
        the secrets name, for its next start."""
        document = secrets_document(self.settings, self.sandbox)
        trusted = b"".join(
            credentials.read_ca(s, self.settings.root) for s in self.settings.secrets_in_use
        )
        _private_folder(self.folder)
        _write_private(self.folder / "secrets.json", json.dumps(document))
        _write_private(self.folder / "trust.pem", trusted.decode("utf-8", "replace"), 0o644)
        self.values_written = True

    def serving(self, gateway: Any) -> bool:
        """Whether a broker made for this image and `gateway` runs and listens."""
        container = engine.find_container(self.container_name)
        return (
            container is not None
            and container.status == "running"
            and container.labels.get(CONFIG_LABEL) == self._config_hash(gateway)
            and (self.log_dir / READY_FILE).is_file()
        )

    def start(self, gateway: Any) -> None:
        """(Re)start the broker in `gateway`'s network namespace (the gateway runs): one
        made for another image or gateway is replaced."""
        wanted = self._config_hash(gateway)
        container = engine.find_container(self.container_name)
        if container is not None and container.labels.get(CONFIG_LABEL) != wanted:
            _remove(container)
            container = None
        if container is None:
            container = self._create(ensure_broker_image(self.settings), gateway, wanted)
        (self.log_dir / READY_FILE).unlink(missing_ok=True)
        with engine.engine_errors():
            if container.status == "running":
                container.kill()
            container.start()

    def raise_if_failed(self) -> None:
        """The broker's own error when it exited (the gateway waited for it in vain)."""
        container = engine.find_container(self.container_name)
        if container is None or container.status == "running":
            return
        with engine.engine_errors():
            tail = container.logs(tail=10).decode("utf-8", "replace").strip().splitlines()
        raise SandboxError(
            f"credentials broker {self.container_name} exited",
            tail[-1] if tail else f"see `docker logs {self.container_name}`",
            details=tuple(tail),
        )

    def _config_hash(self, gateway: Any) -> str:
        image = ensure_broker_image(self.settings)
        parts = [image, gateway.id, str(self.folder)]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def remove(self) -> None:
        """The container, and the values with it."""
        container = engine.find_container(self.container_name)
        if container is not None and container.labels.get(labels.OWNER) == self.sandbox:
            _remove(container)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _create(self, image: str, gateway: Any, config_hash: str) -> Any:
        ca = ensure_ca(self.settings)
        resolv = self.folder / "resolv.conf"
        _write_private(resolv, "nameserver 127.0.0.1\n", mode=0o644)  # the gateway's dnsmasq
        # `server=false`: the addon starts the proxy server once it is loaded and running
        # (see stigmer_broker.Broker.running), so the port the gateway waits for listens
        # only with the addon in place, whatever order mitmproxy's tasks run in.
        command = (
            f"cat {SYSTEM_BUNDLE} {SECRETS_MOUNT}/trust.pem > /tmp/trust.pem && "
            f"exec {MITMDUMP} --mode regular --listen-host 127.0.0.1 --listen-port {PORT} "
            f"-s {READS} -s {ADDON} --set server=false --set confdir={CA_MOUNT} "
            "--set ssl_verify_upstream_trusted_ca=/tmp/trust.pem --set termlog_verbosity=warn "
            "--set flow_detail=0 --set stream_large_bodies=10m"
        )
        spec = {
            "image": image,
            "name": self.container_name,
            "entrypoint": ["/bin/sh", "-c", command],
            "labels": {
                **labels.project_labels(KIND, config=config_hash),
                labels.OWNER: self.sandbox,
                **self.owner,
            },
            "network_mode": f"container:{gateway.id}",
            "user": f"{os.getuid()}:{os.getgid()}",
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges:true"],
            "read_only": True,
            "tmpfs": {"/tmp": "rw,nosuid,nodev,size=16m"},
            "mem_limit": MEMORY,
            "memswap_limit": MEMORY,
            "pids_limit": PIDS,
            "restart_policy": {"Name": "no"},
            "environment": {
                "BROKER_SECRETS": f"{SECRETS_MOUNT}/secrets.json",
                "BROKER_LOG": f"{LOG_MOUNT}/{LOG_FILE}",
                "BROKER_READY": f"{LOG_MOUNT}/{READY_FILE}",
                "HOME": "/tmp",
            },
            "mounts": [
                _bind(ca, CA_MOUNT, read_only=True),
                _bind(self.folder, SECRETS_MOUNT, read_only=True),
                _bind(resolv, RESOLV_MOUNT, read_only=True),
                _bind(self.log_dir, LOG_MOUNT, read_only=False),
            ],
        }
        with engine.engine_errors():
            return engine.client().containers.create(**spec)


def _bind(source: Path, target: str, read_only: bool) -> Any:
    from docker.types import Mount

    return Mount(target=target, source=str(source), type="bind", read_only=read_only)


def _remove(container: Any) -> None:
    import docker.errors

    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        raise SandboxError(f"cannot remove {container.name}: {exc.explanation}") from None


def records(lines: Sequence[str]) -> list[dict[str, Any]]:
    """The broker's decisions as egress audit records: a placeholder refused (a leak
    attempt: destination, secret, where it was found) or secrets put into a request."""
    found = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict) or event.get("event") not in ("refused", "brokered"):
            continue
        host, _, port = str(event.get("destination", "")).rpartition(":")
        refused = event["event"] == "refused"
        found.append(
            {
                "time": float(event.get("time", 0)),
                "source": event.get("client"),
                "via": "broker",
                "name": host,
                "address": None,
                "port": int(port) if port.isdigit() else None,
                "decision": "refused" if refused else "allowed",
                "rule": f"secret-placeholder:{event.get('secret')}:{event.get('where')}"
                if refused
                else f"secrets:{','.join(event.get('secrets', []))}",
            }
        )
    return found
