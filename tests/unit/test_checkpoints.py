"""The pure logic of gVisor checkpoints (issue 23 item 4): refusals, names, the wait for a
health probe, the mount points a restore must make, runsc's version."""

from __future__ import annotations

import pytest
from docker.types import Mount

from stigmer_sandbox import policy
from stigmer_sandbox.errors import UsageError
from stigmer_sandbox.runtime import checkpoints

NONET = {
    "Runtimes": {"stigmer-gvisor": {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none"]}}
}
RUNSC = "0.0~20221219.0"


def test_a_usable_engine_has_no_refusal():
    assert checkpoints.engine_refusal(True, NONET, "stigmer-gvisor", RUNSC) is None


@pytest.mark.parametrize(
    ("experimental", "info", "runsc", "says"),
    [
        (False, NONET, RUNSC, "not in experimental mode"),
        (True, {"Runtimes": {}}, RUNSC, "has no stigmer-gvisor runtime"),
        (
            True,
            {"Runtimes": {"stigmer-gvisor": {"path": "/x", "runtimeArgs": ["--network=host"]}}},
            RUNSC,
            "lacks --network=none",
        ),
        (True, NONET, None, "is missing on this host"),
        (True, NONET, "0.0~20210101.0", "older than 20221219"),
        (True, NONET, "weird", "older than 20221219"),
    ],
)
def test_an_engine_that_cannot_checkpoint_is_refused_in_one_line(experimental, info, runsc, says):
    why = checkpoints.engine_refusal(experimental, info, "stigmer-gvisor", runsc)
    assert why is not None and says in why and "\n" not in why


def test_the_experimental_refusal_says_a_restart_is_needed():
    why = checkpoints.engine_refusal(False, NONET, "stigmer-gvisor", RUNSC)
    assert '"experimental": true' in why and "restart" in why


@pytest.mark.parametrize(
    ("isolation", "network", "says"),
    [("container", "none", "need isolation gvisor"), ("gvisor", "bridge", "egress none")],
)
def test_a_sandbox_that_cannot_be_checkpointed_is_refused(isolation, network, says):
    assert says in checkpoints.sandbox_refusal(isolation, network)


def test_a_gvisor_sandbox_without_network_can_be_checkpointed():
    assert checkpoints.sandbox_refusal("gvisor", "none") is None


@pytest.mark.parametrize("name", ["", "UPPER", "a/b", "-x", "x" * 64, None])
def test_a_bad_name_is_refused(name):
    with pytest.raises(UsageError, match="invalid checkpoint name"):
        checkpoints.check_name(name)


def test_the_image_is_named_after_the_checkpoint():
    assert checkpoints.image_ref("c1") == "stigmer-sandbox-checkpoint:c1"


@pytest.mark.parametrize(
    ("line", "date"),
    [("0.0~20221219.0", 20221219), ("release-20240212.0", 20240212), ("unknown", None)],
)
def test_runsc_dates(line, date):
    assert checkpoints.runsc_date(line) == date


def test_no_wait_without_a_probe_or_right_after_one():
    assert checkpoints.probe_gap(None, 100.0) == 0
    assert checkpoints.probe_gap(100.0, 100.5) == 0


def test_a_checkpoint_waits_for_a_probe_that_is_due():
    interval = checkpoints.PROBE_INTERVAL_S
    wait = checkpoints.probe_gap(100.0, 100.0 + interval - 1.0)
    assert 1.0 < wait < 2.0  # the probe (in 1 s) and its run
    assert checkpoints.probe_gap(100.0, 100.0 + interval + 3) > 0  # a probe runs now


def test_engine_times_with_nanoseconds_parse():
    assert checkpoints.parse_engine_time("1970-01-01T00:00:01.123456789Z") == pytest.approx(
        1.123456
    )
    assert checkpoints.parse_engine_time("1970-01-01T00:00:02Z") == 2.0
    assert checkpoints.parse_engine_time("1970-01-01T01:00:02.5+01:00") == 2.5


def test_mount_points_are_the_tmpfs_and_folder_binds_but_not_the_helper():
    spec = {
        "tmpfs": {"/tmp": "rw", policy.RUN_DIR: "rw"},
        "mounts": [
            Mount("/workspace", "/w", type="bind"),
            Mount(policy.LOGS, "/l", type="bind"),
            Mount(policy.EXEC_HELPER, "/h", type="bind", read_only=True),
        ],
    }
    assert checkpoints.mount_points(spec) == ["logs", "run/stigmer", "tmp", "workspace"]


def test_every_process_holding_an_exec_stream_is_named():
    program = checkpoints.HOLDERS_PROGRAM
    compile(program, "holders", "exec")  # it runs as given in the sandbox
    assert all(stream in program for stream in checkpoints.CONTAINER_STREAMS)
