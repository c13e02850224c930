"""Which ended background-process records a keeper prunes: never one that ended after the
keeper started (its `kill` or `wait` may not have read it yet), else the oldest beyond
KEEP_ENDED."""

from __future__ import annotations

import json

import pytest

from stigmer_sandbox.runtime.guest import keeper


@pytest.fixture
def records(tmp_path, monkeypatch):
    """Twenty ended records, ended at t = 1000 ... 1019."""
    monkeypatch.setattr(keeper, "PROCESS_DIR", str(tmp_path))
    for n in range(20):
        folder = tmp_path / f"{n:012x}"
        folder.mkdir()
        state = {"id": folder.name, "command": "x", "cwd": "/", "running": False}
        (folder / "state.json").write_text(json.dumps({**state, "ended_at": 1000.0 + n}))
    return tmp_path


def kept(folder) -> list[int]:
    return sorted(int(child.name, 16) for child in folder.iterdir())


def test_records_that_ended_after_this_keeper_started_are_never_pruned(records):
    keeper.forget_old(since=990.0, now=1020.0)  # all ended while this keeper ran
    assert kept(records) == list(range(20))


def test_a_later_keeper_prunes_the_oldest_beyond_the_count(records):
    keeper.forget_old(since=1030.0, now=1031.0)
    assert kept(records) == list(range(20 - keeper.KEEP_ENDED, 20))


def test_old_records_go_whoever_prunes(records):
    keeper.forget_old(since=990.0, now=1019.0 + keeper.RECENT_S + 1)
    assert kept(records) == list(range(20 - keeper.KEEP_ENDED, 20))
