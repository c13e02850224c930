"""Issue 20 (red team): file transfers racing a hostile command that swaps their folder.

While `upload_files` / `download_files` / `put_file` / `get_file` run, a background command
of the sandbox user keeps replacing the target folder with a symlink (to a folder outside
/workspace, /etc, /proc/self) or a FIFO, and the target files with FIFOs. Every transfer
must either do what it was asked or answer that file with an error: nothing is written or
read through a swapped symlink, nothing blocks on a FIFO, nothing raises, and the sandbox
answers at once afterwards. Each race is bounded in time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import pytest

from stigmer_sandbox.errors import UsageError
from stigmer_sandbox.runtime import Sandbox

from .test_runtime import make_sandbox

RACE_S = 4.0
FILES = 40
# One transfer call may take this long at most (a blocked FIFO would take 120 s).
CALL_LIMIT_S = 20.0
RACE_DIR = "/workspace/race"
TARGET = f"{RACE_DIR}/d"
OUTSIDE = "/tmp/outside"  # the sandbox user may write here, but no transfer asked to
CANARY = b"OUTSIDE-CANARY"
UPLOAD_ERRORS = {
    None,
    "invalid_path",
    "file_not_found",
    "is_directory",
    "permission_denied",
    "error: the folder kept changing while it was created",
}
# What the folder becomes in turn; the names inside it are what the transfers ask for.
SWAPPER = f"""
mkdir -p {OUTSIDE} && printf %s {CANARY.decode()} > {OUTSIDE}/canary
for i in $(seq 0 {FILES}); do ln -sf canary {OUTSIDE}/f$i; done
cd {RACE_DIR} || exit 1
end=$((SECONDS + {int(RACE_S) + 2}))
while [ $SECONDS -lt $end ]; do
  for target in {OUTSIDE} /etc /proc/self; do
    rm -rf d; mkdir d; rm -rf d; ln -sfn $target d; sleep 0.002
  done
  rm -rf d; mkfifo d; sleep 0.002
  rm -rf d; mkdir d; for i in 0 1 2 3; do mkfifo d/f$i; done; ln -s /etc/hostname d/f5
  ln -s {OUTSIDE}/canary d/f6; for i in 7 8 9; do printf uploaded > d/f$i; done; sleep 0.05
done
"""


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, docker_engine):
    """A sandbox of its own: the swapper's symlinks and FIFOs must not meet other tests."""
    with make_sandbox(tmp_path_factory.mktemp("races"), memory="256m", pids_limit=256) as box:
        yield box


def race(sandbox: Sandbox, transfer: Callable[[int], list[bytes | None]]) -> list[bytes | None]:
    """Run `transfer(round)` over and over while the swapper runs; what it downloaded."""
    assert sandbox.exec(f"rm -rf {RACE_DIR} {OUTSIDE} && mkdir -p {RACE_DIR}").exit_code == 0
    swapper = sandbox.start(SWAPPER, timeout=RACE_S + 30)
    seen: list[bytes | None] = []
    deadline = time.monotonic() + RACE_S
    rounds = 0
    try:
        while time.monotonic() < deadline:
            started = time.monotonic()
            seen += transfer(rounds)
            assert time.monotonic() - started < CALL_LIMIT_S, "a transfer blocked"
            rounds += 1
    finally:
        swapper.kill()
    assert rounds >= 2, "the race did not run"
    assert_nothing_escaped(sandbox)
    return seen


def assert_nothing_escaped(sandbox: Sandbox) -> None:
    """Only the swapper's own files are outside, untouched, and the sandbox answers."""
    started = time.monotonic()
    outside = sandbox.exec(f"find {OUTSIDE} -type f; cat {OUTSIDE}/canary")
    assert time.monotonic() - started < 5
    assert outside.stdout == f"{OUTSIDE}/canary\n{CANARY.decode()}", outside.stdout


def upload_round(sandbox: Sandbox) -> list[str | None]:
    """Upload every target (and one into the batch's own stdout through /proc/self)."""
    files = [(f"{TARGET}/f{i}", b"uploaded") for i in range(FILES)]
    files.append((f"{TARGET}/fd/1", b'[null, "forged"]'))
    errors = [item.error for item in sandbox.upload_files(files)]
    assert set(errors) <= UPLOAD_ERRORS, errors
    return errors


def download_round(sandbox: Sandbox) -> list[bytes | None]:
    paths = [f"{TARGET}/f{i}" for i in range(FILES)] + [f"{TARGET}/environ"]
    results = sandbox.download_files(paths)
    assert all(r.error is None or isinstance(r.error, str) for r in results)
    return [r.content for r in results]


def assert_nothing_read_through_a_link(sandbox: Sandbox, seen: list[bytes | None]) -> None:
    """No download brought the canary, a process environment or /etc/hostname (each is
    only reachable through a link the swapper planted)."""
    hostname = sandbox.exec("cat /etc/hostname").stdout.encode()
    contents = [c for c in seen if c is not None]
    assert not any(CANARY in c or b"PATH=" in c or c == hostname for c in contents)
    assert all(c == b"uploaded" for c in contents), {c[:40] for c in contents}


def test_uploads_never_write_through_a_swapped_folder(sandbox):
    outcomes: list[str | None] = []
    race(sandbox, lambda _round: outcomes.extend(upload_round(sandbox)) or [])
    assert None in outcomes and "invalid_path" in outcomes  # it did race: some of each


def test_downloads_never_read_through_a_swapped_folder_or_block_on_a_fifo(sandbox):
    def prepare_then_download(_round: int) -> list[bytes | None]:
        upload_round(sandbox)
        return download_round(sandbox)

    seen = race(sandbox, prepare_then_download)
    assert_nothing_read_through_a_link(sandbox, seen)
    assert b"uploaded" in seen and None in seen  # it did race: some of each


def test_put_and_get_file_never_go_through_a_swapped_folder_or_block(sandbox):
    def put_then_get(_round: int) -> list[bytes | None]:
        seen: list[bytes | None] = []
        for i in (0, 5, 6, 7):
            name = f"race/d/f{i}"
            with contextlib.suppress(UsageError):
                sandbox.put_file(name, b"uploaded")
            try:
                seen.append(sandbox.get_file(name))
            except UsageError:
                seen.append(None)
        return seen

    assert_nothing_read_through_a_link(sandbox, race(sandbox, put_then_get))
