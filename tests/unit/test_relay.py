"""The relay's socket path, folder checks and peer check (no engine)."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from stigmer_sandbox import config, relay
from stigmer_sandbox.runtime import relay_server

from ..conftest import ROOT

root_only = pytest.mark.skipif(os.getuid() != 0, reason="switches to another uid")


def settings_in(tmp_path, **changes):
    base = config.load_settings(ROOT, environ={})
    return base.replace(state_dir=str(tmp_path / "state"), **changes)


def test_other_settings_reach_another_relay(tmp_path):
    one = settings_in(tmp_path)
    assert relay.socket_path(one) == relay.socket_path(settings_in(tmp_path))
    assert relay.socket_path(one) != relay.socket_path(settings_in(tmp_path, memory="1g"))


def test_a_socket_path_too_long_for_unix_sockets_moves_to_a_private_temp_folder(tmp_path):
    deep = tmp_path / ("d" * 120)
    path = relay.socket_path(settings_in(deep))
    assert len(str(path)) <= relay.MAX_SOCKET_PATH
    assert path.parent.name == f"stigmer-sandbox-{os.getuid()}"


def test_only_a_folder_closed_to_others_is_trusted(tmp_path):
    folder = tmp_path / "relay"
    assert relay.private_folder(folder, create=True)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    folder.chmod(0o755)
    assert not relay.private_folder(folder)
    link = tmp_path / "link"
    link.symlink_to(folder)
    assert not relay.private_folder(link)


def test_no_relay_means_the_slow_path(tmp_path):
    assert relay.run(settings_in(tmp_path), {"command": "true"}) is None


@root_only
def test_a_client_of_another_uid_is_refused_by_peer_credentials():
    folder = Path(tempfile.mkdtemp(prefix="relay-peer-"))
    try:
        folder.chmod(0o777)  # even where the folder would let another user through
        path = str(folder / "s.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        os.chmod(path, 0o777)
        server.listen(1)
        server.settimeout(20)
        nobody = (
            "import os, socket; os.setgid(65534); os.setuid(65534); "
            f"s = socket.socket(socket.AF_UNIX); s.connect({path!r}); s.recv(1)"
        )
        client = subprocess.Popen([sys.executable, "-c", nobody])
        try:
            conn, _ = server.accept()
            with conn:
                assert not relay_server.same_user(conn)
        finally:
            client.kill()
            client.wait()
        mine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mine.connect(path)
        conn, _ = server.accept()
        with conn, mine, server:
            assert relay_server.same_user(conn)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_relay_starts_isolated_from_the_folder_inv_ran_in(tmp_path, monkeypatch):
    """`python -m` would import from the current folder first (the workspace, maybe,
    which sandbox commands write): the relay runs with -I from /."""
    seen = {}

    class Recorder:
        stdin = None

        def __init__(self, argv, **options):
            seen.update(argv=argv, **options)

    monkeypatch.setattr(subprocess, "Popen", Recorder)
    relay_server.start_in_background(settings_in(tmp_path))
    assert seen["argv"][1] == "-I" and seen["cwd"] == "/"
