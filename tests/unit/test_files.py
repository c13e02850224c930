"""Batched file transfers, run on this host through `LocalSandbox` (the same batch script
the sandbox runs as its user), and the host-side packing and path checks."""

from __future__ import annotations

import os

import pytest

from stigmer_sandbox import config
from stigmer_sandbox.runtime import LocalSandbox
from stigmer_sandbox.runtime.client import files

from ..conftest import ROOT


@pytest.fixture
def local(tmp_path):
    base = config.load_settings(ROOT, environ={})
    settings = base.replace(workspace=str(tmp_path / "ws"), state_dir=str(tmp_path / "state"))
    return LocalSandbox(settings)


@pytest.mark.parametrize(
    "path",
    ["relative/x", "", "/proc/self/environ", "/sys/x", "/dev/null", "/a\0b", 7, "/x/../proc/1"],
)
def test_paths_no_transfer_should_attempt_are_invalid(path):
    assert files.path_problem(path) == "invalid_path"


def test_round_trips_pack_small_files_and_send_big_ones_alone():
    sizes = [(0, 40), (1, 40), (2, 40), (3, 500), (4, 10)]
    assert list(files._trips(sizes, 100)) == [[0, 1], [2], [3], [4]]


def test_big_uploads_travel_in_pieces_appended_in_order(local, tmp_path, monkeypatch):
    monkeypatch.setattr(files, "UPLOAD_PIECE_BYTES", 1000)
    big, small = bytes(range(256)) * 17, b"small"
    trips = []
    run = local._run_batch
    monkeypatch.setattr(local, "_run_batch", lambda *a: trips.append(a[0]) or run(*a))
    targets = [str(tmp_path / "big.bin"), str(tmp_path / "small"), str(tmp_path / "empty")]
    results = local.upload_files([(targets[0], big), (targets[1], small), (targets[2], b"")])
    assert [r.error for r in results] == [None, None, None]
    assert [(tmp_path / name).read_bytes() for name in ("big.bin", "small", "empty")] == [
        big,
        small,
        b"",
    ]
    assert len(trips) == 5  # 4352 bytes in pieces of 1000; the last 352 share with the rest
    again = local.upload_files([(targets[0], b"shorter")])
    assert again[0].error is None and (tmp_path / "big.bin").read_bytes() == b"shorter"


def test_binary_round_trip_and_errors_per_file(local, tmp_path):
    target = str(tmp_path / "out" / "deep" / "all-bytes.bin")
    payload = bytes(range(256)) * 3
    (tmp_path / "a-dir").mkdir()
    uploads = local.upload_files([(target, payload), ("rel", b""), (str(tmp_path / "a-dir"), b"")])
    assert [u.error for u in uploads] == [None, "invalid_path", "is_directory"]
    downloads = local.download_files([target, str(tmp_path / "missing"), str(tmp_path / "a-dir")])
    assert downloads[0].content == payload
    assert [d.error for d in downloads] == [None, "file_not_found", "is_directory"]


def test_a_fifo_is_refused_without_blocking(local, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert local.download_files([str(fifo)])[0].error == "invalid_path"
    assert local.upload_files([(str(fifo), b"x")])[0].error == "invalid_path"


def test_a_symlink_into_proc_is_refused(local, tmp_path):
    link = tmp_path / "environ"
    link.symlink_to("/proc/self/environ")
    assert local.download_files([str(link)])[0].error == "invalid_path"


def test_downloads_past_the_budget_are_deferred_to_more_trips_in_order(
    local, tmp_path, monkeypatch
):
    monkeypatch.setattr(files, "ROUND_TRIP_BYTES", 1000)
    paths = []
    for index in range(7):
        path = tmp_path / f"f{index}"
        path.write_bytes(bytes([index]) * 400)
        paths.append(str(path))
    trips = []
    run = local._run_batch
    monkeypatch.setattr(local, "_run_batch", lambda *a: trips.append(a[0]) or run(*a))
    results = local.download_files(paths)
    assert [r.content for r in results] == [bytes([i]) * 400 for i in range(7)]
    assert len(trips) == 4  # 2 files of 400 bytes fit a 1000-byte trip


def test_files_over_the_limit_are_too_large(local, tmp_path, monkeypatch):
    monkeypatch.setattr(files, "MAX_FILE_BYTES", 10)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 11)
    assert local.download_files([str(big)])[0].error == "file_too_large"
    assert local.upload_files([(str(big), b"y" * 11)])[0].error == "file_too_large"
    assert big.read_bytes() == b"x" * 11


def test_a_failed_trip_is_one_error_line_per_file(local, monkeypatch):
    def broken(*_args):
        return files.RawResult(1, None, False, False, 0.1, b"", b"Traceback\nBoom: no\n")

    monkeypatch.setattr(local, "_run_batch", broken)
    results = local.upload_files([("/tmp/a", b""), ("/tmp/b", b"")])
    assert [r.error for r in results] == ["error: the transfer failed (Boom: no)"] * 2
    assert local.download_files(["/tmp/a"])[0].error == "error: the transfer failed (Boom: no)"
