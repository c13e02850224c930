"""In-sandbox side of batched file transfers: many files, one command, one round trip.

The host runs this file's source as the sandbox user (`python3 -I -S -c <source> OP`),
so a transfer can reach only what that user could reach with a shell command. It must
stay standard-library Python 3.11 with no imports from the package (the host's
`files` module sends it, and `LocalSandbox` runs it on the host the same way).

upload:   stdin  = JSON header line [{"path": P, "size": N, "append": A}, ...] then the
                   N bytes of each item, in order (`append`: a later piece of a big file)
          stdout = JSON list, one error code (or null) per file
download: stdin  = JSON {"paths": [...], "max_file": N, "budget": B}
          stdout = JSON header line [{"error": E, "size": N}, ...] then the bytes of
                   each file that has no error, in order. A file that would take the
                   reply past `budget` is answered "deferred" (the host asks again).

Error codes are deepagents' (`file_not_found`, `permission_denied`, `is_directory`,
`invalid_path`), plus `file_too_large`, `no_space_left` and `error: <text>`.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from typing import BinaryIO

# Kernel interfaces, not files: reading them can block, never end or leak the process's
# own state, and writing them is never a file upload.
KERNEL_TREES = ("/proc", "/sys", "/dev")
DEFERRED = "deferred"
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
OPEN_FLAGS = os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC


def error_code(exc: OSError) -> str:
    """deepagents' code for an OSError, or `error: <text>` when none fits."""
    return ERROR_CODES.get(exc.errno or 0, f"error: {exc.strerror or exc}")


def in_kernel_tree(path: str) -> bool:
    real = os.path.realpath(path)
    return any(real == tree or real.startswith(tree + "/") for tree in KERNEL_TREES)


def read_exact(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError(f"expected {size} bytes, got {len(data)}")
    return data


def write_file(path: str, data: bytes, append: bool = False) -> str | None:
    """Write one file, or append a later piece of it (parents created); None or a code."""
    if in_kernel_tree(path):
        return "invalid_path"
    mode = os.O_APPEND if append else os.O_TRUNC
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | mode | OPEN_FLAGS, 0o644)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return "invalid_path"
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
    except OSError as exc:
        return error_code(exc)
    return None


def open_regular(path: str, max_file: int) -> tuple[int | None, str | None, int]:
    """An open descriptor on a regular file within the size limit, or an error code."""
    if in_kernel_tree(path):
        return None, "invalid_path", 0
    try:
        fd = os.open(path, os.O_RDONLY | OPEN_FLAGS)
    except OSError as exc:
        return None, error_code(exc), 0
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
        write_file(item["path"], read_exact(source, item["size"]), bool(item.get("append")))
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
