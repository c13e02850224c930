"""In-sandbox side of batched file transfers: many files, one command, one round trip.

The host runs this file's source as the sandbox user (`python3 -I -S -c <source> OP`),
so a transfer can reach only what that user could reach with a shell command. It must
stay standard-library Python 3.11 with no imports from the package (the host's
`files` module sends it, and `LocalSandbox` runs it on the host the same way).

upload:   stdin  = JSON header line [{"path": P, "size": N, "append": A, "mode": M}, ...]
                   then the N bytes of each item, in order (`append`: a later piece of a
                   big file; `mode`: permissions to set, or null to keep them)
          stdout = JSON list, one error code (or null) per file
download: stdin  = JSON {"paths": [...], "max_file": N, "budget": B}
          stdout = JSON header line [{"error": E, "size": N}, ...] then the bytes of
                   each file that has no error, in order. A file that would take the
                   reply past `budget` is answered "deferred" (the host asks again).

Paths are resolved one name at a time from folder descriptors (`Walk`): a symlink the
sandbox user could have planted is never followed, so a command racing a transfer by
swapping its folder for a link (to /etc, /proc/self, another folder) or a FIFO gets that
file an error, never a write or read elsewhere or a blocked transfer.

Error codes are deepagents' (`file_not_found`, `permission_denied`, `is_directory`,
`invalid_path`), plus `file_too_large`, `no_space_left` and `error: <text>`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import sys
from typing import BinaryIO

with contextlib.suppress(ImportError):  # in the sandbox: protocol.py's source runs first
    from .protocol import DEFERRED, KERNEL_TREES

ERROR_CODES = {
    errno.ENOENT: "file_not_found",
    errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied",
    errno.EROFS: "permission_denied",
    errno.EISDIR: "is_directory",
    errno.ENOTDIR: "invalid_path",
    errno.ENAMETOOLONG: "invalid_path",
    errno.ELOOP: "invalid_path",
    errno.ENXIO: "invalid_path",
    errno.EEXIST: "invalid_path",
    errno.ENOSPC: "no_space_left",
    errno.EDQUOT: "no_space_left",
    errno.EFBIG: "file_too_large",
}
OPEN_FLAGS = os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW
FOLDER_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
LINK_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_LINKS = 40  # the kernel's own limit on links followed in one path


class Refused(Exception):
    """A path no transfer goes through, with its error code."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def error_code(exc: OSError) -> str:
    """deepagents' code for an OSError, or `error: <text>` when none fits."""
    return ERROR_CODES.get(exc.errno or 0, f"error: {exc.strerror or exc}")


def in_kernel_tree(path: str) -> bool:
    return any(path == tree or path.startswith(tree + "/") for tree in KERNEL_TREES)


def names_of(path: str) -> list[str]:
    """The names to resolve in order; the last is `.` when the path names a folder
    (`/`, `a/`, `a/.`), so a write to it is `is_directory` as the kernel would say."""
    *folders, final = path.split("/")
    return [name for name in folders if name not in ("", ".")] + [final or "."]


class Walk:
    """A path resolved one name at a time from descriptors, never by name from `/` again.

    A symlink is followed only when root owns it (the system's own, like /bin -> usr/bin):
    one the sandbox user could have planted is refused, so a command that swaps a folder
    for a link while a transfer runs cannot send it anywhere else. `where` is the physical
    path reached so far, so a root-owned link into /proc, /sys or /dev is refused too.
    """

    def __init__(self, path: str) -> None:
        self.pending = names_of(path)[::-1]  # a stack: the next name last
        self.fd = os.open("/", FOLDER_FLAGS)
        self.where = "/"
        self.links = 0

    def close(self) -> None:
        os.close(self.fd)

    def enter(self, name: str, create: bool) -> None:
        """Step into folder `name`, made if missing and `create`, or through a root link."""
        for _attempt in range(3):  # a folder made or removed meanwhile: look again
            try:
                fd = os.open(name, FOLDER_FLAGS, dir_fd=self.fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o777, dir_fd=self.fd)
                continue
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP) and self.follow(name):
                    return
                raise
            self.moved_to(fd, name)
            return
        raise Refused("error: the folder kept changing while it was created")

    def moved_to(self, fd: int, name: str) -> None:
        os.close(self.fd)
        self.fd = fd
        if name == "..":
            self.where = os.path.dirname(self.where)
        elif name != ".":
            self.where = os.path.join(self.where, name)
        if in_kernel_tree(self.where):
            raise Refused("invalid_path")

    def follow(self, name: str) -> bool:
        """Follow `name` if it is a link root owns (its target read from the link opened
        once, so a swap meanwhile cannot change it); False for anything else."""
        try:
            fd = os.open(name, LINK_FLAGS, dir_fd=self.fd)
        except OSError:
            return False
        try:
            info = os.fstat(fd)
            if not stat.S_ISLNK(info.st_mode):
                return False
            if info.st_uid != 0:
                raise Refused("invalid_path")
            target = os.readlink("", dir_fd=fd)
        finally:
            os.close(fd)
        self.links += 1
        if self.links > MAX_LINKS or not target:
            raise Refused("invalid_path")
        self.pending.extend(names_of(target)[::-1])
        if target.startswith("/"):
            self.moved_to(os.open("/", FOLDER_FLAGS), "/")
        return True


