"""Issue 12: `StigmerSandbox`'s contract as a deepagents backend, and bad input, on a real sandbox.

File transfers answer every bad path with the protocol's error code (`file_not_found`,
`permission_denied`, `is_directory`, `invalid_path`, or the documented `file_too_large`),
never an exception; batches cost one round trip each (counted in the audit trail) and are
split, complete and in order, past a round trip's budget. `execute` never raises, keeps
stdout and stderr in the order written, and answers timeouts and OOM kills the way
deepagents' own backends do, leaving nothing running and the sandbox usable.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import pytest

from stigmer_sandbox import engine
from stigmer_sandbox.integrations.deepagents import StigmerSandbox
from stigmer_sandbox.runtime import Sandbox
from stigmer_sandbox.runtime.client.files import MAX_FILE_BYTES, PATHS_PER_TRIP, ROUND_TRIP_BYTES
from stigmer_sandbox.runtime.egress_gateway import bridge_gateway

from .conftest import TEST_LABEL, TEST_LABELS
from .egress_support import RAW_PROBE, host_servers
from .test_runtime import settings_in

MEMORY = "256m"
KERNEL_PATHS = [
    "/proc/self/environ",
    "/proc/1/cmdline",
    "/sys/kernel/mm/transparent_hugepage/enabled",
    "/dev/zero",
    "/dev/null",
    "/tmp/../proc/self/environ",
]
# deepagents' LocalShellBackend wording, which StigmerSandbox promises to keep.
CUSTOM_TIMEOUT_MESSAGE = (
    "Error: Command timed out after {} seconds (custom timeout). "
    "The command may be stuck or require more time."
)
DEFAULT_TIMEOUT_MESSAGE = (
    "Error: Command timed out after {} seconds. "
    "For long-running commands, re-run using the timeout parameter."
)


def new_backend(tmp: Path, **settings) -> StigmerSandbox:
    """An ephemeral backend with this session's test labels and folders in `tmp`."""
    return StigmerSandbox(settings=settings_in(tmp, **settings), extra_labels=TEST_LABELS)


@pytest.fixture(scope="module")
def backend(tmp_path_factory, docker_engine):
    """One hardened sandbox with a small memory limit, shared by this module's tests."""
    with new_backend(tmp_path_factory.mktemp("deepagents-backend"), memory=MEMORY) as sandbox:
        yield sandbox


def run(backend: StigmerSandbox, command: str) -> str:
    """Output of a command that must succeed."""
    response = backend.execute(command)
    assert response.exit_code == 0, response.output
    return response.output


def round_trips(backend: StigmerSandbox, operation: str) -> int:
    """File transfer round trips (`upload` / `download`) the audit trail holds for it."""
    entries = backend.sandbox.audit.tail(1_000_000)
    wanted = f"(file transfer: {operation})"
    return sum(1 for e in entries if e.get("sandbox") == backend.id and e["command"] == wanted)


def upload_errors(backend: StigmerSandbox, *paths: str) -> list[str | None]:
    return [r.error for r in backend.upload_files([(p, b"data") for p in paths])]


def upload_errors_for(backend: StigmerSandbox, path: str, data: bytes) -> list[str | None]:
    return [r.error for r in backend.upload_files([(path, data)])]


def download_errors(backend: StigmerSandbox, *paths: str) -> list[str | None]:
    return [r.error for r in backend.download_files(list(paths))]


# -- paths: every bad one gets the protocol's error code ------------------------------------


def test_relative_paths_are_invalid(backend):
    paths = ["notes.txt", "./notes.txt", "workspace/notes.txt", "", "../etc/passwd"]
    assert upload_errors(backend, *paths) == ["invalid_path"] * len(paths)
    assert download_errors(backend, *paths) == ["invalid_path"] * len(paths)


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_paths_into_proc_sys_and_dev_are_invalid(backend, path):
    assert upload_errors(backend, path) == ["invalid_path"]
    assert download_errors(backend, path) == ["invalid_path"]


def test_symlinks_planted_into_proc_sys_and_dev_are_invalid(backend):
    run(
        backend,
        "mkdir -p /tmp/links && cd /tmp/links && ln -sf /proc/self/environ environ "
        "&& ln -sfn /proc proc && ln -sf /dev/zero zero && ln -sfn /sys sys",
    )
    paths = [
        "/tmp/links/environ",
        "/tmp/links/proc/self/environ",
        "/tmp/links/zero",
        "/tmp/links/sys/kernel/mm/transparent_hugepage/enabled",
    ]
    assert download_errors(backend, *paths) == ["invalid_path"] * len(paths)
    assert upload_errors(backend, *paths) == ["invalid_path"] * len(paths)
    assert run(backend, "readlink /tmp/links/environ /tmp/links/zero").split() == [
        "/proc/self/environ",
        "/dev/zero",
    ]


