"""`sandbox.audit`: a running sandbox checked against SECURITY.md, one line per property.

Every verdict rests on what a command observes inside the sandbox (its
/proc/self/status, the cgroup files, /proc/self/mountinfo, a write that must
fail, interfaces, its parent processes) or on what the engine observes (health).
`docker inspect` is read only where nothing inside can tell, and the evidence
says which is which.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .. import egress, engine, isolation, labels, policy
from ..checks import CheckResult, Status, verdict
from . import egress_gateway, network
from .client.commands import ExecResult
from .sandbox import Sandbox

EGRESS_ITEM = 33  # SECURITY.md's egress property
KERNEL_ITEM = 43  # SECURITY.md's kernel isolation property (isolation: gvisor)
SETUID_ALLOWLIST = "/usr/local/share/stigmer-sandbox/setuid-allowlist.txt"
COMMAND_TIMEOUT_S = 60.0
# Long enough for the sandbox health check (every 5 s) to report at least once.
HEALTH_WAIT_S = 30.0
CGROUP = "/sys/fs/cgroup"
# cgroup v1 writes "no limit" as the largest page-aligned 64-bit number.
UNLIMITED = 2**62
# Namespaces a sandbox must not share with the host, and their `docker inspect` key.
NAMESPACE_MODES = {"net": "NetworkMode", "pid": "PidMode", "ipc": "IpcMode", "uts": "UTSMode"}
# What Docker puts in /dev without --device: anything else is a host device.
STANDARD_DEVICES = frozenset(
    f"/dev/{name}"
    for name in ("null", "zero", "full", "random", "urandom", "tty", "console", "pts/ptmx")
)
# PID 1 and the agent run as root holding only these, so commands (another uid,
# no capabilities) cannot signal, trace or read them (SECURITY.md 25).
AGENT_CAPABILITIES = frozenset(policy.AGENT_CAPABILITIES)
CAPABILITY_NAMES = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
]

Verdict = tuple[Status, str]


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo."""

    root: str  # the mounted path inside its filesystem: the host folder of a bind mount
    point: str
    options: tuple[str, ...]
    propagation: tuple[str, ...]  # shared:N, master:N; empty when private
    fstype: str
    super_options: tuple[str, ...]


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of /proc/<pid>/mountinfo (see proc(5))."""
    mounts = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, fs = left.split(), right.split()
        if len(fields) < 6 or len(fs) < 3:
            continue
        mounts.append(
            Mount(
                root=_unescape(fields[3]),
                point=_unescape(fields[4]),
                options=tuple(fields[5].split(",")),
                propagation=tuple(fields[6:]),
                fstype=fs[0],
                super_options=tuple(fs[2].split(",")),
            )
        )
    return mounts


def capability_names(mask: str) -> list[str]:
    """The capabilities in a hex mask from /proc/<pid>/status (`CapEff:` etc.)."""
    bits = int(mask, 16) if re.fullmatch(r"[0-9a-fA-F]+", mask) else 0
    return [
        CAPABILITY_NAMES[n] if n < len(CAPABILITY_NAMES) else f"cap{n}"
        for n in range(bits.bit_length())
        if bits >> n & 1
    ]


def status_fields(text: str) -> dict[str, str]:
    """`Key: value` lines of /proc/<pid>/status; `Uid` keeps only the real uid."""
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.split()[0] if value.split() else ""
    return fields


class Unobserved(Exception):
    """A command meant to observe the sandbox did not run as it should."""


def _run(box: Sandbox, command: str | Sequence[str], allowed: Sequence[int] = (0,)) -> ExecResult:
    """`command`'s result; raises `Unobserved` when its exit code is not `allowed`."""
    result = box.exec(command, timeout=COMMAND_TIMEOUT_S)
    if result.exit_code not in allowed:
        shown = " ".join((command if isinstance(command, str) else shlex.join(command)).split())
        said = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise Unobserved(f"`{shown[:60]}` exited {result.exit_code}: {said[-1][:120]}")
    return result


