"""The agent's pure logic, the channel's frame checks, and local mode on this host."""

import base64
import contextlib
import itertools
import json
import signal
import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stigmer_sandbox.runtime.client import channel
from stigmer_sandbox.runtime.client.commands import Request
from stigmer_sandbox.runtime.guest import protocol
from stigmer_sandbox.runtime.guest.capture import OutputCapture
from stigmer_sandbox.runtime.local import run_on_host


def test_capture_keeps_everything_within_the_limit():
    capture = OutputCapture(10)
    assert capture.feed(b"abcdefgh") == b"abcde"
    assert capture.text() == b"abcdefgh" and capture.dropped == 0


def test_capture_keeps_head_and_tail_with_a_marker():
    capture = OutputCapture(10)
    for _ in range(100):
        capture.feed(b"0123456789")
    text = capture.text()
    assert text.startswith(b"01234") and text.endswith(b"56789")
    assert b"[... 990 bytes truncated by stigmer-sandbox ...]" in text
    assert capture.total == 1000


@pytest.mark.parametrize(
    ("args", "cause"),
    [
        ((0, None, False, False), "exit"),
        ((None, None, False, False), "lost"),
        ((124, 9, True, False), "timeout"),
        ((137, 9, False, True), "oom"),
        ((143, 15, False, False), "signal"),
        ((3, None, False, False), "exit"),
    ],
)
def test_exit_cause(args, cause):
    assert protocol.exit_cause(*args) == cause


def local(argv, timeout=10.0, limit=1 << 20, keep=False, stdin=None):
    request = Request(
        argv=argv,
        env={},
        cwd="/tmp",
        timeout=timeout,
        limit=limit,
        keep_background=keep,
        stdin=stdin,
    )
    return run_on_host(request)


def test_local_runner_exit_code_output_and_stdin():
    result = local(["bash", "-c", "cat; echo err >&2; exit 5"], stdin=b"in")
    assert (result.exit_code, result.stdout, result.stderr) == (5, b"in", b"err\n")


def test_local_runner_timeout_kills_setsid_children():
    marker = f"sleep 77{int(time.time()) % 1000}.{time.monotonic_ns() % 10**6}"
    result = local(["bash", "-c", f"setsid {marker} & {marker}"], timeout=0.5)
    assert result.timed_out and result.exit_code == 124
    time.sleep(0.1)
    assert (
        marker
        not in subprocess.run(
            ["ps", "-eo", "args"], capture_output=True, text=True, check=False
        ).stdout
    )


def test_local_runner_missing_command_and_signal():
    assert local(["no-such-command-xyz"]).exit_code == 127
    killed = local(["bash", "-c", "kill -TERM $$"])
    assert (killed.exit_code, killed.signal) == (143, 15)


def test_local_runner_caps_output():
    result = local(["bash", "-c", "head -c 100000 /dev/zero"], limit=1000)
    assert result.truncated["stdout"] and result.totals["stdout"] == 100000
    assert len(result.stdout) < 1100


DONE = (
    b'{"id":1,"type":"done","exit_code":0,"signal":null,"timed_out":false,"oom_killed":false,'
    b'"oom_overlap":[],"duration_s":0.1,"error":null,"stdout":{"tail":"","dropped":0,"total":0},'
    b'"stderr":{"tail":"","dropped":0,"total":0}}'
)

INVALID_UTF8 = b'{"id":1,"type":"beat","x":"' + bytes([0xFF, 0xFE]) + b'"}'


def test_well_formed_frames_pass_the_check():
    assert channel.check_message(DONE)["exit_code"] == 0
    assert channel.check_message(b'{"id":0,"type":"beat"}')["type"] == "beat"
    out = b'{"id":3,"type":"out","stream":"stderr","data":"aGk="}'
    assert channel.check_message(out)["stream"] == "stderr"


@pytest.mark.parametrize(
    "line",
    [
        b"[1]",
        b"1",
        b'"text"',
        b"{not json",
        b'{"id":[1],"type":"done"}',
        b'{"id":true,"type":"beat"}',
        b'{"id":1,"type":"surprise"}',
        b'{"id":1,"type":"done","exit_code":0}',
        DONE.replace(b'"exit_code":0', b'"exit_code":"0"'),
        DONE.replace(b'"timed_out":false', b'"timed_out":1'),
        DONE.replace(b'"total":0}}', b'"total":"x"}}'),
        DONE.replace(b'"oom_overlap":[]', b'"oom_overlap":[1]'),
        b'{"id":1,"type":"out","stream":"stdin","data":""}',
        b"[" * 100_000 + b"]" * 100_000,
        INVALID_UTF8,
    ],
)
def test_malformed_frames_are_protocol_errors_never_tracebacks(line):
    with pytest.raises(channel.ProtocolError):
        channel.check_message(line)


