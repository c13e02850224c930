"""Following a background process's output by byte offset (no engine): whatever the
chunks and however often it is polled, the follower gets each printed byte once, in
place, or is told how many were dropped."""

from __future__ import annotations

import hypothesis
from hypothesis import strategies as st

from stigmer_sandbox.runtime.client import processes
from stigmer_sandbox.runtime.guest import keeper
from stigmer_sandbox.runtime.guest.capture import OutputCapture


def poll(capture: OutputCapture) -> processes.StreamBytes:
    """What a poll reads: the keeper's record of `capture`, parsed back."""
    return processes.stream_bytes(keeper.stream_record(capture))


def check_poll(kept: processes.StreamBytes, printed: bytes, shown: int) -> tuple[bytes, int]:
    """The bytes since `shown` and the count dropped, checked against what was printed:
    the part from the head continues at `shown`, the rest ends at the last printed byte,
    and nothing is left unaccounted for."""
    data, gone = kept.since(shown)
    from_head = max(0, len(kept.head) - shown)
    assert data[:from_head] == printed[shown : shown + from_head]
    assert data[from_head:] == printed[len(printed) - len(data) + from_head :]
    assert shown + len(data) + gone == len(printed)
    return data, gone


@hypothesis.given(
    st.lists(st.binary(max_size=40), max_size=30),
    st.integers(2, 2 * 40 * 30),
    st.data(),
)
def test_a_follower_gets_each_byte_once_in_place_or_is_told_it_was_dropped(chunks, limit, data):
    polls = data.draw(st.lists(st.booleans(), min_size=len(chunks), max_size=len(chunks)))
    capture = OutputCapture(limit)
    printed, written = b"", b""
    shown = dropped = 0
    for chunk, polled in [*zip(chunks, polls, strict=True), (b"", True)]:
        capture.feed(chunk)
        printed += chunk
        if polled:
            piece, gone = check_poll(poll(capture), printed, shown)
            written, dropped, shown = written + piece, dropped + gone, len(printed)
    if len(printed) <= limit:
        assert (written, dropped) == (printed, 0)


def test_the_bytes_since_an_offset_skip_the_dropped_middle():
    kept = processes.StreamBytes(head=b"abc", tail=b"xyz", dropped=4, total=10)
    assert kept.since(0) == (b"abcxyz", 4)
    assert kept.since(2) == (b"cxyz", 4)
    assert kept.since(5) == (b"xyz", 2)
    assert kept.since(8) == (b"yz", 0)
    assert kept.since(10) == (b"", 0)