def _output(box: Sandbox, command: str | Sequence[str]) -> str:
    return _run(box, command).stdout.strip()


def _first_readable(box: Sandbox, *paths: str) -> tuple[str, str]:
    """The first of `paths` a command can read, and its content; ("", "") if none."""
    # Try reading rather than test -r: without AppArmor its files look readable and
    # fail with EINVAL.
    script = (
        'for f; do if text=$(cat "$f" 2>/dev/null); then echo "$f"; echo "$text"; exit; fi; done'
    )
    path, _, content = _output(box, ["bash", "-c", script, "audit", *paths]).partition("\n")
    return path, content.strip()


def _cgroup(box: Sandbox, v2_file: str, v1_file: str) -> tuple[str, str]:
    return _first_readable(box, f"{CGROUP}/{v2_file}", f"{CGROUP}/{v1_file}")


def _status_of(box: Sandbox, pid: str) -> dict[str, str]:
    return status_fields(_output(box, f"cat /proc/{pid}/status"))


def _mounts(box: Sandbox) -> list[Mount]:
    return parse_mountinfo(_output(box, "cat /proc/self/mountinfo"))


def _user(box: Sandbox, attrs: dict[str, Any]) -> Verdict:
    image_user = engine.image(attrs["Image"]).attrs["Config"].get("User") or ""
    container_user = attrs["Config"].get("User") or ""
    uid = _output(box, "id -u")
    ok = image_user.split(":")[0] not in ("", "0", "root") and uid != "0"
    evidence = f"image User={image_user!r}, a command's id -u={uid}"
    if container_user.split(":")[0] in ("0", "root"):
        evidence += (
            f"; container User={container_user!r} by design: PID 1 and the agent run as "
            "root so that commands cannot touch them (item 25)"
        )
    return verdict(ok), evidence


def _host_namespaces() -> dict[str, str]:
    """This process's namespaces when the engine runs on this machine, else none."""
    if not engine.engine_url().startswith("unix://"):
        return {}
    try:
        return {name: os.readlink(f"/proc/self/ns/{name}") for name in NAMESPACE_MODES}
    except OSError:  # no /proc here: the engine runs in a VM (Docker Desktop)
        return {}


def _isolation(box: Sandbox, attrs: dict[str, Any]) -> Verdict:
    host = attrs["HostConfig"]
    links = _output(box, ["readlink", *(f"/proc/self/ns/{n}" for n in NAMESPACE_MODES)])
    inside = dict(zip(NAMESPACE_MODES, links.split(), strict=False))
    outside = _host_namespaces()
    shared = [
        name
        for name, mode in NAMESPACE_MODES.items()
        if host.get(mode) == "host" or (outside and inside.get(name) == outside.get(name))
    ]
    bounding = capability_names(_status_of(box, "1").get("CapBnd", ""))
    devices = _output(box, "find /dev -type b -o -type c").split()
    extra = [d for d in devices if d not in STANDARD_DEVICES and not d.startswith("/dev/pts/")]
    privileged = bool(host.get("Privileged")) or "SYS_ADMIN" in bounding
    compared = "compared with this host's" if outside else "from docker inspect: remote engine"
    evidence = (
        f"shared namespaces: {', '.join(shared) or 'none'} ({compared}); "
        f"PID 1 bounding set: {', '.join(bounding) or 'empty'}; "
        f"extra devices in /dev: {', '.join(extra) or 'none'}"
    )
    return verdict(not privileged and not shared and not extra), evidence


def _capabilities(box: Sandbox, _attrs: dict[str, Any]) -> Verdict:
    status = _status_of(box, "self")
    cap_eff, cap_prm, no_new = (status.get(k, "?") for k in ("CapEff", "CapPrm", "NoNewPrivs"))
    ok = set(cap_eff + cap_prm) == {"0"} and no_new == "1"
    return verdict(ok), f"a command's CapEff={cap_eff}, CapPrm={cap_prm}, NoNewPrivs={no_new}"


