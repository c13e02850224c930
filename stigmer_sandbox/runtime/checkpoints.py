"""Checkpoints with memory: a gVisor sandbox's running processes, kept and started again.

`create(sandbox, name)` saves everything a sandbox is at one instant: the memory and state
of every process (gVisor's checkpoint, through the engine's experimental
`checkpoint create`), its filesystem under `/` (committed to the image
`stigmer-sandbox-checkpoint:<name>`, kind `checkpoint`) and a copy of its workspace, in
`<state_dir>/checkpoints/<name>/` (`workspace`, `memory`, `checkpoint.json`, the marker
`workspaces.create` writes). The sandbox then runs on from that checkpoint.
`restore(name)` starts a NEW private sandbox from it: its background servers answer with
the memory they had; the agent channel is a new one.

Where it works (measured, runsc 20221219, Docker 20.10): isolation `gvisor`, egress
`none`, on an engine started in experimental mode whose gVisor runtime has
`--network=none` (gVisor cannot save the host's network stack, `--network=host`), with
the engine on this machine (the checkpoint's files are copied from its data root).
What is not carried: the agent and its shell sessions, and any `docker exec` (their
standard streams are the host's descriptors, which gVisor cannot reopen in another
sandbox: the restore fails "failed to set host FD N non-blocking"), so the agent's
channel is closed, and no checkpoint is taken while one of them runs.

Two facts the restore needs (both found with runsc's debug log):
- gVisor re-walks every mount point it saved; a point the first container's start made
  in its own writable layer (`/run/stigmer`, `/logs`: not in the image) is missing in a
  new container, and the restore fails "no such file or directory". They are made in the
  new container before it starts.
- The engine's health check is a `docker exec` every 5 s; the checkpoint is taken just
  after one ended, never while one runs.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .. import engine, isolation, labels, policy
from ..config import Settings, load_settings
from ..errors import SandboxError, UsageError
from ..images.record import ImageRecord
from . import containers, host_helper, network, root_guard, snapshots, workspaces
from .backends.base import Backend

REPOSITORY = "stigmer-sandbox-checkpoint"
KIND = "checkpoint"
FOLDER = "checkpoints"
MEMORY = "memory"
RECORD = "checkpoint.json"
# The oldest runsc whose checkpoints were proved here (Debian 12's package).
MIN_RUNSC = 20221219
NO_NETWORK_ARG = "--network=none"
EXPERIMENTAL_HINT = (
    'add "experimental": true to the engine\'s daemon.json and restart the engine '
    "(a reload with SIGHUP is not enough; a restart stops running containers)"
)
# Settings a checkpoint was taken with that the restored container must have again
# (gVisor restores into a sandbox of the same size and shape).
KEPT_SETTINGS = ("memory", "cpus", "pids_limit", "tmp_size", "read_only_root", "max_lifetime_hours")
# The host descriptors every sandbox process inherits from the container's own streams
# (re-given at restore); any other is a `docker exec`'s, which cannot be restored.
CONTAINER_STREAMS = ("host:[1]", "host:[2]", "host:[3]")
# Run as root in the sandbox: every process holding another host descriptor.
HOLDERS_PROGRAM = (
    "import os\n"
    "for p in os.listdir('/proc'):\n"
    "    if not p.isdigit() or int(p) == os.getpid():\n"
    "        continue\n"
    "    try:\n"
    "        fds = os.listdir(f'/proc/{p}/fd')\n"
    "    except OSError:\n"
    "        continue\n"
    "    for fd in fds:\n"
    "        try:\n"
    "            target = os.readlink(f'/proc/{p}/fd/{fd}')\n"
    "        except OSError:\n"
    "            continue\n"
    f"        if target.startswith('host:') and target not in {CONTAINER_STREAMS!r}:\n"
    "            print(p, open(f'/proc/{p}/comm').read().strip())\n"
    "            break\n"
)
DETACH_WAIT_S = 10.0
# A health probe starts this long after the last one ended (policy.HEALTHCHECK's interval);
# a checkpoint (under a second) starts only while the next probe is this margin away.
PROBE_INTERVAL_S = policy.HEALTHCHECK["interval"] / 1e9
PROBE_MARGIN_S = (
    4.0  # go only within 1 s of a probe's end: a probe may start before the last ends (measured)
)
# On a container started from a checkpoint (restored, or its source run on): checkpointing
# it again leaves its task stuck in containerd 1.6 ("id already in use" on every later
# start; measured), so it is refused.
RESTORED_LABEL = f"{labels.PREFIX}.restored-from"


class Source(Protocol):
    """What `create` needs of the sandbox it saves (a `Sandbox` is one)."""

    name: str
    settings: Settings
    backend: Backend
    connection: Any

    def find(self) -> Any:
        """The container, if it exists."""


S = TypeVar("S")


# --- names, folders, records ----------------------------------------------------------


def check_name(name: str) -> str:
    """A checkpoint name: the rules of a snapshot's name."""
    return snapshots.check_name(name, "checkpoint")


