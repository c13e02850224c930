"""Batched file transfers by absolute path, as the sandbox user: one round trip per batch.

    results = sandbox.upload_files([("/workspace/a.py", b"print(1)\\n")])
    [r.error for r in results]                     # [None]
    sandbox.download_files(["/workspace/a.py"])[0].content

Each batch is one command running `file_batch` in the sandbox (see there for the wire
format). Nothing raises for a file: each result carries deepagents' error code
(`file_not_found`, `permission_denied`, `is_directory`, `invalid_path`), or
`file_too_large`, `no_space_left`, or a sentence when the transfer itself failed.
Batches larger than one round trip's budget are split, never truncated. A path may be
text (lone surrogates stand for undecodable bytes, as `os.fsdecode` makes them) or bytes;
an entry that is not a (path, bytes) pair is answered with an error like any other file.
`write_file` / `read_file` move one file the same way and raise a UsageError saying why
not (`Sandbox.put_file` / `get_file`).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from ... import config, policy
from ...errors import UsageError
from ..guest import protocol
from .commands import RawResult, from_bytes, to_bytes

# One file at most; a reply (header + data) must fit in one output stream.
MAX_FILE_BYTES = config.MAX_OUTPUT_LIMIT - 4 * 1024 * 1024
# Bytes of file data one download round trip carries when several files share it.
ROUND_TRIP_BYTES = 32 * 1024 * 1024
# Uploads arrive in the sandbox as one JSON line that its agent decodes in memory (about
# 5x the data): pieces this big keep that within a small sandbox's memory limit.
UPLOAD_PIECE_BYTES = 8 * 1024 * 1024
PATHS_PER_TRIP = 2000
TRANSFER_TIMEOUT_S = 120.0
# `get_file`'s largest read (a command's output limit, less the transfer's header).
MAX_GET_BYTES = config.MAX_OUTPUT_LIMIT - 2
# File transfers use root-owned tools only: the sandbox user owns /opt/venv/bin, first on
# its PATH.
SYSTEM_PATH = "/usr/bin:/bin"


@dataclass(frozen=True)
class FileTransfer:
    """One file's outcome: `content` for a download that worked, else `error` or None."""

    path: str
    content: bytes | None = None
    error: str | None = None


@dataclass(frozen=True)
class Upload:
    """One upload entry, checked: `problem` is its answer when nothing is to be sent."""

    path: str
    data: bytes | bytearray = b""
    problem: str | None = None
    mode: int | None = None


NOT_A_PAIR = "error: each file must be a (path, bytes) pair"


def as_path(path: object) -> str | None:
    """A requested path as text that round trips: bytes and path objects decoded the way
    Linux names go (b"/w/x\\xff" is "/w/x\\udcff"); None for what names no path."""
    if isinstance(path, os.PathLike):
        try:
            path = os.fspath(path)
        except TypeError:  # its __fspath__ gave neither text nor bytes
            return None
    if isinstance(path, bytes):
        return from_bytes(path)
    return path if isinstance(path, str) else None


def shown_path(path: object) -> str:
    """How a result names the path it was asked for."""
    text = as_path(path)
    return repr(path) if text is None else text


def path_problem(path: object) -> str | None:
    """`invalid_path` for what no transfer should attempt, checked on the host."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        return "invalid_path"
    try:
        to_bytes(path)
    except UsageError:  # a surrogate that stands for no byte names no file
        return "invalid_path"
    normal = posixpath.normpath(path)
    if any(normal == t or normal.startswith(t + "/") for t in protocol.KERNEL_TREES):
        return "invalid_path"
    return None


def checked_upload(entry: object, mode: int | None = None) -> Upload:
    """An upload entry (path, bytes) checked on the host; never raises."""
    if not isinstance(entry, tuple | list) or len(entry) != 2:
        return Upload(shown_path(entry), problem=NOT_A_PAIR)
    raw_path, data = entry
    path = shown_path(raw_path)
    problem = path_problem(as_path(raw_path))
    if problem is None and not isinstance(data, bytes | bytearray):
        problem = "error: content must be bytes"
    elif problem is None and len(data) > MAX_FILE_BYTES:
        problem = "file_too_large"
    return Upload(path, data if problem is None else b"", problem, mode)


def listed(items: object, what: str) -> list[object]:
    """A batch's entries as a list; a UsageError when it is no collection of them."""
    if isinstance(items, str | bytes) or not isinstance(items, Iterable):
        raise UsageError(f"{what} must be a list, got {type(items).__name__}")
    return list(items)