def _confinement(box: Sandbox, _attrs: dict[str, Any]) -> Verdict:
    seccomp = _status_of(box, "self").get("Seccomp", "?")
    _path, label = _first_readable(
        box, "/proc/self/attr/apparmor/current", "/proc/self/attr/current"
    )
    # Without AppArmor or SELinux in the kernel the file exists but cannot be read.
    shown = label or "none (no AppArmor or SELinux in this kernel)"
    ok = seccomp == "2" and "unconfined" not in label
    return verdict(ok), f"a command's Seccomp={seccomp} (2: filtered), LSM label: {shown}"


def _pids(box: Sandbox, attrs: dict[str, Any]) -> Verdict:
    path, value = _cgroup(box, "pids.max", "pids/pids.max")
    if not path and attrs["HostConfig"].get("Runtime") in isolation.RUNTIME_ARGS:
        return _gvisor_pids(box, attrs)
    ok = value.isdigit() and int(value) > 0
    return verdict(ok), f"{path or 'pids.max'}={value or 'unreadable'}"


def _gvisor_pids(box: Sandbox, attrs: dict[str, Any]) -> Verdict:
    """Under gVisor no cgroup file shows inside: what holds commands is RLIMIT_NPROC in
    gVisor's kernel (read by a command), the engine's limit bounding gVisor's own tasks."""
    nproc = _output(box, ["bash", "-c", "ulimit -u"])
    host = attrs["HostConfig"].get("PidsLimit") or 0
    ok = nproc.isdigit() and int(nproc) > 0 and host > 0
    evidence = (
        f"a command's process limit (RLIMIT_NPROC in gVisor's kernel)={nproc or 'unreadable'}; "
        f"engine pids_limit={host or 'none'} (gVisor's own host tasks included)"
    )
    return verdict(ok), evidence


def _limit(value: str) -> int | None:
    """A cgroup byte limit, None when unlimited or unreadable."""
    return int(value) if value.isdigit() and int(value) < UNLIMITED else None


def _memory(box: Sandbox, _attrs: dict[str, Any]) -> Verdict:
    path, value = _cgroup(box, "memory.max", "memory/memory.limit_in_bytes")
    limit = _limit(value)
    swap_path, swap, no_swap = _swap(box, path.endswith("/memory.max"), limit)
    counter = _oom_counter(box)
    evidence = (
        f"{path or 'memory limit'}={value or 'unreadable'}, {swap_path}={swap or 'unreadable'}; "
        f"OOM counter: {counter or 'none (an OOM kill would not be reported as OOM)'}"
    )
    return verdict(limit is not None and no_swap and bool(counter)), evidence


def _swap(box: Sandbox, cgroup_v2: bool, limit: int | None) -> tuple[str, str, bool]:
    """Where the swap limit was read, its value, and whether nothing swaps beyond `limit`."""
    if cgroup_v2:
        path, value = _first_readable(box, f"{CGROUP}/memory.swap.max")
        ok = value == "0"
    else:
        path, value = _first_readable(box, f"{CGROUP}/memory/memory.memsw.limit_in_bytes")
        ok = limit is not None and _limit(value) == limit
    if path:
        return path, value, ok
    # Without swap accounting only a host without swap keeps the promise.
    found = re.search(r"^SwapTotal:\s+(\d+)", _output(box, "cat /proc/meminfo"), re.MULTILINE)
    total = found.group(1) if found else ""
    return "SwapTotal (kB)", total, total == "0"


def _oom_counter(box: Sandbox) -> str:
    path, content = _cgroup(box, "memory.events", "memory/memory.oom_control")
    return path if re.search(r"^oom_kill \d+", content, re.MULTILINE) else ""