def test_a_fifo_is_an_invalid_path_and_never_blocks(backend):
    run(backend, "rm -f /tmp/fifo && mkfifo /tmp/fifo")
    started = time.monotonic()
    assert download_errors(backend, "/tmp/fifo") == ["invalid_path"]
    assert upload_errors(backend, "/tmp/fifo") == ["invalid_path"]
    assert time.monotonic() - started < 10
    assert run(backend, "stat -c %F /tmp/fifo") == "fifo\n"


def test_a_nul_in_a_path_is_invalid(backend):
    assert upload_errors(backend, "/tmp/a\0b") == ["invalid_path"]
    assert download_errors(backend, "/tmp/a\0b", "/tmp/\0") == ["invalid_path"] * 2


def test_a_missing_file_is_file_not_found(backend):
    assert (
        download_errors(backend, "/workspace/no-such-file", "/no/such/dir/f")
        == ["file_not_found"] * 2
    )


def test_a_file_the_sandbox_user_cannot_read_or_write_is_permission_denied(backend):
    assert download_errors(backend, "/etc/shadow") == ["permission_denied"]
    assert (
        upload_errors(backend, "/etc/shadow", "/etc/passwd", "/usr/bin/evil")
        == ["permission_denied"] * 3
    )
    assert "sandbox" in run(backend, "cat /etc/passwd")


def test_a_directory_is_is_directory(backend):
    assert download_errors(backend, "/tmp", "/workspace", "/") == ["is_directory"] * 3
    assert upload_errors(backend, "/tmp", "/workspace") == ["is_directory"] * 2


def test_uploading_below_a_file_is_an_invalid_path(backend):
    assert upload_errors(backend, "/workspace/plain") == [None]
    assert (
        upload_errors(backend, "/workspace/plain/child", "/workspace/plain/a/b")
        == ["invalid_path"] * 2
    )
    assert download_errors(backend, "/workspace/plain/child") == ["invalid_path"]
    assert run(backend, "cat /workspace/plain") == "data"


def test_an_upload_over_the_per_file_limit_is_file_too_large_and_spares_the_rest(backend):
    uploads_before = round_trips(backend, "upload")
    huge = b"x" * (MAX_FILE_BYTES + 1)
    results = backend.upload_files([("/workspace/huge", huge), ("/workspace/small", b"small")])
    assert [r.error for r in results] == ["file_too_large", None]
    assert round_trips(backend, "upload") == uploads_before + 1  # the huge one never travels
    assert run(backend, "cat /workspace/small; test ! -e /workspace/huge && echo absent") == (
        "smallabsent\n"
    )


def test_a_download_over_the_per_file_limit_is_file_too_large(backend):
    run(backend, f"truncate -s {MAX_FILE_BYTES + 1} /workspace/sparse-huge")
    assert download_errors(backend, "/workspace/sparse-huge") == ["file_too_large"]


