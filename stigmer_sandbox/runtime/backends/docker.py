"""The Docker Engine as a sandbox platform: the one `Backend` implementation.

Containers from `policy.container_spec`, the agent over one attached `docker exec` (its
stdout and stderr demultiplexed by `DockerExecStream`), freeze through the cgroup freezer,
commits and overlay changes for fork and snapshot. The Docker-only parts that stay
outside the seam: the `docker exec` fallback (`client.direct`), compose, image builds and
the host-side cleanup, none of which a pod platform has.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import stat
import struct
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ... import engine, labels
from ...errors import SandboxError
from .base import ADDED, DELETED, MODIFIED, STDERR, STDOUT, AgentStream

# A freeze refused while the container was busy: tried again, after a growing pause.
FREEZE_REFUSED = "unable to freeze"
PAUSE_ATTEMPTS = 5
PAUSE_RETRY_S = 0.2
# Docker multiplexes an attached exec's stdout and stderr in frames: stream, size, payload.
FRAME_HEADER = struct.Struct(">BxxxL")


class DockerExecStream:
    """An attached `docker exec`'s socket, demultiplexed."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw  # keeps the SDK's response object (and so the socket) alive
        self._sock: socket.socket = getattr(raw, "_sock", raw)
        self._sock.settimeout(None)  # silence is fine: liveness comes from heartbeats

    def send(self, data: bytes) -> None:
        self._sock.sendall(data)

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        pending = bytearray()  # appended to and cut at the front: no copy of what waits
        while True:
            chunk = self._sock.recv(262144)
            if not chunk:
                return
            pending += chunk
            start = 0
            while len(pending) - start >= FRAME_HEADER.size:
                stream, size = FRAME_HEADER.unpack_from(pending, start)
                end = start + FRAME_HEADER.size + size
                if len(pending) < end:
                    break
                payload = bytes(pending[start + FRAME_HEADER.size : end])
                yield (STDOUT if stream == STDOUT else STDERR), payload
                start = end
            del pending[:start]

    def shutdown(self) -> None:
        self._sock.shutdown(socket.SHUT_RDWR)


class DockerBackend:
    """Sandboxes as containers of the local (or `DOCKER_HOST`) Docker Engine."""

    name = "docker"

    def create(self, spec: dict[str, Any]) -> Any:
        with engine.engine_errors():
            return engine.client().containers.create(**spec)

    def find(self, name: str) -> Any | None:
        return engine.find_container(name)

    def open_agent(self, sandbox_id: str, argv: list[str]) -> AgentStream:
        api = engine.client().api
        with engine.engine_errors():
            exec_id = api.exec_create(
                sandbox_id, argv, stdin=True, stdout=True, stderr=True, tty=False, user="0:0"
            )["Id"]
            return DockerExecStream(api.exec_start(exec_id, socket=True))

    def run_root(self, sandbox_id: str, argv: list[str], **options: Any) -> tuple[int, bytes]:
        api = engine.client().api
        with engine.engine_errors():
            exec_id = api.exec_create(sandbox_id, argv, **options)["Id"]
            output = api.exec_start(exec_id)
            return _exit_code(api, exec_id), output

    @contextmanager
    def frozen(self, handle: Any) -> Iterator[None]:
        self.pause(handle)
        try:
            yield
        finally:
            self.unpause(handle)

    def pause(self, handle: Any) -> None:
        _pause(handle)  # the cgroup freezer: nothing runs, memory stays where it is

    def unpause(self, handle: Any) -> None:
        with engine.engine_errors():
            handle.unpause()

    def commit(self, handle: Any, image_ref: str, changes: list[str]) -> str:
        repository, tag = image_ref.rsplit(":", 1)
        with engine.engine_errors():
            return str(handle.commit(repository, tag, pause=False, changes=changes).id)

    def changed_bytes(self, handle: Any) -> int:
        api = engine.client().api
        with engine.engine_errors():
            found = api.containers(all=True, size=True, filters={"id": handle.id})
        return int(found[0].get("SizeRw") or 0) if found else 0

    def changes(self, handle: Any, within: Callable[[str], bool]) -> list[tuple[str, int]]:
        """Read from the container's overlay layers when they are on this machine and
        readable (root, engine here: milliseconds); else the engine's diff, which walks
        the whole image on this engine (~0.7 s for the basic image)."""
        layers = _overlay_layers(handle)
        if layers is not None:
            upper, lowers = layers
            return list(_overlay_changes(upper, lowers, "/", within))
        with engine.engine_errors():
            found = handle.diff() or []
        every = ((str(entry["Path"]), int(entry["Kind"])) for entry in found)
        return [(path, kind) for path, kind in every if _all_within(path, within)]

    def path_mode(self, handle: Any, path: str) -> int | None:
        """From the archive endpoint's stat header (HEAD: no content is read)."""
        api = engine.client().api
        url = api._url("/containers/{0}/archive", handle.id)
        with engine.engine_errors():
            answer = api.head(url, params={"path": path})
        header = answer.headers.get("X-Docker-Container-Path-Stat")
        if answer.status_code != 200 or not header:
            return None
        return int(json.loads(base64.b64decode(header)).get("mode", 0))

    def read_image_file(self, image: str, path: str, limit: int) -> bytes:
        """Through a created, never started container of `image` (kind `helper`, removed
        here; `inv clean` finds one a crash left)."""
        with engine.engine_errors():
            reader = engine.client().containers.create(
                image,
                command=["/nonexistent"],
                entrypoint=[],
                network_disabled=True,
                labels=labels.project_labels("helper"),
            )
            try:
                chunks, stat = reader.get_archive(path)
                if int(stat.get("size", 0)) > limit:
                    raise SandboxError(f"{path} in {image} is over {limit} bytes")
                return _only_file(b"".join(chunks), path)
            finally:
                reader.remove(force=True)

    def is_paused(self, sandbox_id: str) -> bool:
        try:
            with engine.engine_errors():
                state = engine.client().api.inspect_container(sandbox_id)["State"]
        except SandboxError:
            return False
        return bool(state.get("Paused"))

    def sharing(self, handle: Any, source: str) -> list[str]:
        api = engine.client().api
        with engine.engine_errors():
            running = api.containers(filters={"status": "running"})
        return [
            str(entry["Names"][0]).lstrip("/")
            for entry in running
            if entry["Id"] != handle.id
            and any(m.get("Source") == source for m in entry.get("Mounts") or [])
        ]

    def host_memory(self) -> int:
        with engine.engine_errors():
            return int(engine.client().info().get("MemTotal") or 0)

    def host_pid_max(self) -> int:
        """kernel.pid_max, when the engine runs on this machine (a unix socket)."""
        if not engine.engine_url().startswith("unix://"):
            return 0
        try:
            return int(Path("/proc/sys/kernel/pid_max").read_text().strip())
        except (OSError, ValueError):
            return 0

    def sandboxes(self) -> list[Any]:
        wanted = {"label": [f"{labels.MANAGED}=true", f"{labels.KIND}=sandbox"]}
        with engine.engine_errors():
            # ignore_removed: a sandbox removed between listing and inspecting is no error.
            found = engine.client().containers.list(all=True, filters=wanted, ignore_removed=True)
            return list(found)