def _cpu(box: Sandbox, _attrs: dict[str, Any]) -> Verdict:
    path, value = _cgroup(box, "cpu.max", "cpu/cpu.cfs_quota_us")
    if path.endswith("/cpu.max"):
        quota, _, period = value.partition(" ")
    else:
        quota, period = value, _first_readable(box, f"{CGROUP}/cpu/cpu.cfs_period_us")[1]
    cpus = int(quota) / int(period) if quota.isdigit() and period.isdigit() else 0
    evidence = f"{path or 'CPU quota'}={value or 'unreadable'}"
    if cpus:
        evidence += f" per {period} µs: {cpus:g} CPUs"
    return verdict(cpus > 0), evidence


# /var/tmp is world-writable on the root filesystem: a write there fails only when
# the root is read-only (a write under /etc fails for the sandbox user anyway).
ROOT_WRITE = "touch /var/tmp/.stigmer-audit && rm /var/tmp/.stigmer-audit"


def _read_only_root(box: Sandbox, attrs: dict[str, Any]) -> Verdict:
    wanted = bool(attrs["HostConfig"].get("ReadonlyRootfs"))
    root = next((m for m in _mounts(box) if m.point == "/"), None)
    mounted_ro = root is not None and "ro" in root.options
    write = _run(box, ROOT_WRITE, allowed=(0, 1))
    refused = "Read-only file system" in write.stderr
    evidence = f"/ mounted {'ro' if mounted_ro else 'rw'}, a write to /var/tmp " + (
        f"failed: {write.stderr.strip()}" if write.exit_code else "succeeded"
    )
    if not wanted:
        return "pass", evidence + " (read_only_root is off: not required)"
    return verdict(mounted_ro and refused), evidence


TMP_OVERFILL = (
    "size=$(df -B1 --output=size /tmp | tail -n 1); echo $size; "
    "fallocate -l $((size + 4096)) /tmp/.stigmer-audit 2>&1; rm -f /tmp/.stigmer-audit"
)


def _tmpfs(box: Sandbox, _attrs: dict[str, Any]) -> Verdict:
    tmp = next((m for m in _mounts(box) if m.point == "/tmp"), None)
    size, _, overfill = _output(box, TMP_OVERFILL).partition("\n")
    sized = (
        tmp is not None
        and tmp.fstype == "tmpfs"
        and any(o.startswith("size=") for o in tmp.super_options)
    )
    full = "No space left on device" in overfill
    shown = (
        f"tmpfs of {int(size) / 1024**2:g} MiB" if sized and size.isdigit() else "not a sized tmpfs"
    )
    evidence = f"/tmp {shown}; allocating 4 KiB more: {overfill.strip() or 'succeeded'}"
    return verdict(sized and full), evidence


def _output_cap(box: Sandbox, _attrs: dict[str, Any]) -> Verdict:
    result = box.exec("head -c 200000 /dev/zero | tr '\\0' a; exit 7", output_limit=10000)
    ok = result.truncated.get("stdout") and result.exit_code == 7 and "truncated" in result.stdout
    evidence = (
        f"kept {len(result.stdout)} of {result.output_bytes.get('stdout')} bytes, "
        f"exit {result.exit_code}"
    )
    return verdict(bool(ok)), evidence


def _timeout(box: Sandbox, _attrs: dict[str, Any]) -> Verdict:
    result = box.exec("setsid sleep 4711 & sleep 4712", timeout=1)
    left = _output(box, "ps -eo args")
    ok = result.timed_out and "sleep 4711" not in left and "sleep 4712" not in left
    return verdict(ok), f"cause={result.cause}, leftovers={'none' if ok else 'found'}"


def _causes(box: Sandbox, _attrs: dict[str, Any]) -> Verdict:
    killed = box.exec("kill -TERM $$", timeout=COMMAND_TIMEOUT_S)
    ok = killed.exit_code == 143 and killed.cause == "signal"
    return verdict(ok), f"kill -TERM $$ → {killed.exit_code} ({killed.cause})"


