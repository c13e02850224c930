"""Spare egress gateways (`egress_spares`) on a real engine: the next ephemeral sandbox
under the same policy takes a ready spare (its gateway is not started again), another
policy never does, a sandbox on a spare refuses the host like any other, and the spares
left are removed with everything they made.

Traffic goes only to a web server this module runs on the host.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from stigmer_sandbox import config, engine
from stigmer_sandbox.runtime import Sandbox, egress_spares
from stigmer_sandbox.runtime.egress_gateway import bridge_gateway

from ..conftest import ROOT
from .conftest import TEST_LABELS, wait_for
from .egress_support import RAW_PROBE, host_servers


@pytest.fixture
def spare_settings(tmp_path: Path, docker_engine) -> Iterator[config.Settings]:
    base = config.load_settings(ROOT, environ={})
    folders = {k: str(tmp_path / k) for k in ("workspace", "logs", "state_dir")}
    yield base.replace(**folders, egress_spares=1)
    egress_spares.discard_all()


def gateway_id(name: str) -> str | None:
    found = engine.find_container(f"{name}-egress-gw")
    return found.id if found is not None else None


def test_the_next_sandbox_takes_a_ready_spare_and_still_refuses_the_host(spare_settings):
    with Sandbox.create_ephemeral(spare_settings, extra_labels=TEST_LABELS) as first:
        first.up()
        assert wait_for(egress_spares.spare_names, 60)
    [spare] = egress_spares.spare_names()
    made = gateway_id(spare)
    with (
        host_servers(1) as [port],
        Sandbox.create_ephemeral(spare_settings, extra_labels=TEST_LABELS) as second,
    ):
        assert second.name == spare and spare not in egress_spares.spare_names()
        second.up()
        assert gateway_id(spare) == made  # taken as it was, not started again
        probe = second.exec(["python3", "-c", RAW_PROBE, bridge_gateway(), str(port)], timeout=30)
        assert probe.stdout.startswith("refused")
    assert gateway_id(spare) is None  # its gateway went with it


def test_another_policy_never_takes_a_spare_and_the_rest_are_removed(spare_settings):
    with Sandbox.create_ephemeral(spare_settings, extra_labels=TEST_LABELS) as first:
        first.up()
    assert wait_for(egress_spares.spare_names, 60)
    [spare] = egress_spares.spare_names()
    other = Sandbox.create_ephemeral(
        spare_settings, extra_labels=TEST_LABELS, egress="allowlist", allow=["pypi.org"]
    )
    assert other.name != spare and egress_spares.spare_names() == [spare]
    assert egress_spares.take(spare_settings.replace(egress="open")) is None
    egress_spares.discard_all()
    assert gateway_id(spare) is None and not engine.client().networks.list(
        names=[f"{spare}-egress"]
    )
    assert not (Path(spare_settings.state_dir) / "egress" / spare).exists()


def test_no_spare_unless_asked(tmp_path, docker_engine):
    settings = config.load_settings(ROOT, environ={}).replace(state_dir=str(tmp_path / "s"))
    assert settings.egress_spares == 0
    egress_spares.refill(settings, TEST_LABELS, None)  # type: ignore[arg-type]
    assert egress_spares.spare_names() == []
