"""Issue 23 item 4 on the real engine: a gVisor sandbox checkpointed with its memory and
restored into a NEW sandbox, whose background server answers with the counter it held;
the agent channel works there, and the source runs on. Refusals come before anything is
made.

Needs an engine in experimental mode with the runtime `stigmer-gvisor-nonet` (`inv
engine.install --gvisor --checkpoints` before the engine starts, as CI does;
checkpoints.engine_refusal says why not, and the module skips with that). An engine
started with its own `--exec-root` keeps runsc's state elsewhere: name that folder in
STIGMER_TEST_RUNSC_ROOT (e.g. /var/run/docker-ckpt/runtime-runc/moby) for the gVisor
mount check.
"""

from __future__ import annotations

import os

import pytest

from stigmer_sandbox import engine, isolation
from stigmer_sandbox.errors import SandboxError, UsageError
from stigmer_sandbox.host import diagnostics
from stigmer_sandbox.runtime import Sandbox, checkpoints

from .conftest import TEST_LABELS, wait_for
from .test_pause import ASK, COUNTER
from .test_runtime import settings_in


def _reason() -> str | None:
    try:
        checkpoints.require_engine(isolation.OFFLINE_RUNTIME)
    except SandboxError as exc:
        return exc.message
    return None


REASON = _reason()
needs_checkpoints = pytest.mark.skipif(
    bool(REASON), reason=f"checkpoints cannot run here: {REASON}"
)


@pytest.fixture(autouse=True)
def runsc_state(monkeypatch):
    extra = os.environ.get("STIGMER_TEST_RUNSC_ROOT")
    if extra:
        monkeypatch.setattr(isolation, "STATE_FOLDERS", (extra, *isolation.STATE_FOLDERS))


@pytest.fixture
def settings(tmp_path):
    return settings_in(tmp_path)


@pytest.fixture
def counter_box(settings):
    box = Sandbox.create_ephemeral(
        settings, extra_labels=TEST_LABELS, isolation="gvisor", egress="none"
    )
    with box:
        box.start(["python3", "-c", COUNTER])
        assert wait_for(lambda: box.exec(ASK).exit_code == 0)
        yield box


@needs_checkpoints
def test_a_restored_sandbox_answers_with_the_counter_it_held(counter_box, settings):
    name = checkpoints.unique_name()
    held = [int(counter_box.exec(ASK).stdout) for _ in range(3)][-1]
    made = counter_box.checkpoint(name)
    try:
        assert made["bytes"] > 0 and made["image"] == checkpoints.image_ref(name)
        assert [entry["name"] for entry in checkpoints.listing(settings)] == [name]
        restored = Sandbox.from_checkpoint(name, settings, extra_labels=TEST_LABELS)
        with restored:
            assert restored.name != counter_box.name
            assert int(restored.exec(ASK).stdout) == held + 1  # the same memory, carried
            done = restored.exec("id -u; cat /workspace/.beat >/dev/null && echo beat")
            assert done.stdout.split() == ["1000", "beat"]  # the agent channel works
            assert [p["running"] for p in restored.processes()] == [True]
            folder = restored.private_folder
            assert folder is not None and folder != counter_box.settings.path("workspace")
        assert int(counter_box.exec(ASK).stdout) == held + 1  # the source ran on from it
    finally:
        assert checkpoints.delete(settings, name)
    assert engine.find_image(checkpoints.image_ref(name)) is None
    assert not (checkpoints.root(settings) / name).exists()


@needs_checkpoints
def test_a_sandbox_run_on_from_a_checkpoint_is_not_checkpointed_again(counter_box, settings):
    """A second checkpoint of it leaves its containerd task stuck ("id already in use")."""
    name = checkpoints.unique_name()
    checkpoints.create(counter_box, name)
    try:
        with pytest.raises(SandboxError, match="started from a checkpoint"):
            checkpoints.create(counter_box, checkpoints.unique_name())
    finally:
        checkpoints.delete(settings, name)


def test_a_runc_sandbox_is_refused_in_one_line(settings):
    box = Sandbox.create_ephemeral(settings, extra_labels=TEST_LABELS, egress="none")
    with box, pytest.raises(SandboxError, match="need isolation gvisor") as caught:
        checkpoints.create(box, checkpoints.unique_name())
    assert "\n" not in caught.value.message
    assert not checkpoints.root(settings).exists()


def test_an_unknown_checkpoint_is_refused_before_anything_is_made(settings):
    with pytest.raises(UsageError, match="no checkpoint named nothing-here"):
        checkpoints.restore("nothing-here", settings, sandbox_class=Sandbox)
    assert not (settings.path("state_dir") / "sandboxes").exists()


@needs_checkpoints
def test_another_egress_is_refused_on_restore(counter_box, settings):
    name = checkpoints.unique_name()
    checkpoints.create(counter_box, name)
    try:
        with pytest.raises(UsageError, match="egress none"):
            checkpoints.restore(name, settings, sandbox_class=Sandbox, egress="open")
    finally:
        checkpoints.delete(settings, name)


@pytest.mark.skipif(not REASON, reason="this engine can checkpoint")
def test_an_engine_that_cannot_checkpoint_says_why_in_one_line():
    with pytest.raises(SandboxError, match="checkpoints are not available") as caught:
        checkpoints.require_engine(isolation.OFFLINE_RUNTIME)
    assert "\n" not in caught.value.message


def test_the_doctor_says_whether_this_engine_can_checkpoint():
    """`inv doctor`'s checkpoints line agrees with what a checkpoint would meet: available
    here, or a warning (never a failure) naming the same reason."""
    line = diagnostics._checkpoint_check()
    assert not line.required
    if REASON:
        assert line.status == "warn"
        assert (
            line.detail
            == f"not available: {REASON.removeprefix('checkpoints are not available: ')}"
        )
    else:
        assert line.status == "pass"
        assert isolation.OFFLINE_RUNTIME in line.detail