def _network(box: Sandbox, attrs: dict[str, Any]) -> Verdict:
    mode = attrs["HostConfig"].get("NetworkMode") or "default"
    interfaces = sorted(_output(box, "ls /sys/class/net").split())
    routes = [line.split() for line in _output(box, "cat /proc/net/route").splitlines()[1:]]
    default = next((r[0] for r in routes if r[1:2] == ["00000000"]), "")
    seen = f"interfaces {', '.join(interfaces) or 'none'}, default route " + (
        f"via {default}" if default else "none"
    )
    if mode == "none":
        ok = interfaces == ["lo"] and not default
        return verdict(ok), f"network none: {seen}, so nothing outside the sandbox is reachable"
    evidence = (
        f"network on ({mode}): {seen}; a sandbox started with network none "
        "(`inv run --network none`, `Sandbox(network='none')`) has only lo"
    )
    return verdict(mode != "host"), evidence


# From inside: the host through the engine's bridge gateway, by a raw socket and by curl
# without the proxy. Refused means no byte of the host's answer came back.
EGRESS_PROBE = (
    "import socket, sys\n"
    "s = socket.socket(); s.settimeout(3)\n"
    "try:\n"
    "    s.connect((sys.argv[1], int(sys.argv[2]))); print('connected')\n"
    "except OSError as e:\n"
    "    print('refused:', e.strerror or e)\n"
)


def _egress(box: Sandbox, attrs: dict[str, Any]) -> Verdict:
    chosen = network.policy_in_force(box.settings, box.name, attrs)
    if chosen.mode in ("none", "open"):
        state = "no network at all" if chosen.mode == "none" else "everything is reachable"
        return verdict(chosen.mode == "none"), f"egress {chosen.mode}: {state}"
    host = egress_gateway.bridge_gateway()  # the host, as a sandbox reaches it
    probes = [
        _output(box, ["python3", "-c", EGRESS_PROBE, host, "22"]),
        _output(box, ["curl", "-s", "-m", "5", "--noproxy", "*", "-o", "/dev/null", "-w",
                      "%{http_code}", f"http://{host}:80/"]),
    ]  # fmt: skip
    raw_refused = probes[0].startswith("refused")
    web_refused = probes[1] in ("000", "403")  # 403: the gateway's refusal page
    allowed = _allowed_probe(chosen)
    if allowed:
        code = _output(box, ["curl", "-s", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}",
                             f"https://{allowed}/"])  # fmt: skip
        probes.append(f"https://{allowed}/ answered HTTP {code}")
    recent = network.egress_records(box.settings, box.name, denied_only=True)[-2:]
    evidence = (
        f"egress {chosen.mode} ({len(chosen.allow)} allow, {len(chosen.deny)} deny) through "
        f"gateway {box.name}-egress-gw; the host at {host}: raw socket {probes[0]}, curl "
        f"--noproxy HTTP {probes[1]}; {probes[2] if allowed else 'no allowed name to probe'}; "
        "audited: "
        + ("; ".join(f"{r['rule']} {r['address']}:{r['port']}" for r in recent) or "nothing")
    )
    reached = not allowed or probes[2].rpartition(" ")[2] not in ("000", "403")
    return verdict(raw_refused and web_refused and reached and bool(recent)), evidence


def _allowed_probe(chosen: egress.EgressPolicy) -> str:
    """A name the policy lets out on HTTPS, to show an allowed host is reached: the first
    plain name entry, else (under public) the host pip installs from."""
    for entry in chosen.allow:
        if entry.kind == "name" and entry.port in (None, 443):
            return entry.host
    if chosen.mode != "public":
        return ""
    found = [egress.parse_entry(text) for text in egress.expand_preset("python")]
    hosts = [e.host for e in found if e.kind == "name" and e.port in (None, 443)]
    return hosts[0] if hosts else ""


