"""`inv sandbox.ls`, `sandbox.snapshot` and `sandbox.snapshots` on a real engine, as a user
runs them: JSON a machine can read, one clear line for bad input, nothing left behind."""

from __future__ import annotations

import json
import uuid

import pytest

from stigmer_sandbox import engine
from stigmer_sandbox.config import load_settings
from stigmer_sandbox.runtime import Sandbox, snapshots

from ..conftest import ROOT
from .conftest import TEST_LABELS


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """A sandbox of the module's own, named and stored apart from the project's."""
    folder = tmp_path_factory.mktemp("fleet")
    env = {
        "INVOKE_STIGMER_CONTAINER_NAME": f"stigmer-sandbox-fleet-{uuid.uuid4().hex[:8]}",
        "INVOKE_STIGMER_WORKSPACE": str(folder / "workspace"),
        "INVOKE_STIGMER_LOGS": str(folder / "logs"),
        "INVOKE_STIGMER_STATE_DIR": str(folder / "state"),
    }
    settings = load_settings(ROOT).replace(
        container_name=env["INVOKE_STIGMER_CONTAINER_NAME"],
        workspace=env["INVOKE_STIGMER_WORKSPACE"],
        logs=env["INVOKE_STIGMER_LOGS"],
        state_dir=env["INVOKE_STIGMER_STATE_DIR"],
    )
    box = Sandbox(settings, extra_labels=TEST_LABELS).up()
    assert box.exec("echo hello > /workspace/kept.txt").exit_code == 0
    yield env
    box.remove()


def json_of(done) -> object:
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_ls_lists_the_sandbox_with_its_workspace_and_owner(inv, cli_env):
    found = {entry["name"]: entry for entry in json_of(inv("sandbox.ls", "--json", env=cli_env))}
    mine = found[cli_env["INVOKE_STIGMER_CONTAINER_NAME"]]
    assert mine["state"] == "running"
    assert mine["workspace"] == cli_env["INVOKE_STIGMER_WORKSPACE"]
    assert mine["owner"] == "-" and mine["age_s"] >= 0
    table = inv("sandbox.ls", env=cli_env)
    assert table.returncode == 0 and cli_env["INVOKE_STIGMER_CONTAINER_NAME"] in table.stdout
    assert "\x1b[" not in table.stdout


def test_snapshot_is_listed_refused_twice_and_deleted(inv, cli_env):
    name = f"cli-{uuid.uuid4().hex[:8]}"
    try:
        taken = json_of(inv("sandbox.snapshot", name, "--json", env=cli_env))
        assert taken["image"] == snapshots.snapshot_image(name)
        again = inv("sandbox.snapshot", name, env=cli_env)
        assert again.returncode == 2 and "already exists" in again.stderr
        assert "Traceback" not in again.stderr and len(again.stderr.strip().splitlines()) == 1
        listed = {s["name"]: s for s in json_of(inv("sandbox.snapshots", "--json", env=cli_env))}
        assert 0 < listed[name]["workspace_bytes"] < 64 * 1024  # disk usage: blocks
        assert listed[name]["source"] == cli_env["INVOKE_STIGMER_CONTAINER_NAME"]
        gone = inv("sandbox.snapshots", "--delete", name, env=cli_env)
        assert gone.returncode == 0 and f"removed snapshot {name}" in gone.stdout
        assert not engine.image_id(snapshots.snapshot_image(name))
    finally:
        snapshots.delete(load_settings(ROOT), name)


@pytest.mark.parametrize("bad", ["../x", "Upper", "_under", "a" * 64])
def test_bad_snapshot_names_get_one_line(inv, cli_env, bad):
    for args in (("sandbox.snapshot", bad), ("sandbox.snapshots", "--delete", bad)):
        done = inv(*args, env=cli_env)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "invalid snapshot name" in done.stderr and "Traceback" not in done.stderr