def test_a_file_at_the_per_file_limit_round_trips(backend):
    at_limit = bytes(range(256)) * (MAX_FILE_BYTES // 256) + b"!" * (MAX_FILE_BYTES % 256)
    assert len(at_limit) == MAX_FILE_BYTES
    assert upload_errors_for(backend, "/workspace/at-limit", at_limit) == [None]
    downloaded = backend.download_files(["/workspace/at-limit"])[0]
    assert downloaded.error is None
    assert downloaded.content == at_limit


# -- content and ownership ------------------------------------------------------------------


def test_all_256_byte_values_round_trip(backend):
    every_byte = bytes(range(256)) * 4
    assert upload_errors_for(backend, "/workspace/bin/every-byte", every_byte) == [None]
    [downloaded] = backend.download_files(["/workspace/bin/every-byte"])
    assert (downloaded.error, downloaded.content) == (None, every_byte)
    assert run(backend, "sha256sum < /workspace/bin/every-byte").split()[0] == (
        hashlib.sha256(every_byte).hexdigest()
    )


def test_uploaded_files_and_new_parents_are_owned_by_the_sandbox_user(backend):
    assert upload_errors(backend, "/workspace/new/dirs/owned.txt", "/tmp/owned.txt") == [None] * 2
    uid, gid = backend.sandbox.sandbox_user
    assert run(backend, "id -u; id -g").split() == [str(uid), str(gid)]
    assert uid == 1000
    owners = run(
        backend,
        "stat -c '%u:%g' /workspace/new /workspace/new/dirs /workspace/new/dirs/owned.txt "
        "/tmp/owned.txt",
    )
    assert owners.split() == [f"{uid}:{gid}"] * 4


# -- batches: one round trip each, split past the budget ------------------------------------


def test_fifty_uploads_and_fifty_downloads_cost_one_round_trip_each(backend):
    files = [(f"/workspace/batch/{i:02d}.txt", f"file {i}\n".encode()) for i in range(50)]
    uploads, downloads = round_trips(backend, "upload"), round_trips(backend, "download")
    assert [r.error for r in backend.upload_files(files)] == [None] * 50
    results = backend.download_files([path for path, _ in files])
    assert [(r.path, r.error, r.content) for r in results] == [(p, None, d) for p, d in files]
    assert round_trips(backend, "upload") == uploads + 1
    assert round_trips(backend, "download") == downloads + 1


def test_an_empty_batch_costs_no_round_trip(backend):
    uploads, downloads = round_trips(backend, "upload"), round_trips(backend, "download")
    assert backend.upload_files([]) == []
    assert backend.download_files([]) == []
    assert (round_trips(backend, "upload"), round_trips(backend, "download")) == (
        uploads,
        downloads,
    )


def test_a_batch_over_the_byte_budget_is_split_complete_and_in_order(backend):
    size = ROUND_TRIP_BYTES // 3  # three fill a round trip; five need two
    files = [(f"/workspace/big/{i}", bytes([65 + i]) * size) for i in range(5)]
    uploads, downloads = round_trips(backend, "upload"), round_trips(backend, "download")
    assert [r.error for r in backend.upload_files(files)] == [None] * 5
    results = backend.download_files([path for path, _ in files])
    assert [r.path for r in results] == [path for path, _ in files]
    assert [r.error for r in results] == [None] * 5
    assert [r.content for r in results] == [data for _, data in files]
    # Uploads go in pieces of UPLOAD_PIECE_BYTES (8 MiB): each 10.7 MiB file is a full
    # piece and a 2.7 MiB one, and no two pieces share a trip (8 + 2.7 > 8): 10 trips.
    assert round_trips(backend, "upload") == uploads + 10
    assert round_trips(backend, "download") == downloads + 2


def test_a_batch_over_the_path_budget_is_split_complete_and_in_order(backend):
    count = PATHS_PER_TRIP + 1
    files = [(f"/workspace/many/{i}", str(i).encode()) for i in range(count)]
    uploads, downloads = round_trips(backend, "upload"), round_trips(backend, "download")
    assert all(r.error is None for r in backend.upload_files(files))
    results = backend.download_files([path for path, _ in files])
    assert [(r.path, r.content) for r in results] == files
    assert round_trips(backend, "upload") == uploads + 2
    assert round_trips(backend, "download") == downloads + 2


# -- async twins ----------------------------------------------------------------------------


async def test_async_twins_work_concurrently(backend):
    backend.upload_files([("/workspace/async/existing", b"before")])
    started = time.monotonic()
    *executed, uploaded, downloaded = await asyncio.gather(
        *(backend.aexecute(f"sleep 1.5; echo command {i}") for i in range(3)),
        backend.aupload_files([("/workspace/async/new", b"after")]),
        backend.adownload_files(["/workspace/async/existing"]),
    )
    elapsed = time.monotonic() - started
    assert [(r.output, r.exit_code) for r in executed] == [(f"command {i}\n", 0) for i in range(3)]
    assert [r.error for r in uploaded] == [None]
    assert [(r.error, r.content) for r in downloaded] == [(None, b"before")]
    assert elapsed < 3.0, f"the three 1.5 s commands took {elapsed:.1f} s: not concurrent"
    assert run(backend, "cat /workspace/async/new") == "after"


async def test_async_execute_honours_a_custom_timeout(backend):
    response = await backend.aexecute("echo partial; sleep 30", timeout=1)
    assert response.exit_code == 124
    assert response.output == "partial\n\n" + CUSTOM_TIMEOUT_MESSAGE.format(1)


# -- execute ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "timeout", "reason"),
    [
        ("", None, "empty command"),
        ("   \n\t", None, "empty command"),
        ("echo a\0b", None, "NUL"),
        ("echo hi", -5, "timeout must be between"),
    ],
    ids=["empty", "blank", "nul-byte", "negative-timeout"],
)
def test_execute_never_raises_and_says_what_was_wrong(backend, command, timeout, reason):
    response = backend.execute(command, timeout=timeout)
    assert response.exit_code == 1
    assert response.output.startswith("Error: ")
    assert reason in response.output


def test_stdout_and_stderr_come_back_merged_in_the_order_written(backend):
    response = backend.execute(
        "for i in $(seq 1 200); do echo out$i; echo err$i >&2; done; "
        "printf 'no newline on stdout, '; printf 'then stderr\\n' >&2"
    )
    expected = "".join(f"out{i}\nerr{i}\n" for i in range(1, 201))
    assert response.output == expected + "no newline on stdout, then stderr\n"
    assert response.exit_code == 0


