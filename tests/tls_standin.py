"""A throw-away certificate authority and server certificate for the TLS servers tests and
benchmarks run themselves (openssl): nothing outside this machine is ever contacted."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

CURVE = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_certificates(folder: Path, names: Sequence[str], addresses: Sequence[str]) -> None:
    """In `folder`: `ca.pem` (the CA clients trust), `srv.pem` and `srv.key` for `names` and
    `addresses`, and `cert.pem` (certificate and key in one file, as servers load it)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    subject = ("-subj", "/CN=stigmer-sandbox test CA")
    openssl("req", "-x509", *CURVE, "-days", "2", *subject, "-keyout", "ca.key", "-out", "ca.pem")
    san = ",".join([*(f"DNS:{n}" for n in names), *(f"IP:{a}" for a in addresses)])
    (folder / "ext.cnf").write_text(f"subjectAltName={san}\n")
    openssl("req", *CURVE, "-subj", "/CN=stand-in", "-keyout", "srv.key", "-out", "srv.csr")
    signed_by_ca = ("-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2")
    openssl(
        "x509", "-req", "-in", "srv.csr", *signed_by_ca, "-extfile", "ext.cnf", "-out", "srv.pem"
    )
    (folder / "cert.pem").write_text(
        (folder / "srv.pem").read_text() + (folder / "srv.key").read_text()
    )
    for name in ("ca.pem", "cert.pem"):
        (folder / name).chmod(0o644)
