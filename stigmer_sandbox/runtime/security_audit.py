"""`sandbox.audit`: a running sandbox checked against SECURITY.md, one line per property.

Everything here is read from `docker inspect` or observed inside the sandbox;
nothing is taken from configuration on trust.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .sandbox import Sandbox

SETUID_ALLOWLIST = "/usr/local/share/stigmer-sandbox/setuid-allowlist.txt"


@dataclass(frozen=True)
class Finding:
    """One property: its SECURITY.md number, whether it holds, and the evidence."""

    item: int
    name: str
    passed: bool
    evidence: str


def _user(box: Sandbox, attrs: dict[str, Any]) -> Finding:
    configured = attrs["Config"].get("User", "")
    uid = box.exec("id -u").stdout.strip()
    ok = configured not in ("", "0", "root") and uid != "0"
    return Finding(1, "non-root user", ok, f"Config.User={configured!r}, id -u={uid}")


def _namespaces(_box: Sandbox, attrs: dict[str, Any]) -> Finding:
    host = attrs["HostConfig"]
    shared = [
        k
        for k in ("NetworkMode", "PidMode", "IpcMode", "UTSMode", "UsernsMode")
        if str(host.get(k) or "") == "host"
    ]
    ok = not host.get("Privileged") and not shared and not host.get("Devices")
    return Finding(
        3,
        "not privileged, no host namespaces or devices",
        ok,
        f"Privileged={host.get('Privileged')}, host namespaces={shared or 'none'}",
    )


def _capabilities(box: Sandbox, _attrs: dict[str, Any]) -> Finding:
    status = box.exec("cat /proc/self/status").stdout
    cap = re.search(r"^CapEff:\s+(\S+)", status, re.MULTILINE)
    nnp = re.search(r"^NoNewPrivs:\s+(\S+)", status, re.MULTILINE)
    cap_eff, no_new = (cap.group(1) if cap else "?"), (nnp.group(1) if nnp else "?")
    ok = set(cap_eff) == {"0"} and no_new == "1"
    return Finding(
        4,
        "all capabilities dropped, no new privileges",
        ok,
        f"CapEff={cap_eff}, NoNewPrivs={no_new}",
    )


def _confinement(_box: Sandbox, attrs: dict[str, Any]) -> Finding:
    options = attrs["HostConfig"].get("SecurityOpt") or []
    ok = not any("unconfined" in option for option in options)
    return Finding(5, "seccomp/AppArmor not unconfined", ok, f"SecurityOpt={options}")


def _limits(_box: Sandbox, attrs: dict[str, Any]) -> list[Finding]:
    host = attrs["HostConfig"]
    memory, swap = host.get("Memory") or 0, host.get("MemorySwap") or 0
    return [
        Finding(
            6,
            "process limit",
            (host.get("PidsLimit") or 0) > 0,
            f"PidsLimit={host.get('PidsLimit')}",
        ),
        Finding(
            7,
            "memory limit, swap equal to it",
            memory > 0 and swap == memory,
            f"Memory={memory}, MemorySwap={swap}",
        ),
        Finding(
            8, "CPU limit", (host.get("NanoCpus") or 0) > 0, f"NanoCpus={host.get('NanoCpus')}"
        ),
    ]


def _filesystem(box: Sandbox, attrs: dict[str, Any]) -> Finding:
    host = attrs["HostConfig"]
    tmpfs = (host.get("Tmpfs") or {}).get("/tmp", "")
    sized = "size=" in tmpfs
    writes_etc = box.exec("touch /etc/.stigmer-audit 2>/dev/null && rm /etc/.stigmer-audit")
    read_only = host.get("ReadonlyRootfs")
    ok = sized and (not read_only or writes_etc.exit_code != 0)
    return Finding(
        9,
        "sized /tmp tmpfs; read-only root where configured",
        ok,
        f"/tmp {tmpfs or 'not a tmpfs'}, ReadonlyRootfs={read_only}",
    )


def _output_cap(box: Sandbox, _attrs: dict[str, Any]) -> Finding:
    result = box.exec("head -c 200000 /dev/zero | tr '\\0' a; exit 7", output_limit=10000)
    ok = result.truncated.get("stdout") and result.exit_code == 7 and "truncated" in result.stdout
    return Finding(
        10,
        "output capped with a marker, exit code kept",
        bool(ok),
        f"kept {len(result.stdout)} of {result.output_bytes.get('stdout')} bytes, "
        f"exit {result.exit_code}",
    )


def _timeout(box: Sandbox, _attrs: dict[str, Any]) -> Finding:
    result = box.exec("setsid sleep 4711 & sleep 4712", timeout=1)
    left = box.exec("ps -eo args").stdout
    ok = result.timed_out and "sleep 4711" not in left and "sleep 4712" not in left
    return Finding(
        11,
        "timeouts kill the whole tree",
        ok,
        f"cause={result.cause}, leftovers={'none' if ok else 'found'}",
    )


def _causes(box: Sandbox, _attrs: dict[str, Any]) -> Finding:
    killed = box.exec("kill -TERM $$")
    ok = killed.exit_code == 143 and killed.cause == "signal"
    return Finding(
        12, "exit causes told apart", ok, f"kill -TERM $$ → {killed.exit_code} ({killed.cause})"
    )


def _network(_box: Sandbox, attrs: dict[str, Any]) -> Finding:
    mode = attrs["HostConfig"].get("NetworkMode")
    return Finding(
        13,
        "network can be switched off",
        mode in ("bridge", "none", "default"),
        f"NetworkMode={mode} (network: none is one setting away)",
    )


def _mounts(_box: Sandbox, attrs: dict[str, Any]) -> list[Finding]:
    mounts = attrs.get("Mounts", [])
    socket = [m["Source"] for m in mounts if "docker.sock" in m["Source"]]
    credentials_rw = [
        m["Destination"] for m in mounts if m["Destination"].endswith((".aws", ".kube")) and m["RW"]
    ]
    shared = [m["Destination"] for m in mounts if "shared" in (m.get("Propagation") or "")]
    return [
        Finding(
            14,
            "no Docker socket; credentials read-only",
            not socket and not credentials_rw,
            f"socket mounts={socket or 'none'}, writable credentials={credentials_rw or 'none'}",
        ),
        Finding(
            15,
            "mount propagation not shared",
            not shared,
            f"propagation: {sorted({m.get('Propagation') or '-' for m in mounts})}",
        ),
    ]


def _health(_box: Sandbox, attrs: dict[str, Any]) -> Finding:
    test = (attrs["Config"].get("Healthcheck") or {}).get("Test")
    status = (attrs["State"].get("Health") or {}).get("Status", "none")
    return Finding(
        16, "health check defined and reported", bool(test), f"Test={test}, status={status}"
    )


def _setuid(box: Sandbox, _attrs: dict[str, Any]) -> Finding:
    found = box.exec("find / -xdev -perm /6000 -type f 2>/dev/null").stdout.split()
    allowed = box.exec(f"sed -e 's/#.*//' {SETUID_ALLOWLIST} 2>/dev/null").stdout.split()
    extra = [path for path in found if path not in allowed]
    return Finding(
        17, "no setuid/setgid binaries beyond the allowlist", not extra, f"found {found or 'none'}"
    )


def _ownership(box: Sandbox, _attrs: dict[str, Any]) -> Finding:
    box.exec("echo audit > /workspace/.stigmer-audit")
    path = box.settings.path("workspace") / ".stigmer-audit"
    owner = path.stat().st_uid if path.exists() else -1
    path.unlink(missing_ok=True)
    expected = box.sandbox_user[0]
    return Finding(
        18,
        "workspace files owned by the expected user",
        owner == expected,
        f"owner uid {owner}, expected {expected}",
    )


CHECKS: list[Callable[[Sandbox, dict[str, Any]], Finding | list[Finding]]] = [
    _user,
    _namespaces,
    _capabilities,
    _confinement,
    _limits,
    _filesystem,
    _output_cap,
    _timeout,
    _causes,
    _network,
    _mounts,
    _health,
    _setuid,
    _ownership,
]


def audit(box: Sandbox) -> list[Finding]:
    """Every applicable SECURITY.md property of a running sandbox, with its evidence."""
    attrs = box.up().inspect()
    findings: list[Finding] = []
    for check in CHECKS:
        found = check(box, attrs)
        findings.extend(found if isinstance(found, list) else [found])
    return sorted(findings, key=lambda f: f.item)