def test_an_exit_code_is_kept(backend):
    response = backend.execute("echo failing >&2; exit 7")
    assert (response.output, response.exit_code, response.truncated) == ("failing\n", 7, False)


def test_a_timeout_gives_124_deepagents_message_and_the_partial_output(backend):
    started = time.monotonic()
    response = backend.execute("echo before the kill; echo on stderr >&2; sleep 60", timeout=1)
    assert time.monotonic() - started < 10
    assert response.exit_code == 124
    assert response.output == ("before the kill\non stderr\n\n" + CUSTOM_TIMEOUT_MESSAGE.format(1))
    assert backend.execute("echo usable").output == "usable\n"


def test_a_setsid_escapee_is_gone_after_a_timeout(backend):
    response = backend.execute(
        "setsid bash -c 'touch /tmp/escapee-ran; exec sleep 4242' & sleep 60", timeout=1
    )
    assert response.exit_code == 124
    assert run(backend, "cat /tmp/escapee-ran && echo ran") == "ran\n"
    # The bracket keeps pgrep's own bash from matching the pattern.
    survivors = backend.execute("pgrep -af 'slee[p] 4242'")
    assert (survivors.exit_code, survivors.output) == (1, "")


def test_timeout_none_and_zero_use_the_configured_default(tmp_path, docker_engine):
    with new_backend(tmp_path, timeout=2) as quick:
        for timeout in (None, 0):
            started = time.monotonic()
            response = quick.execute("echo waiting; sleep 60", timeout=timeout)
            elapsed = time.monotonic() - started
            assert response.exit_code == 124, timeout
            assert response.output == "waiting\n\n" + DEFAULT_TIMEOUT_MESSAGE.format(2)
            assert 2 <= elapsed < 10, (timeout, elapsed)


def test_an_out_of_memory_command_reports_the_oom(backend):
    response = backend.execute(
        "echo allocating; python3 -c 'x = bytearray(1024 * 1024 * 1024); print(len(x))'"
    )
    assert response.exit_code == 137
    assert response.output.startswith("allocating\n")
    assert "ran out of memory" in response.output
    assert backend.execute("echo survived").output == "survived\n"


def test_execute_with_offload_at_the_middlewares_capture_path_keeps_exit_code_and_output(
    backend,
):
    """`enable_capture_offload` is on, so deepagents' `execute` tool wraps every command
    to capture its output at `/large_tool_results/<tool call id>` (FilesystemMiddleware's
    path for a backend that is not a CompositeBackend)."""
    result = backend.execute_with_offload(
        "echo visible; exit 3", "/large_tool_results/call-1", max_inline_bytes=80_000
    )
    assert result.offloaded is False
    assert (result.response.output, result.response.exit_code) == ("visible\n", 3)


# -- identity and lifecycle -----------------------------------------------------------------


def test_id_is_the_sandbox_name(backend):
    assert backend.id == backend.sandbox.name
    container = engine.find_container(backend.id)
    assert container is not None
    assert container.name == backend.id
    assert container.labels[TEST_LABEL] == TEST_LABELS[TEST_LABEL]


def test_an_ephemeral_backend_removes_its_container_on_close(tmp_path, docker_engine):
    backend = new_backend(tmp_path)
    name = backend.id
    assert backend.execute("echo up").output == "up\n"
    assert engine.find_container(name).status == "running"
    backend.close()
    assert engine.find_container(name) is None


def test_a_caller_owned_sandbox_keeps_running_after_close(tmp_path, docker_engine):
    with Sandbox.create_ephemeral(settings_in(tmp_path), extra_labels=TEST_LABELS) as owned:
        backend = StigmerSandbox(owned)
        assert backend.id == owned.name
        assert backend.execute("echo through the backend").output == "through the backend\n"
        backend.close()
        container = engine.find_container(owned.name)
        assert container is not None
        assert container.status == "running"
        assert owned.exec("echo still mine").stdout == "still mine\n"
    assert engine.find_container(owned.name) is None


# -- egress: the backend takes the same policy keywords as `Sandbox` -----------------------


def test_the_backend_takes_an_egress_policy_and_its_commands_are_held_to_it(tmp_path):
    with host_servers(2) as [allowed, other]:
        host = bridge_gateway()
        with StigmerSandbox(
            settings=settings_in(tmp_path),
            extra_labels=TEST_LABELS,
            egress="allowlist",
            allow=[f"{host}:{allowed}"],
        ) as backend:
            fetch = "curl -s -m 6 -o /dev/null -w '%{{http_code}}' http://{}:{}/"
            assert backend.execute(fetch.format(host, allowed)).output == "200"
            refused = backend.execute(fetch.format(host, other)).output
            assert refused in ("000", "403")
            assert backend.execute(f"python3 -c '{RAW}' {host} {other}").output.startswith(
                "refused"
            )


RAW = RAW_PROBE.replace("'", '"')
