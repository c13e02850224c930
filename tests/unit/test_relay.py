"""The relay's socket path, folder checks, peer check and request handling (no engine)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import hypothesis
import pytest
from hypothesis import strategies as st

from stigmer_sandbox import config, relay
from stigmer_sandbox.runtime import relay_server
from stigmer_sandbox.runtime.client.commands import ExecResult, Request

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


# -- the request handler: every field checked, always an answer ----------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
ODD_NUMBERS = st.sampled_from([0, -1, 10**400, float("nan"), float("inf"), True, "5"])


class Served:
    """A relay whose sandbox runs nothing: `exchange` sends one line to its handler."""

    def __init__(self, tmp_path: Path) -> None:
        self.relay = relay_server.Relay(settings_in(tmp_path))
        self.ran: list[Request] = []
        connection = self.relay.sandbox.connection
        connection.execute = self._execute  # type: ignore[method-assign]
        connection.call = lambda *_args, **_kwargs: {}  # type: ignore[method-assign]

    def _execute(self, request: Request) -> ExecResult:
        self.ran.append(request)
        return ExecResult(0, "ran\n", "", 0.01, command_id=request.cid)

    def request(self, **fields: object) -> bytes:
        return json.dumps({"fingerprint": self.relay.fingerprint, **fields}).encode() + b"\n"

    def exchange(self, line: bytes) -> list[dict]:
        """The relay's answers to `line`, as a client sees them."""
        client, server = socket.socketpair()
        handler = threading.Thread(target=self.relay._serve_client, args=(server,))
        handler.start()
        with client:
            with contextlib.suppress(OSError):  # a relay that stops reading a long line
                client.sendall(line)
                client.shutdown(socket.SHUT_WR)
            answers = list(relay.read_lines(client))
        handler.join(30)
        assert not handler.is_alive()
        return answers


def well_handled(answers: list[dict]) -> bool:
    """One refusal or error, or an accepted request that ends in its result or an error;
    never the last-resort answer of a relay that failed."""
    kinds = [answer["type"] for answer in answers]
    failed = any(str(answer.get("message")).startswith("the relay failed") for answer in answers)
    return not failed and kinds in (
        ["refused"],
        ["error"],
        ["accepted", "done"],
        ["accepted", "error"],
    )


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"command": ["ls"]}, "command must be a string"),
        ({"command": "true", "session": 7}, "session must be a string or null"),
        ({"command": "true", "options": []}, "options must be an object or null"),
        ({"command": "true", "options": {"env": ["A=1"]}}, "env must be null or an object"),
        ({"command": "true", "options": {"env": {"A": 1}}}, "env must be null or an object"),
        ({"command": "true", "options": {"cwd": 5}}, "cwd must be null or a string"),
        ({"command": "true", "options": {"cwd": "a\0b"}}, "cwd must be null or a string"),
        ({"command": "true", "options": {"timeout": "5"}}, "timeout must be between 0 and"),
        ({"command": "true", "options": {"timeout": 10**400}}, "timeout must be between 0 and"),
        ({"command": "true", "options": {"idle_timeout": True}}, "idle_timeout must be between"),
        ({"command": "true", "options": {"keep_background": 1}}, "keep_background must be true"),
        ({"command": "true", "options": {"stdin": "x"}}, "unknown option 'stdin'"),
        ({"command": "true", "json": True}, "unknown request field 'json'"),
    ],
)
def test_a_bad_field_gets_an_error_naming_it_and_the_relay_serves_the_next(
    tmp_path, capsys, fields, named
):
    served = Served(tmp_path)
    answers = served.exchange(served.request(**fields))
    assert [a["type"] for a in answers] == ["error"] and named in answers[0]["message"]
    assert answers[0]["exit_code"] == 2  # a usage error, as on the slow path
    log = capsys.readouterr().err
    assert len(log.splitlines()) == 1 and named in log and "Traceback" not in log
    good = served.exchange(served.request(command="echo ran", options={"timeout": 5}))
    assert [a["type"] for a in good] == ["accepted", "done"]
    assert good[1]["result"]["stdout"] == "ran\n" and served.ran[0].timeout == 5


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"command": "true", "options": {"env": {"A=B": "x"}}}, "invalid environment variable"),
        ({"command": "true", "session": "../x"}, "invalid session name"),
        ({"command": " "}, "empty command"),
    ],
)
def test_a_value_exec_refuses_is_answered_and_logged_once(tmp_path, capsys, fields, named):
    served = Served(tmp_path)
    answers = served.exchange(served.request(**fields))
    assert [a["type"] for a in answers] == ["accepted", "error"] and not served.ran
    assert named in answers[1]["message"] and answers[1]["exit_code"] == 2
    log = capsys.readouterr().err
    assert len(log.splitlines()) == 1 and named in log


@pytest.mark.parametrize(
    "line",
    [b"not json\n", b"\xff\xfe\n", b"[" * 100_000 + b"\n", b"[1]\n", b'{"command": "true"}'],
)
def test_garbage_gets_an_error_or_a_refusal_and_nothing_runs(tmp_path, line):
    served = Served(tmp_path)
    answers = served.exchange(line)
    assert [a["type"] for a in answers] in (["error"], ["refused"]) and not served.ran


def test_a_line_longer_than_any_request_is_refused_without_reading_it_all(tmp_path):
    served = Served(tmp_path)
    answers = served.exchange(b"x" * (relay_server.MAX_REQUEST_BYTES + (1 << 20)) + b"\n")
    assert [a["type"] for a in answers] == ["error"] and "longer than" in answers[0]["message"]


def test_a_client_that_never_sends_its_request_is_answered_and_let_go(tmp_path, monkeypatch):
    monkeypatch.setattr(relay_server, "REQUEST_WAIT_S", 0.2)
    served = Served(tmp_path)
    client, server = socket.socketpair()
    with client:
        handler = threading.Thread(target=served.relay._serve_client, args=(server,))
        handler.start()
        handler.join(10)
        assert not handler.is_alive()
        answers = list(relay.read_lines(client))
    assert [a["type"] for a in answers] == ["error"] and "no request line" in answers[0]["message"]
    assert served.relay.busy == 0


def test_the_client_takes_the_slow_path_when_refused_and_raises_the_relays_error():
    refused = socket.socketpair()
    with refused[0], refused[1]:
        relay.send_line(refused[1], {"type": "refused", "reason": "closing"})
        assert relay.Answer(None, None).read(refused[0]) is None
    message = {"type": "error", "message": "bad", "hint": None, "exit_code": 2}
    assert relay.relayed_error(message).exit_code == 2


@hypothesis.settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture],
)
@hypothesis.given(
    st.one_of(
        st.binary(max_size=300).map(lambda data: data + b"\n"),
        st.binary(max_size=300),
        JSON_VALUES.map(lambda value: json.dumps(value).encode() + b"\n"),
        st.fixed_dictionaries(
            {},
            optional={
                "command": JSON_VALUES | st.text(max_size=20),
                "session": JSON_VALUES | st.sampled_from(["s1", "../x", ""]),
                "options": JSON_VALUES
                | st.dictionaries(
                    st.sampled_from(["stdin", *relay_server.CLIENT_OPTIONS]),
                    JSON_VALUES | ODD_NUMBERS,
                ),
                "extra": JSON_VALUES,
            },
        ).map(lambda fields: ("request", fields)),
    )
)
def test_any_line_is_answered_and_never_breaks_the_relay(tmp_path, line):
    served = Served(tmp_path)
    if isinstance(line, tuple):
        line = served.request(**line[1])
    answers = served.exchange(line)
    assert well_handled(answers), answers