def image_ref(name: str) -> str:
    """The image that holds checkpoint `name`'s filesystem."""
    return f"{REPOSITORY}:{check_name(name)}"


def root(settings: Settings) -> Path:
    """Where checkpoints are kept."""
    return settings.path("state_dir") / FOLDER


def record_of(settings: Settings, name: str) -> dict[str, Any]:
    """The record of checkpoint `name`; one UsageError when there is none (or it is not ours)."""
    folder = root(settings) / check_name(name)
    entry: Any = None
    if workspaces.is_private(folder, folder.parent):
        try:
            entry = json.loads((folder / RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            entry = None
    if not isinstance(entry, dict) or engine.find_image(image_ref(name)) is None:
        raise UsageError(
            f"no checkpoint named {name} in {root(settings)}",
            "list them: `inv sandbox.checkpoints` (`listing()` in Python); take one: "
            "`inv sandbox.checkpoint NAME` (`create(sandbox, name)`)",
        )
    return entry


def listing(settings: Settings) -> list[dict[str, Any]]:
    """Every checkpoint kept under `settings`' state folder, oldest first."""
    found = []
    folder = root(settings)
    for entry in sorted(folder.iterdir()) if folder.is_dir() else ():
        if snapshots.NAME_RE.fullmatch(entry.name) and workspaces.is_private(entry, folder):
            try:
                found.append(json.loads((entry / RECORD).read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue
    return sorted(found, key=lambda item: item.get("created", 0))


def delete(settings: Settings, name: str) -> bool:
    """Remove checkpoint `name` (image and folder); whether there was one."""
    folder = root(settings) / check_name(name)
    image = engine.find_image(image_ref(name))
    if image is not None:
        engine.remove_image(image_ref(name))
    mine = workspaces.is_private(folder, folder.parent)
    if mine:
        workspaces.remove(folder)
    return image is not None or mine


# --- what the engine and host must offer ------------------------------------------------


def runsc_date(version_line: str) -> int | None:
    """The release date in runsc's version (`0.0~20221219.0`, `release-20240212.0`)."""
    found = re.search(r"(20\d{6})", version_line)
    return int(found.group(1)) if found else None


def engine_refusal(
    experimental: bool, info: Mapping[str, Any], runtime: str, runsc: str | None
) -> str | None:
    """Why the engine (its ping header, `docker info`) cannot checkpoint sandboxes of the
    engine `runtime`, with `runsc`'s version line (None: not found); None when it can."""
    if not experimental:
        return f"the Docker Engine is not in experimental mode ({EXPERIMENTAL_HINT})"
    entry = (info.get("Runtimes") or {}).get(runtime)
    if not isinstance(entry, dict):
        return f"the engine has no {runtime} runtime ({isolation.INSTALL_HINT})"
    if NO_NETWORK_ARG not in (entry.get("runtimeArgs") or []):
        return (
            f"the engine's {runtime} runtime lacks {NO_NETWORK_ARG} (gVisor cannot checkpoint "
            "a sandbox that uses the host's network stack); register a runtime with "
            f'"runtimeArgs": ["{NO_NETWORK_ARG}"] and reload the engine'
        )
    if runsc is None:
        return f"{entry.get('path', 'runsc')} (the runtime's runsc) is missing on this host"
    date = runsc_date(runsc)
    if date is None or date < MIN_RUNSC:
        return f"runsc {runsc or '?'} is older than {MIN_RUNSC}, the oldest proved to checkpoint"
    return None


def sandbox_refusal(isolation_name: str, network_mode: str) -> str | None:
    """Why a sandbox of this isolation and network cannot be checkpointed (None: it can)."""
    if isolation_name != "gvisor":
        return (
            f"isolation is {isolation_name}; checkpoints with memory need isolation gvisor "
            "(runc's CRIU does not work on these hosts)"
        )
    if network_mode != "none":
        return f"egress is not none (network {network_mode}); gVisor checkpoints need egress none"
    return None


def engine_verdict(runtime: str) -> tuple[dict[str, Any], str | None]:
    """`docker info`, and why this engine cannot checkpoint `runtime` (None: it can)."""
    with engine.engine_errors():
        info = engine.client().info()
    entry = (info.get("Runtimes") or {}).get(runtime) or {}
    path = str(entry.get("path") or isolation.RUNSC)
    runsc = isolation.runsc_version(path) if os.access(path, os.X_OK) else None
    return dict(info), engine_refusal(engine.experimental(), info, runtime, runsc)


def require_engine(runtime: str) -> dict[str, Any]:
    """`docker info`, after one SandboxError when this engine cannot checkpoint `runtime`."""
    info, why = engine_verdict(runtime)
    if why:
        raise SandboxError(f"checkpoints are not available: {why}")
    return info


# --- create ---------------------------------------------------------------------------


def create(sandbox: Source, name: str) -> dict[str, Any]:
    """Save `sandbox`'s processes, memory, filesystem and workspace as checkpoint `name`;
    the sandbox runs on from it (its agent channel, sessions and execs are closed). A dict:
    name, image, folder, bytes (memory), seconds (the checkpoint alone) and total_seconds."""
    started = time.monotonic()
    check_name(name)
    container = sandbox.find()
    if container is None or container.status != "running":
        state = container.status if container is not None else "missing"
        raise SandboxError(f"sandbox {sandbox.name} is {state}; only a running one is checkpointed")
    why = sandbox_refusal(
        isolation.of_container(container), container.attrs["HostConfig"].get("NetworkMode", "")
    )
    if why:
        raise SandboxError(f"sandbox {sandbox.name} cannot be checkpointed: {why}")
    ran_on = [e["name"] for e in listing(sandbox.settings) if e.get("container") == container.id]
    if container.labels.get(RESTORED_LABEL) or ran_on:
        raise SandboxError(
            f"sandbox {sandbox.name} was started from a checkpoint "
            f"({container.labels.get(RESTORED_LABEL) or ran_on[0]}); this engine cannot "
            "checkpoint it again (its containerd task would be left stuck)",
            "checkpoint a sandbox started normally",
        )
    info = require_engine(str(container.attrs["HostConfig"].get("Runtime")))
    folder = root(sandbox.settings) / name
    if engine.find_image(image_ref(name)) is not None or folder.exists():
        raise UsageError(f"checkpoint {name} already exists", "pick another name, or delete it")
    sandbox.connection.close()  # the agent ends, with its sessions: they cannot be saved
    _wait_detached(sandbox, container)
    source = Path(info["DockerRootDir"]) / "containers" / container.id / "checkpoints" / name
    seconds = _checkpoint(container, name)
    try:
        made = _keep(sandbox, container, name, source, folder)
    finally:
        _resume(container, name)  # the sandbox runs on from its checkpoint
    made.update(seconds=round(seconds, 3), total_seconds=round(time.monotonic() - started, 3))
    return made


def _wait_detached(sandbox: Source, container: Any) -> None:
    """Wait until no process holds a `docker exec`'s streams (the agent just told to end,
    another host's channel, a command run with `docker exec`) and no health probe is
    due; one error naming them when they stay."""
    deadline = time.monotonic() + DETACH_WAIT_S
    holders = ""
    while time.monotonic() < deadline:
        _wait_for_probe_gap(container, deadline)
        status, output = sandbox.backend.run_root(
            container.id, ["/usr/bin/python3", "-I", "-S", "-c", HOLDERS_PROGRAM], user="0:0"
        )
        holders = output.decode(errors="replace").strip()
        if status == 0 and not holders:
            _wait_for_probe_gap(container, deadline)
            return
        time.sleep(0.1)
    shown = ", ".join(holders.splitlines()[:5]) or "the check failed"
    raise SandboxError(
        f"sandbox {sandbox.name} still has attached commands ({shown}); their streams "
        "cannot be checkpointed",
        "close other channels to it (other processes' Sandbox objects, `docker exec`)",
    )


def probe_gap(last_end: float | None, now: float) -> float:
    """Seconds to wait before a checkpoint may start, given when the last health probe
    ended (epoch seconds; None: none yet): 0 while the next probe is far enough away."""
    if last_end is None:
        return 0.0
    since = now - last_end
    if since < PROBE_INTERVAL_S - PROBE_MARGIN_S:
        return 0.0
    return max(0.0, PROBE_INTERVAL_S - since) + 0.3  # the next probe, and its run (~0.1 s)


def _last_probe_end(container: Any) -> float | None:
    with engine.engine_errors():
        container.reload()
    log = ((container.attrs.get("State") or {}).get("Health") or {}).get("Log") or []
    if not log or not log[-1].get("End"):
        return None
    try:
        return parse_engine_time(str(log[-1]["End"]))
    except ValueError:  # an engine that writes its times otherwise: no probe is awaited
        return None


def parse_engine_time(text: str) -> float:
    """Epoch seconds of the engine's RFC 3339 time (nanoseconds cut to microseconds)."""
    found = re.fullmatch(r"([^.Z+]+?)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text.strip())
    if found is None:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    head, fraction, zone = found.groups()
    fraction = f".{fraction[:6]}" if fraction else ""
    return datetime.fromisoformat(head + fraction + zone.replace("Z", "+00:00")).timestamp()


def _wait_for_probe_gap(container: Any, deadline: float) -> None:
    """Sleep until a health probe just ended (or none is near); at most until `deadline`."""
    while time.monotonic() < deadline:
        wait = probe_gap(_last_probe_end(container), time.time())
        if wait <= 0:
            return
        time.sleep(min(wait, max(0.0, deadline - time.monotonic())))


def _checkpoint(container: Any, name: str) -> float:
    """The engine's checkpoint of `container` (it stops); its seconds."""
    api = engine.client().api
    started = time.monotonic()
    with engine.engine_errors():
        response = api._post_json(
            api._url("/containers/{0}/checkpoints", container.id),
            data={"CheckpointID": name, "Exit": True},
        )
        api._raise_for_status(response)
    seconds = time.monotonic() - started
    _wait_exited(container)
    return seconds


def _wait_exited(container: Any, wait_s: float = 60.0) -> None:
    """Wait until the engine has handled the checkpointed container's exit. Its answer
    comes first; a start meanwhile races the engine's own clean-up and leaves a task
    that no later start can replace ("id already in use"; seen with 100 MB resident)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        with engine.engine_errors():
            container.reload()
        state = container.attrs.get("State") or {}
        if state.get("Status") == "exited" and not state.get("Paused"):
            return
        time.sleep(0.1)
    raise SandboxError(
        f"the engine did not stop {container.name} within {wait_s:.0f} s of its checkpoint",
        "see the engine's log",
    )


def _resume(container: Any, name: str) -> None:
    """Start `container` again from its checkpoint `name`, then drop the engine's copy."""
    api = engine.client().api
    _start_from(container, name)
    with engine.engine_errors():
        api._raise_for_status(
            api._delete(api._url("/containers/{0}/checkpoints/{1}", container.id, name))
        )


def _start_from(container: Any, name: str, wait_s: float = 10.0) -> None:
    """Start `container` from checkpoint `name`. Right after a checkpoint the old gVisor
    sandbox may still be going (the engine answers "id already in use"): tried again."""
    api = engine.client().api
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with engine.engine_errors():
                url = api._url("/containers/{0}/start", container.id)
                api._raise_for_status(api._post(url, params={"checkpoint": name}))
            return
        except SandboxError as exc:
            if "already in use" not in exc.message or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _keep(sandbox: Source, container: Any, name: str, source: Path, folder: Path) -> dict[str, Any]:
    """The stopped `container`'s filesystem committed, its workspace and memory copied into
    the new folder; nothing left behind when it fails."""
    root_guard.check(  # nothing that runs as root passes through a checkpoint either
        sandbox.name,
        sandbox.backend.changes(container, root_guard.is_relevant),
        lambda path: sandbox.backend.path_mode(container, path),
    )
    made = workspaces.create(folder.parent, folder.name, sandbox.settings.path("workspace"))
    try:
        shutil.copytree(source, made / MEMORY, symlinks=True)
        parent = engine.image(str(container.attrs["Image"]))
        marks = {
            labels.KIND: KIND,
            f"{labels.PREFIX}.source": sandbox.name,
            host_helper.PROJECT_IMAGE_LABEL: host_helper.project_image(parent),
            **{f"{labels.PREFIX}.{key}": "" for key in snapshots.PER_CONTAINER},
        }
        changes = [f"LABEL {key}={json.dumps(value)}" for key, value in marks.items()]
        image_id = sandbox.backend.commit(container, image_ref(name), changes)
        ImageRecord.of(sandbox.settings).add(KIND, [image_id])
        record = {
            "name": name,
            "image": image_ref(name),
            "folder": str(made),
            "source": sandbox.name,
            "container": container.id,
            "created": time.time(),
            "bytes": workspaces.size_bytes(made / MEMORY),
            "workspace_bytes": workspaces.size_bytes(made / "workspace"),
            "runtime": container.attrs["HostConfig"].get("Runtime"),
            "settings": {key: getattr(sandbox.settings, key) for key in KEPT_SETTINGS},
        }
        (made / RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
    except BaseException:
        workspaces.remove(made)
        engine.remove_image(image_ref(name))
        raise
    return record


# --- restore --------------------------------------------------------------------------


def restore(
    name: str,
    settings: Settings | None = None,
    *,
    sandbox_class: Callable[..., S],
    **options: Any,
) -> S:
    """A new started private sandbox from checkpoint `name` (its processes running on with
    their memory, its own copy of the workspace), made by `sandbox_class.private` (the
    `Sandbox` class: passed in, so that this module never imports the one that calls it).
    `options` as for a private sandbox; isolation and egress are the checkpoint's."""
    settings = settings or load_settings()
    record = record_of(settings, name)
    for key, wanted in (("isolation", "gvisor"), ("egress", "none")):
        if options.get(key) not in (None, wanted):
            raise UsageError(f"a checkpoint restores with {key} {wanted}, not {options[key]}")
    options.update(isolation="gvisor", egress="none")
    kept = {k: v for k, v in (record.get("settings") or {}).items() if k in KEPT_SETTINGS}
    settings = settings.replace(**kept)
    runtime = isolation.OFFLINE_RUNTIME
    info = require_engine(runtime)
    folder = Path(record["folder"])
    new = snapshots.new_name(settings)
    private = workspaces.create(workspaces.sandboxes_root(settings), new, folder / "workspace")
    try:
        sandbox = sandbox_class.private(  # type: ignore[attr-defined]
            settings, new, record["image"], private, prepared_image=True, **options
        )
        sandbox.extra_labels[RESTORED_LABEL] = name
    except BaseException:
        workspaces.remove(private)
        raise
    try:
        _restored(sandbox, name, folder / MEMORY, Path(info["DockerRootDir"]))
        return sandbox.up()  # finds it running: a new agent channel
    except BaseException:
        sandbox.remove()
        raise


def _restored(sandbox: Any, name: str, memory: Path, data_root: Path) -> None:
    """`sandbox`'s container made as its settings say, then started from the checkpoint."""
    settings, backend = sandbox.settings, sandbox.backend
    base, folders = containers.wanted_spec(settings, sandbox.sandbox_user, True, backend)
    containers.check_runtime(settings)
    owned = containers.owner_labels(True) | sandbox.extra_labels
    placement = network.prepare(settings, sandbox.name, owned, backend, base["image"])
    spec, wanted = containers.placed(base, placement.options)
    policy.prepare_folders(settings, sandbox.host_user)
    pins = policy.pin_mounts(folders)
    marks = containers.container_labels(settings, sandbox.name, wanted, True, sandbox.extra_labels)
    container = backend.create({**spec, "labels": marks})
    _make_mount_points(container, spec, backend)
    target = data_root / "containers" / container.id / "checkpoints" / name
    shutil.copytree(memory, target, symlinks=True)
    _start_from(container, name)
    with engine.engine_errors():
        container.reload()
    policy.verify_mounts(pins, backend, container)
    placement.finish(sandbox.name)


def mount_points(spec: Mapping[str, Any]) -> list[str]:
    """Every folder `spec` mounts something on (tmpfs and folder binds; a file bind's
    target is in the image), without the leading slash, parents first."""
    targets = set(spec.get("tmpfs") or {})
    for mount in spec.get("mounts") or ():
        target = str(mount.get("Target", ""))
        if target != policy.EXEC_HELPER:
            targets.add(target)
    return sorted(t.strip("/") for t in targets if t.strip("/"))


def _make_mount_points(container: Any, spec: Mapping[str, Any], backend: Backend) -> None:
    """Make the mount points a first start would have made in the container's own layer
    (those the image lacks): gVisor's restore walks to each and fails on a missing one."""
    missing = [p for p in mount_points(spec) if backend.path_mode(container, f"/{p}") is None]
    if not missing:
        return
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for point in missing:
            entry = tarfile.TarInfo(point)
            entry.type, entry.mode = tarfile.DIRTYPE, 0o755
            archive.addfile(entry)
    api = engine.client().api
    with engine.engine_errors():
        api.put_archive(container.id, "/", buffer.getvalue())


def unique_name(prefix: str = "ckpt") -> str:
    """A fresh checkpoint name (tests, benchmarks)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