def _kernel(box: Sandbox, attrs: dict[str, Any]) -> Verdict:
    runtime = attrs["HostConfig"].get("Runtime") or "runc"
    kernel = _output(box, ["uname", "-r"]).strip()
    if isolation.of_container(box.find()) == "gvisor":
        return "pass", f"runtime {runtime}: gVisor's kernel ({kernel}) answers every system call"
    return "pass", f"runtime {runtime}: the host's kernel ({kernel}), behind the properties above"


def _socket_and_credentials(box: Sandbox, _attrs: dict[str, Any]) -> Verdict:
    mounts = _mounts(box)
    sockets = [m.point for m in mounts if "docker.sock" in m.point or "docker.sock" in m.root]
    credentials = [m for m in mounts if m.point.endswith(("/.aws", "/.kube"))]
    writable = [m.point for m in credentials if _writable(box, m.point)]
    seen = ", ".join(f"{m.point} {m.options[0]}" for m in credentials) or "none mounted"
    evidence = (
        f"Docker socket mounts: {', '.join(sockets) or 'none'}; credentials: {seen}; "
        f"writable by a command: {', '.join(writable) or 'none'}"
    )
    if credentials and not sockets and not writable:
        # Opted in, read-only, yet every command can read (and send) what they hold.
        return "warn", f"{evidence}; readable by every command: use `secrets` instead"
    return verdict(not sockets and not writable), evidence


def _writable(box: Sandbox, folder: str) -> bool:
    probe = f"{folder}/.stigmer-audit"
    script = 'touch "$1" 2>/dev/null && rm -f "$1"'
    return _run(box, ["bash", "-c", script, "audit", probe], allowed=(0, 1)).exit_code == 0


def _propagation(box: Sandbox, _attrs: dict[str, Any]) -> Verdict:
    mounts = _mounts(box)
    shared = [m.point for m in mounts if any(p.startswith("shared:") for p in m.propagation)]
    slaves = sum(any(p.startswith("master:") for p in m.propagation) for m in mounts)
    evidence = (
        f"shared mounts: {', '.join(shared) or 'none'} of {len(mounts)}; "
        f"{slaves} receive mounts from the host only"
    )
    return verdict(not shared), evidence


def _health(_box: Sandbox, attrs: dict[str, Any]) -> Verdict:
    test = (attrs["Config"].get("Healthcheck") or {}).get("Test")
    container = engine.find_container(attrs["Id"])
    if container is None:
        raise Unobserved("the container is gone")
    # A sandbox just started is still "starting": wait for the engine's first verdict.
    health = engine.wait_healthy(container, HEALTH_WAIT_S)
    return verdict(health.healthy), f"Test={test}, {health.detail} after {health.seconds:.1f} s"


# Places `find` could not read, from "find: '/root': Permission denied" (in a UTF-8
# locale the quotes are U+2018 and U+2019).
FIND_ERROR = re.compile("^find: [\u2018'\"](.+?)[\u2019'\"]: ", re.MULTILINE)
ENTERABLE = 'for p; do if [ -x "$p" ]; then echo "$p"; fi; done'


def _setuid(box: Sandbox, _attrs: dict[str, Any]) -> Verdict:
    # find exits 1 when it met places it could not read: those are reported below.
    scan = _run(box, "find / -xdev -perm /6000 -type f", allowed=(0, 1))
    found = scan.stdout.split()
    allowed = _output(box, f"sed -e 's/#.*//' {SETUID_ALLOWLIST}").split()
    extra = [path for path in found if path not in allowed]
    unscanned = FIND_ERROR.findall(scan.stderr)
    if scan.exit_code and not unscanned:
        raise Unobserved(f"find exited {scan.exit_code}: {scan.stderr.strip()[:120]}")
    # A folder the sandbox user cannot enter holds nothing it can run, setuid or not.
    enterable = _output(box, ["bash", "-c", ENTERABLE, "audit", *unscanned]).split()
    evidence = f"found {', '.join(found) or 'none'}"
    if extra:
        evidence += f", not allowed: {', '.join(extra)}"
    if unscanned:
        evidence += f"; unreadable to a command, not scanned: {', '.join(unscanned)}"
        evidence += (
            f" (it can enter {', '.join(enterable)})" if enterable else " (nor can it enter them)"
        )
    status: Status = "fail" if extra else "warn" if enterable else "pass"
    return status, evidence


