"""Where a sandbox's container goes for its egress mode, how its network options enter the
container spec, and how an egress attempt is tied to the command that made it."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from stigmer_sandbox import config
from stigmer_sandbox.errors import ConfigError
from stigmer_sandbox.runtime import network
from stigmer_sandbox.runtime.backends.docker import DOCKER


def at(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


@pytest.mark.parametrize(("mode", "options"), [("none", {"network_mode": "none"}), ("open", {})])
def test_modes_without_a_gateway_need_no_engine(tmp_path, mode, options):
    settings = config.Settings(project_dir=str(tmp_path), egress=mode)
    placement = network.prepare(settings, "box", {}, DOCKER, settings.image)
    assert placement.options == options and placement.gateway is None
    assert placement.finish("box") == []


def test_network_none_is_mode_none_whatever_egress_says(tmp_path):
    settings = config.Settings(project_dir=str(tmp_path), network="none", egress="public")
    assert network.policy_of(settings).mode == "none"


def test_network_options_replace_the_mode_and_add_to_the_environment():
    spec = {"network_mode": "bridge", "environment": {"A": "1"}}
    options = {"network": "box-egress", "dns": ["10.0.0.1"], "environment": {"B": "2"}}
    merged = network.merged(spec, options)
    assert "network_mode" not in merged  # the SDK refuses both
    assert merged["network"] == "box-egress" and merged["dns"] == ["10.0.0.1"]
    assert merged["environment"] == {"A": "1", "B": "2"}
    assert spec["environment"] == {"A": "1"}  # the original is left alone


def test_an_attempt_is_tied_to_the_one_command_running_then():
    windows = [(100.0, 101.0, "first"), (101.2, 102.0, "second")]
    assert network._command_at(windows, at(100.5)) == "first"
    assert network._command_at(windows, at(101.1)) is None  # within both slacks: unsure
    assert network._command_at(windows, at(102.3)) == "second"  # a line written just after
    assert network._command_at(windows, at(110.0)) is None
    assert network._command_at(windows, "not a time") is None


def test_overlapping_commands_leave_the_attempt_unnamed():
    windows = [(100.0, 105.0, "one"), (101.0, 104.0, "two")]
    assert network._command_at(windows, at(102.0)) is None


@pytest.mark.parametrize("pool", ["10.231.0.0/30", "abc", "10.231.0.0/33"])
def test_a_subnet_pool_without_room_for_a_29_is_refused(pool):
    with pytest.raises(ConfigError, match="egress_subnets"):
        config.Settings(egress_subnets=pool)


def test_a_sandbox_off_any_gateway_network_releases_without_an_engine_call(monkeypatch):
    def refuse(*_args: object) -> None:
        raise AssertionError("no gateway to look for")

    monkeypatch.setattr(network.EgressGateway, "remove_container", refuse)
    monkeypatch.setattr(network.EgressGateway, "down", refuse)
    on_bridge = SimpleNamespace(attrs={"NetworkSettings": {"Networks": {"bridge": {}}}})
    network.release(config.Settings(), "box", DOCKER, on_bridge)()
