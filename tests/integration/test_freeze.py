"""A sandbox paused for a fork or snapshot keeps its agent connection: a long freeze (a big
workspace being copied) is not mistaken for a dead agent, and commands in flight finish."""

from __future__ import annotations

import threading
import time

import pytest

from stigmer_sandbox.config import load_settings
from stigmer_sandbox.errors import SandboxError
from stigmer_sandbox.runtime import Sandbox
from stigmer_sandbox.runtime.channel import LIVENESS_S

from ..conftest import ROOT
from .conftest import TEST_LABELS


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    folder = tmp_path_factory.mktemp("freeze")
    settings = load_settings(ROOT).replace(
        state_dir=str(folder / "state"), workspace=str(folder / "ws"), logs=str(folder / "logs")
    )
    sandbox = Sandbox.create_ephemeral(settings, extra_labels=TEST_LABELS).up().connect()
    yield sandbox
    sandbox.remove()


def test_a_freeze_longer_than_the_liveness_window_keeps_the_channel(box):
    channel = box._channel
    results = []
    running = threading.Thread(target=lambda: results.append(box.exec("sleep 1; echo done")))
    running.start()
    time.sleep(0.3)
    with box.paused():
        time.sleep(LIVENESS_S + 3)
    running.join(30)
    assert results and results[0].exit_code == 0 and results[0].stdout == "done\n"
    assert box.exec("echo again").stdout == "again\n"
    assert box._channel is channel and channel.alive


def test_only_a_running_sandbox_can_be_paused(box, tmp_path):
    stopped = Sandbox.create_ephemeral(box.settings, extra_labels=TEST_LABELS).up()
    try:
        stopped.stop()
        with pytest.raises(SandboxError, match="only a running sandbox"), stopped.paused():
            pass
    finally:
        stopped.remove()