def _pause(handle: Any, attempts: int = PAUSE_ATTEMPTS) -> None:
    """Freeze the container; a freeze the kernel gave up on while the container was busy
    (cgroup v1's freezer, under load: "unable to freeze") is tried again, as runc leaves
    the container running then."""
    for attempt in range(1, attempts + 1):
        try:
            with engine.engine_errors():
                handle.pause()
            return
        except SandboxError as exc:
            if attempt == attempts or FREEZE_REFUSED not in exc.message:
                raise
        time.sleep(PAUSE_RETRY_S * attempt)


def _overlay_layers(handle: Any) -> tuple[Path, list[Path]] | None:
    """The container's writable layer and the layers below it, when the engine keeps them
    on this machine with overlay2 and this process may read them; else None."""
    driver = handle.attrs.get("GraphDriver") or {}
    data = driver.get("Data") or {}
    upper, lower = data.get("UpperDir"), data.get("LowerDir")
    if driver.get("Name") != "overlay2" or not upper or not lower:
        return None
    if not engine.engine_url().startswith("unix://") or not os.access(upper, os.R_OK | os.X_OK):
        return None
    return Path(upper), [Path(layer) for layer in lower.split(":")]


def _overlay_changes(
    upper: Path, lowers: list[Path], folder: str, within: Callable[[str], bool]
) -> Iterator[tuple[str, int]]:
    """What the writable layer holds under `folder`, as the engine's diff reports it: a
    whiteout (a 0/0 character device) is a deletion, an opaque folder a replacement
    (added), anything else added or modified as the layers below have it or not."""
    with os.scandir(upper / folder.lstrip("/")) as entries:
        for entry in entries:
            path = f"{folder.rstrip('/')}/{entry.name}"
            if not within(path):
                continue
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
                yield path, DELETED
                continue
            below = any(os.path.lexists(lower / path.lstrip("/")) for lower in lowers)
            folder_entry = entry.is_dir(follow_symlinks=False)
            replaced = folder_entry and _opaque(entry.path)
            yield path, MODIFIED if below and not replaced else ADDED
            if folder_entry:
                yield from _overlay_changes(upper, lowers, path, within)


def _opaque(folder: str) -> bool:
    """Whether overlayfs marks the folder as hiding everything below it."""
    try:
        return os.getxattr(folder, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def _all_within(path: str, within: Callable[[str], bool]) -> bool:
    """Whether `within` holds for `path` and every folder above it (what a walk that
    skips a folder's contents would report)."""
    parts = path.strip("/").split("/")
    return all(within("/" + "/".join(parts[: end + 1])) for end in range(len(parts)))


def _only_file(archive: bytes, path: str) -> bytes:
    """The regular file a one-member tar archive holds (the archive endpoint's answer)."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        member = tar.next()
        content = tar.extractfile(member) if member is not None and member.isreg() else None
        if content is None:
            raise SandboxError(f"{path} is not a regular file in the image")
        return content.read()


DOCKER = DockerBackend()


def _exit_code(api: Any, exec_id: str, wait_s: float = 10.0) -> int:
    """The exit code of a root exec whose output stream has ended. Under load the engine
    has ended the stream before the process (a lost attach): it is waited for, and one
    still running after `wait_s` is reported as failed (-1), never as a traceback."""
    deadline = time.monotonic() + wait_s
    while True:
        state = api.exec_inspect(exec_id)
        if state.get("ExitCode") is not None and not state.get("Running"):
            return int(state["ExitCode"])
        if time.monotonic() > deadline:
            return -1
        time.sleep(0.05)