def test_bad_base64_is_a_protocol_error():
    received = channel.Received(Request(argv=["true"], env={}, cwd="/", timeout=1, limit=100))
    with pytest.raises(channel.ProtocolError):
        received.take_head({"stream": "stdout", "data": "!!!"})
    with pytest.raises(channel.ProtocolError):
        received.take_tail({"stream": "stdout", "data": "!!!"})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_an_agent_cannot_make_the_host_keep_more_than_the_limit():
    received = channel.Received(Request(argv=["true"], env={}, cwd="/", timeout=1, limit=10))
    received.take_head({"stream": "stdout", "data": b64(b"x" * 1000)})
    for _ in range(3):
        received.take_tail({"stream": "stderr", "data": b64(b"0123456789" * 100)})
    assert len(received.heads["stdout"]) == 5
    assert received.tails["stderr"] == bytearray(b"56789")


def test_tail_pieces_and_the_done_tail_make_one_capped_tail():
    request = Request(argv=["true"], env={}, cwd="/", timeout=1, limit=8)
    received = channel.Received(request)
    received.take_head({"stream": "stdout", "data": b64(b"head")})
    received.take_tail({"stream": "stdout", "data": b64(b"abc")})
    received.take_tail({"stream": "stdout", "data": b64(b"def")})
    done = channel.check_message(DONE.replace(b'"total":0}', b'"total":20}', 1))
    result = channel.raw_result(request, done, received, "agent")
    assert result.stdout == b"head\n[... 12 bytes truncated by stigmer-sandbox ...]\ncdef"
    assert result.totals["stdout"] == 20


# --- the channel's line splitter: linear, exact, bounded (property tests) -------------------

LINE = st.binary(max_size=200).map(lambda data: data.replace(b"\n", b""))


@given(lines=st.lists(LINE, max_size=30), cuts=st.lists(st.integers(0, 10_000), max_size=40))
def test_any_chunking_gives_back_exactly_the_lines(lines, cuts):
    stream = b"".join(line + b"\n" for line in lines)
    splitter = channel.LineSplitter(max_line=1 << 20)
    got = []
    for chunk in chunked(stream, cuts):
        got += [bytes(line) for line in splitter.feed(chunk)]
    assert got == lines


@given(size=st.integers(101, 5000), cuts=st.lists(st.integers(0, 5000), max_size=20))
def test_a_line_over_the_limit_is_refused_however_it_arrives(size, cuts):
    splitter = channel.LineSplitter(max_line=100)
    with pytest.raises(channel.ProtocolError):
        for chunk in chunked(b"x" * size, cuts):
            splitter.feed(chunk)


def chunked(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(stream)) for cut in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in itertools.pairwise(points)] or [b""]


FRAME_TYPES = st.sampled_from(["out", "tail", "done", "pong", "reply", "beat", "error", "x"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)


@settings(suppress_health_check=[HealthCheck.too_slow])  # a loaded 2-core machine
@given(
    kind=FRAME_TYPES,
    fields=st.dictionaries(
        st.sampled_from(["id", "stream", "data", "exit_code", "stdout", "pid", "message"]),
        JSON_VALUES,
    ),
)
def test_any_json_object_is_a_message_or_a_protocol_error(kind, fields):
    line = json.dumps({**fields, "type": kind}).encode()
    try:
        message = channel.check_message(line)
    except channel.ProtocolError:
        return
    assert isinstance(message["id"], int) and not isinstance(message["id"], bool)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_a_message_or_a_protocol_error(line):
    with contextlib.suppress(channel.ProtocolError):
        channel.check_message(line)


@given(data=st.binary(max_size=64), cut=st.integers(0, 64))
def test_a_truncated_frame_is_a_protocol_error(data, cut):
    line = json.dumps({"id": 1, "type": "out", "stream": "stdout", "data": b64(data)}).encode()
    if cut < len(line) - 1:
        with pytest.raises(channel.ProtocolError):
            channel.check_message(line[:cut])


def test_local_commands_start_with_default_signals_whatever_the_caller_ignores():
    """A caller that ignores SIGTERM and SIGINT (a background job, nohup) must not pass that
    on: `kill -TERM $$` still ends the command by the signal."""
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        killed = local(["bash", "-c", "kill -TERM $$; echo survived"])
        missing = local(["no-such-command-xyz"])
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert (killed.exit_code, killed.signal, killed.stdout) == (143, 15, b"")
    assert missing.exit_code == 127


@given(data=st.binary(max_size=300), piece=st.integers(1, 9))
def test_output_decoded_in_pieces_is_the_same_text(data, piece):
    """Multi-byte characters and invalid bytes cut across pieces decode as in one call."""
    from stigmer_sandbox.runtime.client import commands

    saved, commands.DECODE_PIECE = commands.DECODE_PIECE, piece
    try:
        assert commands.readable_output(data) == data.decode(errors="replace")
    finally:
        commands.DECODE_PIECE = saved