def open_path(path: str, flags: int, create_parents: bool = False) -> int:
    """Open `path` with `flags` (see `Walk`): refused when a folder or the file itself is a
    link its user could have planted, or it leads into a kernel tree."""
    walk = Walk(path)
    try:
        while True:
            while len(walk.pending) > 1:
                walk.enter(walk.pending.pop(), create_parents)
            name = walk.pending.pop()
            try:
                return os.open(name, flags | OPEN_FLAGS, 0o644, dir_fd=walk.fd)
            except OSError as exc:  # a root link goes on with its target's names
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR) or not walk.follow(name):
                    raise
    finally:
        walk.close()


def read_exact(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError(f"expected {size} bytes, got {len(data)}")
    return data


def write_file(path: str, data: bytes, append: bool = False, mode: int | None = None) -> str | None:
    """Write one file, or append a later piece of it (parents created), with permissions
    `mode` if given; None or an error code."""
    how = os.O_APPEND if append else os.O_TRUNC
    try:
        fd = open_path(path, os.O_WRONLY | os.O_CREAT | how, create_parents=True)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return "invalid_path"
            if mode is not None:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
    except Refused as refused:
        return refused.code
    except OSError as exc:
        return error_code(exc)
    except ValueError:  # a NUL or an unencodable name: the host checks, this never trusts
        return "invalid_path"
    return None


def open_regular(path: str, max_file: int) -> tuple[int | None, str | None, int]:
    """An open descriptor on a regular file within the size limit, or an error code."""
    try:
        fd = open_path(path, os.O_RDONLY)
    except Refused as refused:
        return None, refused.code, 0
    except OSError as exc:
        return None, error_code(exc), 0
    except ValueError:
        return None, "invalid_path", 0
    info = os.fstat(fd)
    error = None
    if stat.S_ISDIR(info.st_mode):
        error = "is_directory"
    elif not stat.S_ISREG(info.st_mode):
        error = "invalid_path"
    elif info.st_size > max_file:
        error = "file_too_large"
    if error:
        os.close(fd)
        return None, error, 0
    return fd, None, info.st_size


def read_file(fd: int, max_file: int) -> tuple[bytes | None, str | None]:
    """The file's bytes (it may have changed size since it was opened)."""
    chunks: list[bytes] = []
    total = 0
    try:
        while True:
            chunk = os.read(fd, min(1 << 20, max_file + 1 - total))
            if not chunk:
                return b"".join(chunks), None
            chunks.append(chunk)
            total += len(chunk)
            if total > max_file:
                return None, "file_too_large"
    except OSError as exc:
        return None, error_code(exc)
    finally:
        os.close(fd)


def upload(source: BinaryIO, sink: BinaryIO) -> None:
    header = json.loads(source.readline())
    results = [
        write_file(
            item["path"],
            read_exact(source, item["size"]),
            bool(item.get("append")),
            item.get("mode"),
        )
        for item in header
    ]
    sink.write(json.dumps(results).encode())


def download(source: BinaryIO, sink: BinaryIO) -> None:
    request = json.loads(source.read())
    max_file, budget = int(request["max_file"]), int(request["budget"])
    header: list[dict[str, object]] = []
    blobs: list[bytes] = []
    used = 0
    for path in request["paths"]:
        fd, error, size = open_regular(path, max_file)
        if fd is not None and blobs and used + size > budget:
            os.close(fd)
            fd, error = None, DEFERRED
        data = None
        if fd is not None:
            data, error = read_file(fd, max_file)
        if data is not None:
            blobs.append(data)
            used += len(data)
        header.append({"error": error, "size": len(data) if data is not None else 0})
    sink.write(json.dumps(header).encode() + b"\n")
    for blob in blobs:
        sink.write(blob)


def main() -> None:
    operation = {"upload": upload, "download": download}[sys.argv[1]]
    operation(sys.stdin.buffer, sys.stdout.buffer)
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