def _ownership(box: Sandbox, _attrs: dict[str, Any]) -> Verdict:
    _output(box, f"echo audit > {policy.WORKSPACE}/.stigmer-audit")
    path = box.settings.path("workspace") / ".stigmer-audit"
    owner = path.stat().st_uid if path.exists() else -1
    path.unlink(missing_ok=True)
    expected = box.sandbox_user[0]
    return verdict(owner == expected), f"owner uid {owner} on the host, expected {expected}"


# The command's ancestors up to the agent (whose parent is outside the sandbox), then
# what it gets when it tries to signal its parent and PID 1 and to read its parent.
PROCESS_TREE = r"""
echo "self $(id -u)"
p=$PPID
while [ "${p:-0}" -gt 0 ]; do
  echo "ancestor $p $(awk '/^Uid:/ {print $2}' /proc/$p/status) $(cat /proc/$p/comm)"
  p=$(awk '/^PPid:/ {print $2}' /proc/$p/status)
done
echo "try kill -0 \$PPID: $( (kill -0 $PPID) 2>&1)"
echo "try kill -0 1: $( (kill -0 1) 2>&1)"
echo "try reading \$PPID's environ: $(head -c 1 /proc/$PPID/environ 2>&1 >/dev/null)"
"""


@dataclass(frozen=True)
class ProcessView:
    """What a command sees of the processes around it."""

    uid: str
    ancestors: list[tuple[str, str, str]]  # pid, uid, name; nearest first
    attempts: dict[str, str]  # what it tried -> the error, "" when it was allowed

    @property
    def all_refused(self) -> bool:
        return all("not permitted" in e or "denied" in e for e in self.attempts.values())