def _trips(sizes: Sequence[tuple[int, int]], budget: int) -> Iterator[list[int]]:
    """Indexes grouped into round trips of at most `budget` bytes (a bigger item alone)."""
    trip: list[int] = []
    used = 0
    for index, size in sizes:
        if trip and (used + size > budget or len(trip) >= PATHS_PER_TRIP):
            yield trip
            trip, used = [], 0
        trip.append(index)
        used += size
    if trip:
        yield trip


class FileTransfers(ABC):
    """`upload_files` / `download_files` for any sandbox that can run the batch script, and
    `put_file` / `get_file` for one file under its workspace (`workspace_root`)."""

    workspace_root = policy.WORKSPACE

    @abstractmethod
    def _run_batch(self, argv: list[str], stdin: bytes, output_limit: int) -> RawResult:
        """Run the batch script (argv is its arguments after the interpreter)."""

    def upload_files(self, files: Iterable[tuple[str, bytes]]) -> list[FileTransfer]:
        """Write each (absolute path, bytes) as the sandbox user, creating parent folders.
        Large files travel in pieces of UPLOAD_PIECE_BYTES (appended in order), so the
        sandbox's memory use stays bounded whatever the size."""
        uploads = [checked_upload(entry) for entry in listed(files, "files")]
        return self._upload(uploads)

    def write_file(self, path: str, data: bytes, mode: int) -> None:
        """Write one file by absolute path with permissions `mode`, as `upload_files`
        does; a UsageError naming the path and why it could not be written."""
        done = self._upload([checked_upload((path, data), mode & 0o7777)])[0]
        if done.error:
            raise UsageError(f"{path}: {_explained(done.error)}")

    def _upload(self, uploads: list[Upload]) -> list[FileTransfer]:
        errors = {index: upload.problem for index, upload in enumerate(uploads)}
        pieces: list[tuple[int, int, int]] = []  # (file, offset, size)
        for index, upload in enumerate(uploads):
            if upload.problem is None:
                size = len(upload.data)
                for offset in range(0, max(size, 1), UPLOAD_PIECE_BYTES):
                    pieces.append((index, offset, min(UPLOAD_PIECE_BYTES, size - offset)))
        sizes = [(number, piece[2]) for number, piece in enumerate(pieces)]
        for trip in _trips(sizes, UPLOAD_PIECE_BYTES):
            wanted = [pieces[n] for n in trip if errors[pieces[n][0]] is None]
            if wanted:
                self._upload_trip(uploads, wanted, errors)
        return [FileTransfer(upload.path, error=errors[i]) for i, upload in enumerate(uploads)]

    def _upload_trip(
        self,
        uploads: list[Upload],
        pieces: list[tuple[int, int, int]],
        errors: dict[int, str | None],
    ) -> None:
        items = [
            {"path": uploads[i].path, "size": n, "append": o > 0, "mode": uploads[i].mode}
            for i, o, n in pieces
        ]
        chunks = [bytes(uploads[i].data[o : o + n]) for i, o, n in pieces]
        stdin = b"".join([json.dumps(items).encode(), b"\n", *chunks])
        raw = self._run_batch(["upload"], stdin, 1024 * 1024)
        answer: object = None
        if raw.exit_code == 0:
            with contextlib.suppress(ValueError):
                answer = json.loads(raw.stdout)
        if not (isinstance(answer, list) and len(answer) == len(pieces)):
            answer = [_trip_failure(raw)] * len(pieces)
        for (index, _offset, _size), code in zip(pieces, answer, strict=True):
            errors[index] = errors[index] or (str(code) if code is not None else None)

    def _workspace_path(self, path: str) -> str:
        """`path` (relative to the workspace) checked for `..` and absoluteness."""
        parts = posixpath.normpath(path).split("/") if path else []
        if not path or path.startswith("/") or ".." in path.split("/") or "\0" in path:
            raise UsageError(f"path must be relative to {policy.WORKSPACE} without '..': {path!r}")
        return posixpath.join(self.workspace_root, *parts)

    def put_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Write a file under the workspace as the sandbox user, creating its folders; the
        path is resolved one name at a time without following a symlink (a folder swapped
        for one meanwhile fails the write, never redirects it). Text keeps undecodable
        bytes."""
        payload = to_bytes(data, "the data") if isinstance(data, str) else data
        self.write_file(self._workspace_path(path), payload, mode)

    def get_file(self, path: str, max_bytes: int = MAX_GET_BYTES) -> bytes:
        """Read a regular file under the workspace (no symlinks, at most `max_bytes`); the
        size is checked before a byte is read, so host memory stays bounded, and a FIFO is
        refused rather than waited on."""
        if not 0 <= max_bytes <= MAX_GET_BYTES:
            raise UsageError(f"max_bytes must be between 0 and {MAX_GET_BYTES}")
        return self.read_file(self._workspace_path(path), max_bytes)

    def download_files(self, paths: Iterable[str]) -> list[FileTransfer]:
        """Read each absolute path as the sandbox user (regular files only, size checked
        before reading)."""
        return self._download(listed(paths, "paths"), MAX_FILE_BYTES)

    def read_file(self, path: str, max_bytes: int) -> bytes:
        """One regular file's bytes by absolute path, at most `max_bytes` (checked before
        a byte is read); a UsageError naming the path and why it could not be read."""
        done = self._download([path], max_bytes)[0]
        if done.error or done.content is None:
            limit = f" (the limit is {max_bytes} bytes)" if done.error == "file_too_large" else ""
            raise UsageError(f"{path}: {_explained(done.error or 'no content')}{limit}")
        return done.content

    def _download(self, requested: list[object], max_file: int) -> list[FileTransfer]:
        results: dict[int, FileTransfer] = {}
        pending = []
        paths = [shown_path(path) for path in requested]
        for index, (raw_path, path) in enumerate(zip(requested, paths, strict=True)):
            problem = path_problem(as_path(raw_path))
            if problem:
                results[index] = FileTransfer(path, error=problem)
            else:
                pending.append(index)
        while pending:
            trip = pending[:PATHS_PER_TRIP]
            answered = self._download_trip([paths[i] for i in trip], max_file)
            deferred = [i for i, item in zip(trip, answered, strict=True) if item is None]
            results.update(
                (i, item) for i, item in zip(trip, answered, strict=True) if item is not None
            )
            pending = deferred + pending[len(trip) :]
        return [results[i] for i in range(len(paths))]

    def _download_trip(self, paths: list[str], max_file: int) -> list[FileTransfer | None]:
        """One round trip: a result per path, None for one deferred to the next trip."""
        request = {"paths": paths, "max_file": max_file, "budget": ROUND_TRIP_BYTES}
        raw = self._run_batch(["download"], json.dumps(request).encode(), config.MAX_OUTPUT_LIMIT)
        try:  # written by a process of the sandbox user: checked, never trusted
            return _decode_download(paths, raw)
        except (ValueError, TypeError, AttributeError):
            return [FileTransfer(p, error=_trip_failure(raw)) for p in paths]


def _decode_download(paths: list[str], raw: RawResult) -> list[FileTransfer | None]:
    if raw.exit_code != 0 or any(raw.truncated.values()):
        raise ValueError("the transfer did not complete")
    header_line, _, data = raw.stdout.partition(b"\n")
    header = json.loads(header_line)
    if not isinstance(header, list) or len(header) != len(paths):
        raise ValueError("the transfer's answer does not match its request")
    results: list[FileTransfer | None] = []
    offset = 0
    for path, item in zip(paths, header, strict=True):
        error, size = item.get("error"), int(item.get("size", 0))
        if error == protocol.DEFERRED:
            results.append(None)
        elif error:
            results.append(FileTransfer(path, error=str(error)))
        else:
            results.append(FileTransfer(path, content=data[offset : offset + size]))
            offset += size
    if offset != len(data):
        raise ValueError("the transfer's data does not match its header")
    return results


def _trip_failure(raw: RawResult) -> str:
    """Why a whole round trip failed, as one line for each of its files."""
    if raw.timed_out:
        return "error: the transfer timed out"
    lines = raw.stderr.decode(errors="replace").strip().splitlines()
    reason = raw.error or (lines[-1] if lines else f"exit code {raw.exit_code}")
    return f"error: the transfer failed ({reason[:200]})"


EXPLAINED = {
    "invalid_path": "not a regular file reachable without a symlink the sandbox user "
    "could have made (or a kernel path)",
    "file_not_found": "no such file",
    "permission_denied": "permission denied",
    "is_directory": "is a directory",
    "file_too_large": "too large",
    "no_space_left": "no space left on the device",
}


def _explained(code: str) -> str:
    """A transfer's error code as a person reads it (an `error: ...` sentence as it is)."""
    return EXPLAINED.get(code, code.removeprefix("error: "))