def parse_process_view(text: str) -> ProcessView:
    """The output of `PROCESS_TREE`."""
    uid, ancestors, attempts = "", [], {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "self":
            uid = rest.strip()
        elif kind == "ancestor":
            pid, owner, name = [*rest.split(maxsplit=2), "", ""][:3]
            ancestors.append((pid, owner, name))
        elif kind == "try":
            attempt, _, error = rest.partition(":")
            attempts[attempt] = error.strip()
    return ProcessView(uid, ancestors, attempts)


def _privilege_separation(box: Sandbox, _attrs: dict[str, Any]) -> Verdict:
    view = parse_process_view(_output(box, PROCESS_TREE))
    pid1 = _status_of(box, "1")
    pid1_caps = capability_names(pid1.get("CapEff", ""))
    others = [owner for _pid, owner, _name in view.ancestors] + [pid1.get("Uid", "")]
    ok = (
        view.uid not in ("", "0", *others)
        and view.all_refused
        and set(pid1_caps) <= AGENT_CAPABILITIES
    )
    chain = " ← ".join(f"{name} {pid} uid {owner}" for pid, owner, name in view.ancestors)
    tried = "; ".join(f"{what}: {error or 'allowed'}" for what, error in view.attempts.items())
    evidence = (
        f"a command (uid {view.uid}) ← {chain or 'no parent seen'}; PID 1 uid "
        f"{pid1.get('Uid', '?')} with {', '.join(pid1_caps) or 'no capabilities'}; {tried}"
    )
    return verdict(ok), evidence


@dataclass(frozen=True)
class Property:
    """A SECURITY.md property and how the audit observes it."""

    item: int
    name: str
    observe: Callable[[Sandbox, dict[str, Any]], Verdict]

    def check(self, box: Sandbox, attrs: dict[str, Any]) -> CheckResult:
        """The property's verdict; a failed observation fails it, saying why."""
        try:
            status, evidence = self.observe(box, attrs)
        except Unobserved as exc:
            status, evidence = "fail", f"not observed: {exc}"
        return CheckResult(self.name, status, evidence, item=self.item)


PROPERTIES = (
    Property(1, "non-root user", _user),
    Property(3, "not privileged, no host namespaces or devices", _isolation),
    Property(4, "all capabilities dropped, no new privileges", _capabilities),
    Property(5, "seccomp/AppArmor not unconfined", _confinement),
    Property(6, "process limit", _pids),
    Property(7, "memory limit, swap equal to it, OOM counted", _memory),
    Property(8, "CPU limit", _cpu),
    Property(9, "read-only root filesystem where configured", _read_only_root),
    Property(9, "sized /tmp tmpfs, overfilling it fails", _tmpfs),
    Property(10, "output capped with a marker, exit code kept", _output_cap),
    Property(11, "timeouts kill the whole tree", _timeout),
    Property(12, "exit causes told apart", _causes),
    Property(13, "network can be switched off", _network),
    Property(EGRESS_ITEM, "egress: the host, the LAN and metadata refused", _egress),
    Property(14, "no Docker socket; credentials read-only", _socket_and_credentials),
    Property(15, "mount propagation not shared", _propagation),
    Property(16, "health check defined and healthy", _health),
    Property(17, "no setuid/setgid binaries beyond the allowlist", _setuid),
    Property(18, "workspace files owned by the expected user", _ownership),
    Property(25, "privilege separation: commands cannot touch the agent", _privilege_separation),
    Property(KERNEL_ITEM, "kernel: the runtime and the kernel commands see", _kernel),
)


# A sandbox compose started (`inv compose.up`): what its evidence means there, by item.
COMPOSE_NOTES = {
    13: "compose: `network: none` in the settings cuts the service off (network_mode none, "
    "through the tasks' override); `inv run --network none` starts a separate sandbox",
    16: "compose: the image's check with the base file's interval",
}
# What does not hold on the compose path, whatever the sandbox shows (a warning each).
COMPOSE_LIMITS = (
    CheckResult(
        "compose: maximum lifetime",
        "warn",
        "not enforced: compose keeps the service up (restart: unless-stopped) until "
        "`inv compose.down`; max_lifetime_hours and `inv clean`'s reaping of expired "
        "sandboxes apply to `inv sandbox.up` sandboxes",
    ),
    CheckResult(
        "compose: commands only through the agent",
        "warn",
        "`inv compose.exec`, `inv sandbox.audit --compose` and `Sandbox.attach` go through the "
        "agent; `docker-compose exec sandbox ...` (the guide's) is root with SETUID/SETGID/KILL "
        "and bypasses the helper, tree kill, exit causes and the audit trail: add `-u sandbox`",
    ),
    CheckResult(
        "compose: configuration checked and enforced by the tasks",
        "warn",
        "`inv compose.up` refuses weakening settings in the merged files and enforces the "
        "confinement with a generated override; `docker-compose up` by hand does neither",
    ),
)


def _with_note(result: CheckResult, note: str | None) -> CheckResult:
    return replace(result, detail=f"{result.detail}; {note}") if note else result


def audit(box: Sandbox) -> list[CheckResult]:
    """Every applicable SECURITY.md property of a running sandbox, with its evidence; for
    a sandbox compose started, what differs there and what cannot hold."""
    attrs = box.up().inspect()
    results = [prop.check(box, attrs) for prop in PROPERTIES]
    if (attrs["Config"].get("Labels") or {}).get(labels.KIND) != "compose":
        return results
    noted = [_with_note(r, COMPOSE_NOTES.get(r.item or 0)) for r in results]
    return [*noted, *COMPOSE_LIMITS]
